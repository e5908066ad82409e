"""Optimizers and learning-rate schedules: `optim.name` picks a builder of OPTIMIZERS, `optim.schedule` one of
SCHEDULES. Every param group carries its peak lr as `base_lr`; the loop sets `lr = lr_scale(step) * base_lr`."""

from __future__ import annotations

from torch import nn

from gpt2x.config import OptimConfig
from gpt2x.optim.adamw import SCHEDULES, build_adamw, cooldown_steps, lr_at, lr_scale
from gpt2x.optim.muon import CombinedOptimizer, build_muon

OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon}
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn choices

__all__ = ["OPTIMIZERS", "SCHEDULES", "CombinedOptimizer", "build_optimizer", "check_optim", "lr_at", "lr_scale"]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str):
    """The optimizer optim.name names, over `model`'s trainable parameters (settings checked by `check_optim`)."""
    return OPTIMIZERS[cfg.name](model, cfg, device_type)


def check_optim(o: OptimConfig) -> None:
    """Fail before training on optimizer or schedule settings that cannot work; errors name the settings."""
    if o.name not in OPTIMIZERS:
        raise ValueError(f"optim={o.name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={o.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}")
    if o.max_steps < 1:
        raise ValueError(f"optim.max_steps={o.max_steps} must be at least 1")
    if not o.lr > 0:
        raise ValueError(f"optim.lr={o.lr} must be positive (GPT-2 124M used 6e-4)")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or o.grad_clip < 0:
        raise ValueError(
            f"optim.warmup_steps={o.warmup_steps}, optim.min_lr_ratio={o.min_lr_ratio}, optim.grad_clip={o.grad_clip}: "
            "need warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and grad_clip >= 0 (0 = no clipping)"
        )
    if o.schedule == "trapezoid":
        if not 0 <= o.cooldown_fraction <= 1:
            raise ValueError(
                f"optim.cooldown_fraction={o.cooldown_fraction} must lie in [0, 1]: the fraction of optim.max_steps "
                "spent cooling down to 0 (0.4 = the last 40%)"
            )
        if o.warmup_steps + cooldown_steps(o) > o.max_steps:
            # the warmup would still be rising when the cooldown should already be falling: no flat peak, and a jump
            raise ValueError(
                f"optim.schedule=trapezoid: optim.warmup_steps={o.warmup_steps} plus the cooldown "
                f"(optim.cooldown_fraction={o.cooldown_fraction} of optim.max_steps={o.max_steps} = "
                f"{cooldown_steps(o)} steps) exceed max_steps; lower warmup_steps or cooldown_fraction"
            )
    for key in ("embed_lr", "head_lr", "scalar_lr"):
        value = getattr(o, key)
        if value is not None and not value > 0:
            raise ValueError(f"optim.{key}={value} must be positive, or null for optim.lr")
    if o.name == "muon":
        _check_muon(o)


def _check_muon(o: OptimConfig) -> None:
    if not o.muon_lr > 0:
        raise ValueError(
            f"optim.muon_lr={o.muon_lr} must be positive (0.02 with optim.muon_adjust_lr=original, or about "
            "optim.lr with match_rms_adamw)"
        )
    if o.muon_adjust_lr not in MUON_ADJUST_LR:
        raise ValueError(f"optim.muon_adjust_lr={o.muon_adjust_lr!r} is unknown; valid: {', '.join(MUON_ADJUST_LR)}")
    if o.muon_momentum < 0 or o.muon_weight_decay < 0:
        raise ValueError(
            f"optim.muon_momentum={o.muon_momentum}, optim.muon_weight_decay={o.muon_weight_decay}: both must be >= 0"
        )
