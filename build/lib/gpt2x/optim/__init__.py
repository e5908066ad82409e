"""Optimizers and learning-rate schedules."""

from gpt2x.optim.adamw import build_optimizer, lr_at

__all__ = ["build_optimizer", "lr_at"]
