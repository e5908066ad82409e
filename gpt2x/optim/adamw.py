"""AdamW with weight-decay groups, and the learning-rate schedules (warmup, then cosine or flat + linear cooldown)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from gpt2x.config import OptimConfig


def build_adamw(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW that decays only tensors of 2+ dims (matmul weights, embeddings), never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    return adamw_over(groups, cfg, device_type)


def adamw_over(groups: list[dict], cfg: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with optim's betas, eps and kernel choice (fused/foreach) over param groups that set their own
    `weight_decay` and `base_lr` (the peak lr the schedule scales; the loop sets each group's `lr` every step)."""
    fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = cfg.fused if cfg.fused is not None else (fused_available and device_type == "cuda")
    if fused and not fused_available:
        raise ValueError("optim.fused=true but this torch has no fused AdamW; set optim.fused=false")
    if fused and cfg.foreach:
        raise ValueError("optim.fused=true and optim.foreach=true exclude each other; set optim.foreach=false or null")
    groups = [{**group, "lr": group["base_lr"]} for group in groups]
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=bool(fused), foreach=cfg.foreach
    )


# -- learning-rate schedules: step -> factor of each param group's peak lr ---------------------------------------------


def _warmup(step: int, cfg: OptimConfig) -> float:
    # step + 1 so the first step already trains (lr 0 would waste it)
    return (step + 1) / cfg.warmup_steps


def cosine(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to min_lr_ratio at max_steps (and after)."""
    if step < cfg.warmup_steps:
        return _warmup(step, cfg)
    if step >= cfg.max_steps:
        return cfg.min_lr_ratio
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return cfg.min_lr_ratio + coeff * (1.0 - cfg.min_lr_ratio)


def cooldown_steps(cfg: OptimConfig) -> int:
    """Steps of the trapezoid's linear cooldown: the last cooldown_fraction of max_steps."""
    return round(cfg.cooldown_fraction * cfg.max_steps)


def trapezoid(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to 1, flat, then linear to 0 over the last cooldown_steps (warmup-stable-decay, as in
    modded-nanogpt). The line reaches 0 at max_steps, one past the last step trained, which still uses 1/cooldown."""
    cooldown = cooldown_steps(cfg)
    if step < cfg.warmup_steps:
        return _warmup(step, cfg)
    if cooldown == 0 or step < cfg.max_steps - cooldown:
        return 1.0
    return max(0.0, (cfg.max_steps - step) / cooldown)


SCHEDULES = {"cosine": cosine, "trapezoid": trapezoid}


def lr_scale(step: int, cfg: OptimConfig) -> float:
    """The schedule's factor at `step`: every param group trains at this times its own peak lr (`base_lr`)."""
    return SCHEDULES[cfg.schedule](step, cfg)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """AdamW's lr at `step` (what the loop logs as `lr`): optim.lr times the schedule's factor."""
    return cfg.lr * lr_scale(step, cfg)
