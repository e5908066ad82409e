"""Numeric precision: float32 matmul precision (TF32), autocast dtype and loss scaling, from the precision group."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from gpt2x.config import PrecisionConfig

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class Precision:
    """What the training loop needs from the precision choice."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None  # None: plain fp32 compute
    scaler: torch.amp.GradScaler  # disabled (a no-op) unless the mode needs loss scaling

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in, which sets the peak FLOP/s that MFU is measured against."""
        return self.autocast_dtype or torch.float32

    @property
    def uses_tf32(self) -> bool:
        return self.device_type == "cuda" and torch.get_float32_matmul_precision() != "highest"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: autocast to the mode's dtype, or nothing for fp32."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def check_precision(cfg: PrecisionConfig, device: torch.device) -> None:
    """Fail before training where a mode cannot run on this device, or would run pathologically slowly."""
    if cfg.autocast_dtype is not None and cfg.autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(
            f"precision.autocast_dtype={cfg.autocast_dtype!r} is not supported; valid: null, {', '.join(AUTOCAST_DTYPES)}"
        )
    if cfg.matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision.matmul_precision={cfg.matmul_precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    if cfg.autocast_dtype == "float16" and device.type == "cpu" and not cfg.force:
        raise ValueError(
            f"precision={cfg.name} (float16) on cpu: float16 matmuls run about 400x slower than fp32 on CPUs without "
            "float16 units. Use precision=bf16 or precision=fp32, or precision.force=true to run it anyway."
        )
    if cfg.autocast_dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"precision={cfg.name}: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use precision=fp16 or precision=tf32"
        )
    if cfg.grad_scaler and cfg.autocast_dtype != "float16":
        log.warning("precision.grad_scaler=true is only needed for float16; it is harmless but unnecessary here")


def apply_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    """Set the process-wide matmul precision and return the autocast/scaler settings for the loop."""
    check_precision(cfg, device)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    tf32 = cfg.matmul_precision != "highest"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    elif tf32 and cfg.autocast_dtype is None:
        log.info("precision=%s: TF32 has no effect on %s; matmuls stay fp32", cfg.name, device.type)
    dtype = AUTOCAST_DTYPES.get(cfg.autocast_dtype) if cfg.autocast_dtype else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.grad_scaler)
    return Precision(cfg.name, device.type, dtype, scaler)
