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
        """Whether float32 matmuls run on TF32 tensor cores (CUDA only; CPUs have no TF32 units)."""
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
            f"precision.autocast_dtype={cfg.autocast_dtype!r} is not supported; "
            f"valid: null, {', '.join(AUTOCAST_DTYPES)}"
        )
    if cfg.matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision.matmul_precision={cfg.matmul_precision!r}; valid: {', '.join(MATMUL_PRECISIONS)}")
    if cfg.autocast_dtype == "float16" and device.type == "cpu" and not cfg.allow_slow:
        raise ValueError(
            f"precision={cfg.name} (float16) on cpu: CPUs without float16 matmul units run float16 tens to hundreds "
            "of times slower than fp32 (25x on an AVX-512 EPYC, 400x elsewhere). Use precision=bf16 or "
            "precision=fp32, or precision.allow_slow=true to run it anyway."
        )
    # including_emulation=False: pre-Ampere GPUs (V100, T4) run bfloat16 emulated, far slower than fp16 or fp32
    if cfg.autocast_dtype == "bfloat16" and device.type == "cuda" and not cfg.allow_slow:
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        if not native:
            raise ValueError(
                f"precision={cfg.name}: {torch.cuda.get_device_name(device)} has no bfloat16 units (they arrived with "
                "Ampere, compute capability 8.0) and would emulate it slowly; use precision=fp16 (loss scaling) or "
                "precision=fp32, or precision.allow_slow=true to run it anyway"
            )
    if cfg.autocast_dtype == "float16" and not cfg.grad_scaler:
        log.warning("precision=%s: float16 without precision.grad_scaler=true: small gradients may underflow", cfg.name)
    if cfg.grad_scaler and cfg.autocast_dtype != "float16":
        log.warning("precision.grad_scaler=true is only needed for float16; it is harmless but unnecessary here")


def apply_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    """Set the process-wide matmul precision and return the autocast/scaler settings for the loop (settings checked
    by `check_precision` in gpt2x.validate).

    Where a setting does nothing on this device, the log says so once (TF32 on a CPU), so a ladder rung that cannot
    be faster here is not mistaken for a regression or a win.
    """
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    tf32 = cfg.matmul_precision != "highest"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        if tf32 and cfg.autocast_dtype is None and torch.cuda.get_device_capability(device) < (8, 0):
            log.info("precision=%s: this GPU has no TF32 units (pre-Ampere); matmuls stay fp32", cfg.name)
    elif tf32 and cfg.autocast_dtype is None:
        if _matmul_precision_changes_results(device):
            log.info(
                "precision=%s: float32 matmul precision %r changes matmul results on %s (oneDNN computes them in a "
                "lower precision internally)", cfg.name, cfg.matmul_precision, device.type,
            )  # fmt: skip
        else:
            log.info(
                "precision=%s: TF32 has no effect on %s (matmuls under %r equal full fp32 bit for bit); this run is "
                "fp32", cfg.name, device.type, cfg.matmul_precision,
            )  # fmt: skip
    if cfg.autocast_dtype == "bfloat16" and device.type == "cpu" and not _cpu_has_native_bf16():
        log.warning(
            "precision=%s: this CPU has no native bfloat16 matmuls (AVX512-BF16 / AMX); they are emulated and may be "
            "slower than fp32", cfg.name,
        )  # fmt: skip
    dtype = AUTOCAST_DTYPES.get(cfg.autocast_dtype) if cfg.autocast_dtype else None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.grad_scaler)
    return Precision(cfg.name, device.type, dtype, scaler)


def _matmul_precision_changes_results(device: torch.device) -> bool:
    """Whether the current float32 matmul precision gives different results from 'highest' on this device."""
    current = torch.get_float32_matmul_precision()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 256, generator=g).to(device) for _ in range(2))
    try:
        torch.set_float32_matmul_precision("highest")
        exact = a @ b
    finally:
        torch.set_float32_matmul_precision(current)
    return not torch.equal(a @ b, exact)


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API: assume support rather than warn wrongly
        return True
