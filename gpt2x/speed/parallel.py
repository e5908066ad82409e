"""Data parallelism once the processes run (gpt2x/launch.py starts them): the process group, and the transforms that
make a built model train on several ranks.

`parallelize` applies activation checkpointing, torch.compile and DDP/FSDP in the order PyTorch documents for each
layout (torchtitan's): checkpointing first, in every layout; `apply_ddp` wraps the whole compiled model; `apply_fsdp`
compiles each transformer block, then shards each block and the root with FSDP2's `fully_shard`, casting to the
precision group's dtype for compute.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2x.config import ParallelConfig, PrecisionConfig
from gpt2x.speed.checkpointing import apply_activation_checkpointing
from gpt2x.speed.compile import apply_compile, compile_blocks

log = logging.getLogger("gpt2x")

FSDP_NEEDS_TWO = "parallel=fsdp needs at least 2 processes; set parallel.nproc_per_node>=2 or use parallel=single"


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics, checkpoints and W&B."""
        return self.rank == 0


# -- checks and process group ----------------------------------------------------------------------------------------


def check_parallel(cfg: ParallelConfig, precision: PrecisionConfig, device: torch.device, world_size: int) -> None:
    """Fail before training on a parallel setting that cannot work with the other choices; errors name the settings."""
    if cfg.name not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel={cfg.name!r} is unknown; valid: {', '.join(PARALLEL_STRATEGIES)}")
    if cfg.nproc_per_node < 1:
        raise ValueError(f"parallel.nproc_per_node={cfg.nproc_per_node} must be at least 1")
    if cfg.name == "single" and max(world_size, cfg.nproc_per_node) > 1:
        raise ValueError(
            f"parallel=single runs one process, but parallel.nproc_per_node={cfg.nproc_per_node} and "
            f"WORLD_SIZE={world_size}; use parallel=ddp or parallel=fsdp for several processes"
        )
    if cfg.name == "fsdp" and world_size < 2:
        raise ValueError(FSDP_NEEDS_TWO)
    if cfg.name == "fsdp" and precision.grad_scaler:
        # GradScaler's inf check would see only this rank's gradient shard, so ranks could disagree on skipping a step.
        raise ValueError(
            f"parallel=fsdp with precision={precision.name} (loss scaling) is not supported; use precision=bf16, "
            "or parallel=ddp for float16"
        )
    if cfg.timeout_minutes <= 0:
        raise ValueError(
            f"parallel.timeout_minutes={cfg.timeout_minutes:g} must be positive: the minutes a collective may wait "
            "(e.g. 30)"
        )
    if device.type == "cuda" and world_size > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.nproc_per_node))
        backend = cfg.backend or "nccl"
        check_workers_fit_gpus(local, torch.cuda.device_count(), backend, one_gpu_per_task=_is_slurm_task())
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ValueError(
            f"parallel.backend=nccl needs CUDA devices, but this run uses device={device}; "
            "set parallel.backend=gloo or leave it null (nccl on CUDA, gloo on CPU)"
        )


def check_workers_fit_gpus(local_world_size: int, visible_gpus: int, backend: str, one_gpu_per_task: bool = False):
    """Refuse, under NCCL, more ranks on a node than GPUs they can see: NCCL needs a GPU of its own for each rank,
    and two ranks on one GPU fail inside init_process_group ("Duplicate GPU detected").

    `one_gpu_per_task`: each rank is a SLURM task that may see only its own GPU (as device 0), so one visible GPU is
    right whatever the number of ranks on the node.
    """
    if backend != "nccl" or local_world_size <= 1 or (one_gpu_per_task and visible_gpus == 1):
        return
    if local_world_size > visible_gpus:
        raise ValueError(
            f"{local_world_size} worker processes on this node (parallel.nproc_per_node, or torchrun's "
            f"--nproc-per-node) but only {visible_gpus} visible GPU(s); NCCL runs one worker per GPU: set "
            f"parallel.nproc_per_node<={visible_gpus}, or parallel=single"
            + (" (this node has one GPU)" if visible_gpus == 1 else "")
        )


def compile_threads_per_worker(cpus: int, local_world_size: int) -> int:
    """Inductor compile workers for one rank: its share of the node's CPUs, capped at inductor's own default of 32.

    Each rank would otherwise start min(32, cpus) compile processes, 8 ranks x 32 on a 32-core node.
    """
    return max(1, min(32, cpus // max(1, local_world_size)))


def limit_compile_threads(local_world_size: int) -> None:
    """Give this rank its share of inductor's compile workers (TORCHINDUCTOR_COMPILE_THREADS), unless the user set it.

    Ranks that are SLURM tasks already see only their own CPUs (cpus_per_task) and keep inductor's default.
    """
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ or _is_slurm_task() or local_world_size <= 1:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = compile_threads_per_worker(cpus, local_world_size)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
    import torch._inductor.config as inductor_config  # read the env at import: may have happened already

    inductor_config.compile_threads = threads


def _is_slurm_task() -> bool:
    # a rank started by srun itself (hydra/launcher=slurm), not a worker of torchrun or gpt2x's own launcher
    return "SLURM_PROCID" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ


def process_group_options(cfg: ParallelConfig, device: torch.device) -> dict:
    """Keyword arguments of init_process_group: backend, the collective timeout, and (CUDA) this rank's GPU."""
    return {
        "backend": cfg.backend or ("nccl" if device.type == "cuda" else "gloo"),
        # a rank waiting in a collective longer than this aborts the job: it must outlast rank 0's checkpoint save
        "timeout": datetime.timedelta(minutes=cfg.timeout_minutes),
        "device_id": device if device.type == "cuda" else None,
    }


def init_distributed(cfg: ParallelConfig, device: torch.device) -> DistInfo:
    """Join the process group of a multi-process run (RANK/WORLD_SIZE set by `launch`, torchrun or SLURM).

    parallel=single needs no group; parallel=ddp/fsdp need to be started as workers, so a call in a plain process
    (e.g. `train(cfg, ...)` from a notebook) says how to start them instead of wrapping a one-process model.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.name == "single":
        if world_size > 1:
            raise ValueError(
                f"launched with WORLD_SIZE={world_size} but parallel=single; use parallel=ddp or parallel=fsdp"
            )
        return DistInfo()
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            f"parallel={cfg.name} runs in worker processes, and this process was not started as one (no WORLD_SIZE "
            "in the environment); start it with gpt2x-train (which starts parallel.nproc_per_node workers), with "
            "torchrun, or call gpt2x.speed.parallel.launch(train, cfg, run_dir)"
        )
    limit_compile_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group exists, so NCCL binds this rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(**process_group_options(cfg, device))
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def shared_run_dir(run_dir: Path, info: DistInfo, device: torch.device) -> Path:
    """Rank 0's run dir, for every rank: all ranks of one run write into one dir.

    Under torchrun or SLURM each rank is its own Hydra app and resolves `${now:...}` itself, so ranks started in
    different seconds get different dirs. Every rank takes rank 0's; a rank whose own dir differs removes it if it
    holds only what Hydra put there (.hydra/ and the log file), so no empty run dirs are left behind.
    """
    if info.world_size == 1:
        return run_dir
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    shared = Path(box[0])
    if run_dir.resolve() != shared.resolve() and run_dir.is_dir():
        if all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks, in place (identity in a single process)."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        else:  # gloo has no AVG
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
    return t


def destroy() -> None:
    """Leave the process group (a no-op in a single process).

    The barrier first lets gloo's worker threads finish (and free) the collectives still in flight while this thread
    waits without the GIL: freeing a finished all_gather_object's work needs the GIL, and the group's destructor,
    which runs later with the GIL held (when the DDP model goes), waits for those threads: a deadlock otherwise.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# -- model transforms ------------------------------------------------------------------------------------------------


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself inside torch.compile's and DDP's wrappers (FSDP2 shards in place: no wrapper)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or (model.module if isinstance(model, DDP) else None)
        if inner is None:
            return model
        model = inner


def apply_single(model: nn.Module, cfg: DictConfig, device: torch.device, param_dtype=None) -> nn.Module:
    """One process: the whole model compiled (or eager)."""
    return apply_compile(model, cfg.compile)


def apply_ddp(model: nn.Module, cfg: DictConfig, device: torch.device, param_dtype=None) -> nn.Module:
    """Compile the whole model, then wrap it in DDP: gradients are all-reduced in buckets, overlapping with the
    backward pass; every rank holds all weights and optimizer state. Compute precision stays with autocast.

    Dynamo sees the active DDP module when it converts the frame and splits the graph at DDP's bucket boundaries
    (its DDPOptimizer; `TORCH_LOGS=ddp_graphs` shows the pieces), so each bucket's all-reduce starts while the
    backward of the pieces before it still runs.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(apply_compile(model, cfg.compile), device_ids=device_ids)


def apply_fsdp(model: nn.Module, cfg: DictConfig, device: torch.device, param_dtype=None) -> nn.Module:
    """Shard weights, gradients and optimizer state over the ranks with FSDP2, one unit per block then the root.

    Each block's parameters are all-gathered just before it runs and freed after (ZeRO-3), so memory holds one
    block's full weights at a time; the root unit holds the rest (embeddings, tied lm_head, final norm).
    Parameters are cast to `param_dtype` (the precision group's autocast dtype; None keeps fp32) when gathered, and
    gradients are reduce-scattered in fp32 so the sum over ranks loses no precision.

    A whole-model compile made before `fully_shard` graph-breaks inside FSDP's hooks and runs mostly eager, so the
    blocks are compiled one by one first (torchtitan's order); the embeddings, final norm and loss stay eager.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = model.transformer.h
    compile_blocks(blocks, cfg.compile)
    # The output layer and its loss (most of a small model's step: the (B, T, vocab) logits and their softmax) run in
    # the root unit; compiled apart, as torchtitan compiles its loss, they fuse as they do in a whole-model compile.
    model.loss_fn = apply_compile(model.loss_fn, cfg.compile)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by the backward pass: keep them gathered (torchtitan).
        reshard = cfg.parallel.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=cfg.parallel.reshard_after_forward)
    return model  # fully_shard changes the module in place


PARALLEL_STRATEGIES = {"single": apply_single, "ddp": apply_ddp, "fsdp": apply_fsdp}


def parallelize(model: nn.Module, cfg: DictConfig, device: torch.device, param_dtype=None) -> nn.Module:
    """The model to train: its blocks checkpointed (activation_checkpoint group), compiled (compile group), then
    wrapped or sharded (parallel group), in the documented order.

    `param_dtype` is FSDP's compute dtype (the precision group's autocast dtype). Keep `model` itself for sampling,
    evaluation of variable-length inputs and checkpoints (activation checkpointing changes none of its keys, and
    recomputes nothing where no gradients are taken).
    """
    # first: compile then traces the checkpointed blocks, and FSDP's hooks run around each checkpointed block
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    return PARALLEL_STRATEGIES[cfg.parallel.name](model, cfg, device, param_dtype)


def is_fsdp(model: nn.Module) -> bool:
    """Whether the model's weights are sharded by FSDP2 (so forward passes are collectives)."""
    return isinstance(unwrap(model), FSDPModule)


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-step of an accumulation: one reduction per step.

    Use around the forward pass. DDP decides at forward time (its `no_sync` context); FSDP2 reads a flag during
    backward, which runs after this context has closed, so the flag is set here and the last micro-step sets it back.
    """
    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if is_fsdp(model):
        unwrap(model).set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` and return the norm before clipping, for any layout.

    Under FSDP each rank holds gradient shards (DTensors) and the norm of a shard is a partial result; the total is
    made whole across ranks before clipping, as in torchtitan.
    """
    parameters = [p for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total_norm, DTensor):
        total_norm = total_norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    return total_norm
