"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from gpt2x.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW that decays only tensors of 2+ dims (matmul weights, embeddings), never biases or LayerNorm gains."""
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r} is not supported; valid: 'adamw'")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = cfg.fused if cfg.fused is not None else (fused_available and device_type == "cuda")
    if fused and not fused_available:
        raise ValueError("optim.fused=true but this torch has no fused AdamW; set optim.fused=false")
    if fused and cfg.foreach:
        raise ValueError("optim.fused=true and optim.foreach=true exclude each other; set optim.foreach=false or null")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=bool(fused), foreach=cfg.foreach
    )


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        # step + 1 so the first step already trains (lr 0 would waste it)
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    decay_ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (cfg.lr - min_lr)
