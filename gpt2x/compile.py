"""torch.compile (inductor kernel fusion) as a transform of a built model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gpt2x.config import CompileConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile(cfg: CompileConfig) -> None:
    """Fail before training on a mode torch.compile does not know."""
    if cfg.enabled and cfg.mode not in COMPILE_MODES:
        raise ValueError(f"compile.mode={cfg.mode!r} is not a torch.compile mode; valid: {', '.join(COMPILE_MODES)}")


def apply_compile(model: nn.Module, cfg: CompileConfig) -> nn.Module:
    """Return the model compiled as configured (or unchanged). The caller keeps the eager module for sampling."""
    check_compile(cfg)
    if not cfg.enabled:
        return model
    # A cache of our own: a warm cache turns 20-30 s of CPU compile time into a few seconds on the next run.
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    return torch.compile(model, mode=cfg.mode, fullgraph=cfg.fullgraph)
