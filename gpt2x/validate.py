"""Every rule that spans settings, checked once, after composition and before any work starts.

A typo or a wrong type is already refused by the schemas (gpt2x/config.py) at compose time. What is left is what
depends on several settings or on the machine: a kernel or precision the device lacks, batch sizes that must divide,
a sequence longer than the model, intervals that make no sense. Each error names the settings and what would be
valid. The `apply_*`/`build_*` functions that act on these settings trust that this ran.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from gpt2x.data import DATASETS
from gpt2x.data.tokenizer import N_VOCAB
from gpt2x.extras import import_extra
from gpt2x.model.attention import check_attention
from gpt2x.model.components import check_model, smallest_window
from gpt2x.model.loss import LOSSES
from gpt2x.optim import check_optim
from gpt2x.run.metrics import check_peak_settings
from gpt2x.run.profile import check_profile
from gpt2x.run.target import check_target_settings
from gpt2x.speed.checkpointing import check_activation_checkpoint
from gpt2x.speed.compile import check_compile
from gpt2x.speed.parallel import check_parallel
from gpt2x.speed.precision import AUTOCAST_DTYPES, check_precision


def grad_accum_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-steps per optimizer step so that B*T*world_size*steps == data.total_batch_size tokens."""
    per_micro = cfg.data.batch_size * cfg.data.seq_len * world_size
    total = cfg.data.total_batch_size or per_micro
    if total % per_micro:
        raise ValueError(
            f"data.total_batch_size={total} is not divisible by data.batch_size*data.seq_len*world_size = "
            f"{cfg.data.batch_size}*{cfg.data.seq_len}*{world_size} = {per_micro}; "
            f"use a multiple of {per_micro}, e.g. {per_micro * max(1, round(total / per_micro))}"
        )
    return total // per_micro


def validate(cfg: DictConfig, device: torch.device, world_size: int) -> None:
    """Fail before any work on settings that cannot run together here; each error names the settings involved."""
    _check_model_and_data(cfg)
    grad_accum_steps(cfg, world_size)
    check_optim(cfg.optim)
    _check_run_keys(cfg)
    check_precision(cfg.precision, device)
    dtype = AUTOCAST_DTYPES.get(cfg.precision.autocast_dtype, torch.float32)
    head_dim = cfg.model.n_embd // cfg.model.n_head
    check_attention(cfg.attention.name, device, dtype, head_dim, smallest_window(cfg.model))
    if cfg.loss.name not in LOSSES:
        raise ValueError(f"loss={cfg.loss.name!r} is unknown; valid: {', '.join(LOSSES)}")
    check_compile(cfg.compile, device)
    check_activation_checkpoint(cfg.activation_checkpoint)
    check_peak_settings(cfg.peak_probe, cfg.peak_flops)
    check_target_settings(cfg)
    check_profile(cfg.profile, cfg.optim.max_steps)
    check_parallel(cfg.parallel, cfg.precision, device, world_size)


def _check_model_and_data(cfg: DictConfig) -> None:
    m, d = cfg.model, cfg.data
    if d.name not in DATASETS:
        raise ValueError(f"data.name={d.name!r} is not a known dataset; valid: {', '.join(DATASETS)}")
    if d.batch_size < 1 or d.seq_len < 1:
        raise ValueError(f"data.batch_size={d.batch_size} and data.seq_len={d.seq_len} must both be at least 1")
    if d.seq_len > m.block_size:
        raise ValueError(
            f"data.seq_len={d.seq_len} exceeds model.block_size={m.block_size} (model={m.name}); "
            f"use data.seq_len<={m.block_size}"
        )
    if m.vocab_size < N_VOCAB:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} is smaller than GPT-2's {N_VOCAB} tokens; use {N_VOCAB} or a padded "
            "size such as 50304"
        )
    check_model(m)
    if m.init_from:
        import_extra("transformers", "hf", f"model.init_from={m.init_from}")
        from gpt2x.model.hf import check_gpt2_format

        check_gpt2_format(m, f"model.init_from={m.init_from} loads GPT-2 weights")


def _check_run_keys(cfg: DictConfig) -> None:
    if cfg.log_interval < 1:
        raise ValueError(f"log_interval={cfg.log_interval} must be at least 1 (1 logs every step)")
    for key in ("eval_interval", "sample_interval", "hellaswag_interval", "checkpoint_interval", "timing_warmup_steps"):
        if cfg[key] < 0:
            raise ValueError(f"{key}={cfg[key]} must be >= 0 (0 = never; N = every N steps and at the end)")
    if cfg.eval_interval > 0 and cfg.eval_steps < 1:
        raise ValueError(f"eval_steps={cfg.eval_steps} must be at least 1 when eval_interval > 0 (or eval_interval=0)")
    if cfg.checkpoint_interval > 0 and cfg.keep_checkpoints < 1:
        raise ValueError(
            f"keep_checkpoints={cfg.keep_checkpoints} must be at least 1 when checkpoint_interval > 0: the checkpoint "
            "just written is always kept"
        )
    if cfg.sample_interval > 0:
        if cfg.sample_count < 1 or cfg.sample_max_tokens < 1 or cfg.sample_top_k < 0:
            raise ValueError(
                f"sample_count={cfg.sample_count}, sample_max_tokens={cfg.sample_max_tokens}, "
                f"sample_top_k={cfg.sample_top_k}: need count and max_tokens >= 1 and top_k >= 0 (0 = no top-k)"
            )
    if cfg.resume not in (None, "auto") and not str(cfg.resume).endswith(".pt"):
        raise ValueError(f"resume={cfg.resume}: use resume=auto, resume=null or the path of a step_NNNNNN.pt file")

