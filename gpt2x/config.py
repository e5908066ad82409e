"""Config schemas: one dataclass per Hydra config group, registered in the ConfigStore as `base_<group>`.

Each YAML option under `conf/<group>/` starts with `defaults: [base_<group>]`, so a typo or a wrong type fails at
compose time with Hydra's own message ("Key 'x' not in 'PrecisionConfig'"). Rules that span groups (flash needs a
device that runs it, fp16 on CPU, batch sizes that must divide) live in `validate`, run once before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    """GPT-2 architecture. The YAML `name` is the file name (gpt2, gpt2-medium, ..., tiny, small)."""

    name: str = MISSING
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    block_size: int = 1024  # longest context the position embedding covers
    vocab_size: int = 50257  # 50304 pads to a multiple of 128 ("nice numbers"); padding rows are never predicted
    init_from: str | None = None  # a transformers GPT-2 hub name or local dir to start from instead of random init
    fused_ce: bool = False  # loss by chunked output layer + cross-entropy, without the (B, T, V) logits (gpt2x/loss.py)


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    name: str = MISSING  # key of gpt2x.data.DATASETS
    path: str | None = None  # local file, directory or glob (meaning depends on the dataset)
    url: str | None = None  # canonical download address, for datasets that have one
    sha256: str | None = None  # expected checksum of the downloaded file
    cache_dir: str = "${cache_dir}/data"  # tokenized shards are cached here, outside the source tree
    batch_size: int = 8  # B: sequences per micro-step per process
    seq_len: int = 128  # T: tokens per sequence
    total_batch_size: int | None = None  # tokens per optimizer step; null = B*T*world_size (no accumulation)
    val_fraction: float = 0.1  # held-out tail of the token stream, for corpora without their own val split
    shard_size: int = 100_000_000  # tokens per shard file
    hf_path: str = "HuggingFaceFW/fineweb-edu"  # `datasets` source for gpt2x-prepare
    hf_name: str | None = "sample-10BT"  # `datasets` config name
    hf_split: str = "train"
    text_field: str = "text"
    num_proc: int = 4  # tokenizer worker processes for gpt2x-prepare


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay on 2D weights, linear warmup then cosine decay to min_lr_ratio * lr."""

    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    warmup_steps: int = 10
    max_steps: int = 50  # optimizer steps in the run
    weight_decay: float = 0.1  # applied to matmul weights and embeddings only, never biases or norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel; null = on where the device supports it (CUDA)


@dataclass
class PrecisionConfig:
    """Numeric format of the matmuls. Weights and optimizer state stay fp32 in every mode."""

    name: str = "fp32"
    autocast_dtype: str | None = None  # bfloat16 / float16 autocast; null = no autocast
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision: highest, high (TF32), medium
    grad_scaler: bool = False  # loss scaling, needed for float16's narrow exponent range
    force: bool = False  # run a mode even where it is known to be pathologically slow (fp16 on CPU)


@dataclass
class AttentionConfig:
    """Attention kernel; `name` is a key of gpt2x.attention.ATTENTION_KERNELS."""

    name: str = "sdpa"


@dataclass
class CompileConfig:
    """torch.compile kernel fusion."""

    name: str = "none"
    enabled: bool = False
    mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    fullgraph: bool = False  # fail on graph breaks instead of falling back to eager for part of the model
    cache_dir: str = "${cache_dir}/inductor"  # inductor's cache: a warm cache turns minutes of compile into seconds


@dataclass
class ParallelConfig:
    """Data parallelism over processes started by torch.distributed's elastic launcher (or torchrun)."""

    name: str = "single"  # single, ddp, fsdp
    nproc_per_node: int = 1  # worker processes gpt2x-train starts itself when not already launched by torchrun
    backend: str | None = None  # process group backend; null = nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # FSDP: free gathered params after forward (ZeRO-3) or keep them (ZeRO-2)


@dataclass
class LoggerConfig:
    """Where metrics go besides the console and metrics.jsonl (always on)."""

    name: str = "none"  # none, wandb
    project: str = "gpt2x"
    entity: str | None = None
    mode: str = "auto"  # online, offline, disabled, auto (online when credentials are configured, else offline)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    init_timeout: float = 30.0  # seconds W&B may take to start before we go on without it


@dataclass
class TrainConfig:
    """Root config: the groups plus run-level settings."""

    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    precision: PrecisionConfig = MISSING
    attention: AttentionConfig = MISSING
    compile: CompileConfig = MISSING
    parallel: ParallelConfig = MISSING
    logger: LoggerConfig = MISSING

    experiment: str | None = None  # name of the experiment preset, if any (W&B job_type, report title)
    rung: str | None = None  # name of the optimization-ladder rung, if any
    seed: int = 1337
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    # data shards, inductor cache, CPU peak FLOP probe
    cache_dir: str = "${oc.env:GPT2X_CACHE_DIR,${oc.env:HOME}/.cache/gpt2x}"
    log_interval: int = 1  # steps between console/metrics lines
    timing_warmup_steps: int = 3  # first steps left out of the timing summary (allocator warm-up, compilation)
    eval_interval: int = 50  # steps between val-loss evaluations (and at the last step); 0 = only at the end
    eval_steps: int = 10  # val batches per evaluation
    sample_interval: int = 100  # steps between text samples (and at the last step); 0 = only at the end
    sample_prompt: str = "First Citizen:"
    sample_count: int = 2
    sample_max_tokens: int = 32
    sample_top_k: int = 50
    hellaswag_interval: int = 0  # steps between HellaSwag evals; 0 = never
    hellaswag_path: str | None = None  # local hellaswag_val.jsonl; null = download to cache_dir
    hellaswag_limit: int | None = None  # evaluate only the first N examples
    checkpoint_interval: int = 0  # steps between checkpoints (and at the last step when > 0); 0 = never
    keep_checkpoints: int = 2  # newest checkpoints kept in <run_dir>/checkpoints
    resume: str | None = None  # auto (newest checkpoint of this run dir) or a checkpoint path
    peak_flops: float | None = None  # device peak FLOP/s for MFU; null = table for known GPUs, probe on CPU
    peak_probe: str = "cached"  # where peak_flops comes from a matmul probe: cached (measure once), fresh (every run)
    target_val_loss: float | None = None  # record step/tokens/time to the first eval at or below it; null = off
    stop_at_target: bool = False  # end the run at the eval that reaches target_val_loss
    objective: str = "auto"  # what a sweeper (Optuna) minimizes: auto, final_val_loss, time_to_target_s, ...
    report_baseline: str | None = None  # sweep report: configuration compared against (its label); null = the first


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "precision": PrecisionConfig,
    "attention": AttentionConfig,
    "compile": CompileConfig,
    "parallel": ParallelConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Register the root schema as `base_config` and each group's as `base_<group>`."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for group, schema in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


register_configs()
