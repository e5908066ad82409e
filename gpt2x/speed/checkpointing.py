"""Activation checkpointing as a transform of a built model: blocks that keep fewer activations for the backward pass
and recompute the rest from their input, trading compute for memory.

Applied first, before compile and FSDP/DDP (torchtitan's order; see gpt2x.speed.parallel.parallelize). Each block's
`forward` is replaced on the instance, not wrapped in a module (torch's `checkpoint_wrapper` would add
`_checkpoint_wrapped_module.` to every state-dict key): checkpoints and the HF export see the same keys as without it.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from gpt2x.config import ActivationCheckpointConfig

# What selective checkpointing keeps: the outputs of the matmuls and of attention, the costly ops. Only the cheap
# elementwise ops (LayerNorm, GELU, the head transposes) are recomputed, so the backward repeats almost no FLOPs.
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed_forward(self, *args, **kwargs):
    """The block's own forward under torch.utils.checkpoint: what it keeps for backward is set by its context_fn."""
    return checkpoint(
        type(self).forward, self, *args, use_reentrant=False, context_fn=self.checkpoint_context_fn, **kwargs
    )


def _checkpoint_blocks(blocks: nn.ModuleList, context_fn) -> None:
    for block in blocks:
        block.checkpoint_context_fn = context_fn
        # a bound method on the instance: module keys stay as they are, and deepcopy copies it with its block
        block.forward = types.MethodType(_checkpointed_forward, block)


def checkpoint_none(blocks: nn.ModuleList) -> None:
    """Keep every activation (PyTorch's default)."""


def checkpoint_full(blocks: nn.ModuleList) -> None:
    """Each block keeps only its input; the backward reruns the whole block forward (about +1/3 of the step's FLOPs
    in the blocks) and holds one block's activations at a time."""
    _checkpoint_blocks(blocks, torch.utils.checkpoint.noop_context_fn)


def checkpoint_selective(blocks: nn.ModuleList) -> None:
    """Each block keeps its matmul and attention outputs (SAVED_OPS) and recomputes the elementwise ops in backward:
    less memory saved than `full`, almost no extra FLOPs (torch's selective activation checkpointing)."""
    _checkpoint_blocks(blocks, functools.partial(create_selective_checkpoint_contexts, _save_matmuls))


# activation_checkpoint.name -> function(the model's transformer blocks), changing the blocks in place
ACTIVATION_CHECKPOINTS = {"none": checkpoint_none, "full": checkpoint_full, "selective": checkpoint_selective}


def check_activation_checkpoint(cfg: ActivationCheckpointConfig) -> None:
    """Fail before training on an activation_checkpoint choice the code does not have."""
    if cfg.name not in ACTIVATION_CHECKPOINTS:
        raise ValueError(
            f"activation_checkpoint={cfg.name!r} is unknown; valid: {', '.join(ACTIVATION_CHECKPOINTS)}"
        )


def apply_activation_checkpointing(model: nn.Module, cfg: ActivationCheckpointConfig) -> nn.Module:
    """Checkpoint the transformer blocks of a built GPT in place, as the activation_checkpoint group says."""
    ACTIVATION_CHECKPOINTS[cfg.name](model.transformer.h)
    return model
