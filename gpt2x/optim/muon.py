"""Muon for the hidden weight matrices, AdamW for everything else, stepped as one optimizer.

Muon (torch.optim.Muon, Keller Jordan's) replaces each 2D update with its nearest semi-orthogonal matrix (Newton-Schulz
iterations on the momentum), which suits the matmul weights inside the blocks. Embeddings are lookups rather than
matmuls, the head maps to a vocabulary-sized output, and gains/biases are vectors, so those stay with AdamW, each
group at its own peak lr (optim.embed_lr, head_lr, scalar_lr).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gpt2x.config import OptimConfig
from gpt2x.optim.adamw import adamw_over

HIDDEN = "transformer.h."  # the blocks: their 2D parameters are the hidden matmul weights
# token and position embeddings, and the value-embedding tables some models add (transformer.ve.<i>.weight)
EMBEDDINGS = ("transformer.wte.", "transformer.wpe.", "transformer.ve.")
HEAD = "lm_head."


def param_roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each trainable parameter as (name, tensor) under its role: hidden (Muon), embed, head, scalar or other.

    named_parameters lists a shared tensor once, under its first name: the lm_head tied to wte is wte, an embedding.
    `other` holds 2D+ parameters outside the blocks that are neither embedding nor head (none in GPT-2).
    """
    roles = {"hidden": [], "embed": [], "head": [], "scalar": [], "other": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(HIDDEN) and p.ndim == 2:
            role = "hidden"
        elif p.ndim < 2:
            role = "scalar"
        elif name.startswith(EMBEDDINGS):
            role = "embed"
        elif name.startswith(HEAD):
            role = "head"
        else:
            role = "other"
        roles[role].append((name, p))
    return roles


def build_muon(model: nn.Module, cfg: OptimConfig, device_type: str) -> CombinedOptimizer:
    """torch.optim.Muon over the hidden matrices and AdamW over the rest, one param group per role (named `role`),
    each with its own peak lr (`base_lr`) that the schedule scales."""
    roles = param_roles(model)
    peak = {"embed": cfg.embed_lr, "head": cfg.head_lr, "scalar": cfg.scalar_lr, "other": None}
    groups = [
        {
            "params": [p for _, p in roles[role]],
            "role": role,
            "weight_decay": 0.0 if role == "scalar" else cfg.weight_decay,  # as optim=adamw: never gains or biases
            "base_lr": cfg.lr if peak[role] is None else peak[role],
        }
        for role in peak
        if roles[role]
    ]
    hidden = [p for _, p in roles["hidden"]]
    muon = torch.optim.Muon(
        [{"params": hidden, "role": "hidden", "base_lr": cfg.muon_lr}],
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=cfg.muon_nesterov,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    return CombinedOptimizer({"muon": muon, "adamw": adamw_over(groups, cfg, device_type)})


class CombinedOptimizer:
    """Several torch optimizers over disjoint parameters, used as one by the loop, GradScaler and the Checkpointer.

    What they call is all there is: `param_groups` (every optimizer's groups, the same dicts, so the loop's lr
    setting and GradScaler.unscale_ reach them all), `zero_grad`, `step` (GradScaler calls it once, or skips it for
    all on an inf), `state_dict`/`load_state_dict` (one entry per optimizer, by name), and iteration over the torch
    optimizers, which is how torch.distributed.checkpoint's get/set_optimizer_state_dict take several (FSDP).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers.values())

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state)[:4]}, this run's optimizer needs {sorted(self.optimizers)}: "
                "the checkpoint was written with another optim.name"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
