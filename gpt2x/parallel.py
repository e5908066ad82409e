"""Data parallelism: process-group setup and the transforms that wrap a built model (DDP, FSDP)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2x.config import ParallelConfig


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: ParallelConfig, device_type: str) -> DistInfo:
    """Join the process group when launched as one of several workers (RANK/WORLD_SIZE set by torchrun/elastic)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    if cfg.name == "single":
        raise ValueError(f"launched with WORLD_SIZE={world_size} but parallel=single; use parallel=ddp or parallel=fsdp")
    if not dist.is_initialized():
        backend = cfg.backend or ("nccl" if device_type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())


def apply_single(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device) -> nn.Module:
    return model


def apply_ddp(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap in DDP: gradients are all-reduced in buckets, overlapping with the backward pass."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


PARALLEL_STRATEGIES = {"single": apply_single, "ddp": apply_ddp}


def apply_parallel(model: nn.Module, cfg: ParallelConfig, info: DistInfo, device: torch.device) -> nn.Module:
    """Wrap the model for the configured strategy."""
    if cfg.name not in PARALLEL_STRATEGIES:
        raise ValueError(f"parallel={cfg.name!r} is unknown; valid: {', '.join(PARALLEL_STRATEGIES)}")
    return PARALLEL_STRATEGIES[cfg.name](model, cfg, info, device)


def maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation: one all-reduce per step."""
    if not sync and isinstance(model, DDP):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            t /= dist.get_world_size()
    return t


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(fn, cfg, run_dir):
    """Run `fn(cfg, run_dir)` here, or in parallel.nproc_per_node workers started by torch's elastic launcher."""
    n = cfg.parallel.nproc_per_node
    if n <= 1 or "WORLD_SIZE" in os.environ:  # single process, or already a worker of torchrun
        return fn(cfg, run_dir)
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"gpt2x-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        start_method="spawn",
    )
    return elastic_launch(config, fn)(cfg, run_dir)[0]
