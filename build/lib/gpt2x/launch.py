"""Starting the processes of a run: here, in local workers, or as one rank of torchrun / SLURM.

Three ways to get several processes, one code path once they run (`train(cfg, run_dir)` in each):

- `gpt2x-train parallel=ddp parallel.nproc_per_node=N`: `launch` starts N local workers with torch.distributed's
  elastic launcher (the API behind torchrun), so a Hydra multirun can hold a DDP rung like any other.
- `torchrun --nnodes=... --nproc_per_node=... -m gpt2x.train parallel=ddp ...`: torchrun already set RANK/WORLD_SIZE;
  `launch` runs the job in this process.
- `gpt2x-train -m hydra/launcher=slurm hydra.launcher.nodes=... hydra.launcher.tasks_per_node=...`: each SLURM task
  is one rank; `launch` turns submitit's job environment into RANK/WORLD_SIZE/MASTER_ADDR and runs the job here.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import os
import signal
import uuid
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("gpt2x")


def world_size_to_launch(cfg: DictConfig) -> int:
    """How many ranks this job will have: torchrun's/SLURM's WORLD_SIZE, else parallel.nproc_per_node (1 if single)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return 1 if cfg.parallel.name == "single" else cfg.parallel.nproc_per_node


class WorkerFailedError(RuntimeError):
    """A worker process of a multi-process run failed; the message holds the failing rank's error."""


def launch(fn, cfg: DictConfig, run_dir: Path):
    """Run `fn(cfg, run_dir)` as this job needs: here, or in parallel.nproc_per_node workers; returns rank 0's result.

    Here when parallel=single or when an outside launcher made this process one rank (torchrun, or a SLURM task of
    hydra/launcher=slurm); otherwise in workers started by torch's elastic launcher on 127.0.0.1. A worker that fails
    stops the others and raises WorkerFailedError with its rank, error and traceback.
    """
    export_submitit_env()
    n = cfg.parallel.nproc_per_node
    if cfg.parallel.name == "single" or "WORLD_SIZE" in os.environ:
        return fn(cfg, run_dir)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from gpt2x.run.record import export_hydra_info

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
    # elastic's agent logs each step of stopping workers as a warning; what failed, and how, is said once, here
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith("torch.distributed.elastic")]  # fmt: skip
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        results = elastic_launch(config, _worker)(fn, cfg, run_dir, _job_logging_config())
    except ChildFailedError as e:
        raise WorkerFailedError(describe_failure(e, cfg.parallel.name, n)) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
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
    try:
        return fn(cfg, run_dir)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal's group: the parent says it, once
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent's own SIGINT must not interrupt the exit itself
        raise SystemExit(130) from None


def _job_logging_config() -> dict | None:
    """Hydra's resolved job logging config (console + file in the run dir), or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
    except ValueError:  # HydraConfig is not set: tests, notebooks
        return None


def export_submitit_env() -> None:
    """In a submitit job with several tasks (hydra/launcher=slurm), make each task one rank for env:// init.

    Sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (the job's first node) and MASTER_PORT (from
    the job id) from SLURM's variables; CUDA_VISIBLE_DEVICES is left alone (a bare `cuda` device picks the GPU).
    """
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
