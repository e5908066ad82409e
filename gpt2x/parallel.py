"""Data parallelism: starting the worker processes, joining the process group, and wrapping a built model.

Three ways to get several processes, one code path once they run (`train(cfg, run_dir)` in each):

- `gpt2x-train parallel=ddp parallel.nproc_per_node=N`: `launch` starts N local workers with torch.distributed's
  elastic launcher (the API behind torchrun), so a Hydra multirun can hold a DDP rung like any other.
- `torchrun --nnodes=... --nproc_per_node=... -m gpt2x.train parallel=ddp ...`: torchrun already set RANK/WORLD_SIZE;
  `launch` runs the job in this process.
- `gpt2x-train -m hydra/launcher=slurm hydra.launcher.nodes=... hydra.launcher.tasks_per_node=...`: each SLURM task
  is one rank; `launch` turns submitit's job environment into RANK/WORLD_SIZE/MASTER_ADDR and runs the job here.

The model transforms follow torchtitan: `apply_ddp` wraps the whole model; `apply_fsdp` shards each transformer block
and then the root with FSDP2's `fully_shard`, casting to the precision group's dtype for compute.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import logging.config
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2x.config import ParallelConfig, PrecisionConfig

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
    if cfg.timeout_minutes <= 0:
        raise ValueError(
            f"parallel.timeout_minutes={cfg.timeout_minutes:g} must be positive: the minutes a collective may wait "
            "(e.g. 30)"
        )
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
            "torchrun, or call gpt2x.parallel.launch(train, cfg, run_dir)"
        )
    options = process_group_options(cfg, device)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    check_workers_fit_gpus(local_world_size, visible_gpus, options["backend"], one_gpu_per_task=_is_slurm_task())
    limit_compile_threads(local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group exists, so NCCL binds this rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(**options)
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
    """Leave the process group (a no-op in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


# -- model transforms ------------------------------------------------------------------------------------------------


def _eager(model: nn.Module) -> nn.Module:
    # torch.compile returns a wrapper that calls the eager module; wrappers and sharding act on the eager one.
    return getattr(model, "_orig_mod", model)


def apply_single(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device, param_dtype=None):
    """One process: nothing to wrap."""
    return model


def apply_ddp(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device, param_dtype=None):
    """Wrap in DDP: gradients are all-reduced in buckets, overlapping with the backward pass; every rank holds all
    weights and optimizer state. Compute precision stays with autocast (the precision group)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device, param_dtype=None):
    """Shard weights, gradients and optimizer state over the ranks with FSDP2, one unit per block then the root.

    Each block's parameters are all-gathered just before it runs and freed after (ZeRO-3), so memory holds one
    block's full weights at a time; the root unit holds the rest (embeddings, tied lm_head, final norm).
    Parameters are cast to `param_dtype` (the precision group's autocast dtype; None keeps fp32) when gathered, and
    gradients are reduce-scattered in fp32 so the sum over ranks loses no precision.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    eager = _eager(model)
    blocks = list(eager.transformer.h)
    for i, block in enumerate(blocks):
        # The last block's weights are needed again at once by the backward pass: keep them gathered (torchtitan).
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(eager, mp_policy=mp_policy, reshard_after_forward=cfg.reshard_after_forward)
    return model  # fully_shard changes the module in place; a compile wrapper around it stays valid


PARALLEL_STRATEGIES = {"single": apply_single, "ddp": apply_ddp, "fsdp": apply_fsdp}


def apply_parallel(
    model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap (or shard) the model for the configured strategy; `param_dtype` is FSDP's compute dtype."""
    if cfg.name not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel={cfg.name!r} is unknown; valid: {', '.join(PARALLEL_STRATEGIES)}")
    return PARALLEL_STRATEGIES[cfg.name](model, cfg, info, device, param_dtype)


def is_fsdp(model: nn.Module) -> bool:
    """Whether the model's weights are sharded by FSDP2 (so forward passes are collectives)."""
    return isinstance(_eager(model), FSDPModule)


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-step of an accumulation: one reduction per step.

    Use around the forward pass. DDP decides at forward time (its `no_sync` context); FSDP2 reads a flag during
    backward, which runs after this context has closed, so the flag is set here and the last micro-step sets it back.
    """
    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if is_fsdp(model):
        _eager(model).set_requires_gradient_sync(sync)
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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as whole (unsharded) tensors, for a checkpoint that rank 0 writes.

    Under FSDP this gathers the shards (a collective: every rank must call it) onto rank 0's CPU; other ranks get
    empty dicts. The optimizer state is then keyed by parameter name (torch.distributed.checkpoint's format), which
    `load_full_state_dicts` reads back under any number of FSDP ranks.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        eager = _eager(model)
        return get_model_state_dict(eager, options=options), get_optimizer_state_dict(eager, optimizer, options=options)
    return _eager(model).state_dict(), optimizer.state_dict()


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load state written by `full_state_dicts` (each rank passes the whole dicts; FSDP keeps its own shards)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        eager = _eager(model)
        set_model_state_dict(eager, model_sd, options=options)
        set_optimizer_state_dict(eager, optimizer, optim_sd, options=options)
        return
    _eager(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


# -- launching -------------------------------------------------------------------------------------------------------


class WorkerFailedError(RuntimeError):
    """A worker process of a multi-process run failed; the message holds the failing rank's error."""


def launch(fn, cfg: DictConfig, run_dir: Path):
    """Run `fn(cfg, run_dir)` as this job needs: here, or in parallel.nproc_per_node workers; returns rank 0's result.

    Here when parallel=single or when an outside launcher made this process one rank (torchrun, or a SLURM task of
    hydra/launcher=slurm); otherwise in workers started by torch's elastic launcher on 127.0.0.1. A worker that fails
    stops the others and raises WorkerFailedError with its rank, error and traceback.
    """
    _export_submitit_env()
    n = cfg.parallel.nproc_per_node
    if cfg.parallel.name not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel={cfg.parallel.name!r} is unknown; valid: {', '.join(PARALLEL_STRATEGIES)}")
    if n < 1:
        raise ValueError(f"parallel.nproc_per_node={n} must be at least 1")
    if cfg.parallel.name == "single" or "WORLD_SIZE" in os.environ:
        return fn(cfg, run_dir)
    if cfg.parallel.name == "fsdp" and n < 2:  # checked again in train(); here it fails before any worker starts
        raise ValueError(FSDP_NEEDS_TWO)
    on_cuda = str(cfg.device).startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    backend = cfg.parallel.backend or ("nccl" if on_cuda else "gloo")
    check_workers_fit_gpus(n, torch.cuda.device_count() if on_cuda else 0, backend)  # before starting any worker

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from gpt2x.logger import export_hydra_info

    export_hydra_info()  # workers have no HydraConfig: W&B run name/group and record.json read it from the env
    # Resolved here so every worker sees the same values (env lookups, ${hydra:...}) without Hydra set up.
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    OmegaConf.resolve(cfg)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"gpt2x-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # port 0: the OS picks a free one, so sweeps and parallel jobs never collide
        local_addr="127.0.0.1",
        max_restarts=0,  # a failed worker fails the run; restarting from scratch would hide the error
        start_method="spawn",  # fork would copy this process's threads and Hydra state into the workers
    )
    log.info("parallel=%s: starting %d worker processes", cfg.parallel.name, n)
    try:
        results = elastic_launch(config, _worker)(fn, cfg, run_dir, _job_logging_config())
    except ChildFailedError as e:
        raise WorkerFailedError(describe_failure(e, cfg.parallel.name, n)) from None
    return results[0]


def describe_failure(error, strategy: str, nproc: int) -> str:
    """The first failed worker's rank, exit code, error and traceback, from elastic's ChildFailedError."""
    rank, failure = error.get_first_failure()
    message = failure.message
    if isinstance(message, dict):  # the worker raised: error file with message and python traceback
        text = message.get("message", "")
        trace = message.get("extraInfo", {}).get("py_callstack", "")
    else:  # killed by a signal (e.g. the OOM killer), or died before it could record its error
        text, trace = str(message), ""
        if "Signal" not in text:
            text = "it exited before recording a Python error (e.g. while starting up); its output above says why"
    lines = [f"parallel={strategy}: rank {rank} of {nproc} failed (exit code {failure.exitcode}): {text}"]
    if trace:
        lines += ["", f"rank {rank} traceback:", trace.rstrip()]
    return "\n".join(lines)


def _worker(fn, cfg: DictConfig, run_dir: Path, job_logging: dict | None):
    """Entry point of one elastic worker: logging and CPU threads as for a torchrun rank, then the job."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and job_logging:
        logging.config.dictConfig(job_logging)  # Hydra's console + run_dir/<job>.log, as in the parent process
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    if "OMP_NUM_THREADS" not in os.environ:
        # Workers on one node share its cores; each taking all of them oversubscribes the CPU (torchrun sets 1).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return fn(cfg, run_dir)


def _job_logging_config() -> dict | None:
    """Hydra's resolved job logging config (console + file in the run dir), or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
    except ValueError:  # HydraConfig is not set: tests, notebooks
        return None


def _export_submitit_env() -> None:
    """In a submitit job with several tasks (hydra/launcher=slurm), make each task one rank for env:// init.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT (from
    the job id) from SLURM's variables; CUDA_VISIBLE_DEVICES is left alone (a bare `cuda` device picks the GPU).
    """
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
