"""gpt2x-train: the Hydra entry point and the training loop.

Reads top to bottom like build-nanogpt's train_gpt2.py: set up processes, device and precision, data, model,
compile, parallel wrap, optimizer, then the step loop with its micro-steps inline. Every choice comes from the
composed config (conf/config.yaml); each concern's code lives in its own module.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.api import SignalException

from gpt2x import launch
from gpt2x.config import CONFIG_PATH, is_due
from gpt2x.data import build_loader, prepare_dataset
from gpt2x.model.gpt import GPT
from gpt2x.model.hf import from_pretrained
from gpt2x.optim import build_optimizer, lr_scale
from gpt2x.run.checkpoint import Checkpointer, ResumeError
from gpt2x.run.logger import build_logger
from gpt2x.run.metrics import (
    StepTimer,
    device_name,
    flops_per_token,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    run_and_release,
)
from gpt2x.run.profile import build_profiler
from gpt2x.run.record import build_run_record, run_summary, write_run_record
from gpt2x.run.rundir import check_run_dir, last_logged_step, restore_hydra_config
from gpt2x.run.target import TargetTracker, objective_value
from gpt2x.sample import sample_texts
from gpt2x.speed import parallel
from gpt2x.speed.precision import apply_precision
from gpt2x.validate import grad_accum_steps, validate

log = logging.getLogger("gpt2x")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a bare `cuda` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name}: CUDA is not available here; use device=auto or device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())  # SLURM may show one GPU per task
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name}: MPS is not available here; use device=auto or device=cpu")
    return device


def build_model(cfg: DictConfig) -> GPT:
    """Random init at the configured size, or the weights of a transformers GPT-2 (model.init_from)."""
    m = cfg.model
    if m.init_from:
        return from_pretrained(m.init_from, cfg.attention.name, cfg.loss.name, vocab_size=m.vocab_size)
    return GPT(OmegaConf.to_object(m), cfg.attention.name, cfg.loss.name)


@torch.no_grad()
def evaluate(model, loader, steps: int, precision, device: torch.device) -> float:
    """Mean loss over `steps` val batches from the start of the val split, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with precision.autocast():
            _, loss = model(x.to(device), y.to(device), return_logits=False)
        total += loss.detach().float()
    model.train()
    return parallel.all_reduce_mean(total / steps).item()


def sample(model: GPT, cfg: DictConfig, precision, device: torch.device) -> list[str]:
    """A few top-k samples from a fixed seed, so the same checkpoint always prints the same text; under the run's
    autocast like training, so a kernel that exists only in bf16/fp16 (flash on CUDA) runs here too."""
    return sample_texts(
        model,
        cfg.sample_prompt,
        cfg.sample_count,
        cfg.sample_max_tokens,
        top_k=cfg.sample_top_k,
        seed=cfg.seed,
        device=device,
        autocast=precision.autocast,
    )


def host_to_device(*tensors: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Copy CPU batches to `device`; on CUDA through pinned memory, where a non_blocking copy is really asynchronous
    (from pageable memory it waits for the copy)."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one training job in this process (one rank of it under DDP/FSDP). Returns the run's summary."""
    # -- processes, device, precision
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = parallel.init_distributed(cfg.parallel, device)
    run_dir = parallel.shared_run_dir(run_dir, dist, device)  # torchrun ranks may each have made a dir
    validate(cfg, device, dist.world_size)
    precision = apply_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # same init on every rank
    reset_peak_memory(device)  # runs of one multirun share this process; each reports its own peak

    # -- data: each rank reads its own B*T windows of the same stream
    accum = grad_accum_steps(cfg, dist.world_size)
    train_loader, val_loader = build_loaders(cfg, dist)

    # -- model: build, then compile and wrap for data parallelism in the order each layout needs
    raw_model = build_model(cfg).to(device)
    model = parallel.parallelize(raw_model, cfg, device, precision.autocast_dtype)
    optimizer = build_optimizer(raw_model, cfg.optim, device.type)

    # -- resume, run record, logger: model, optimizer, data position and RNG continue where the checkpoint left them
    checkpointer = Checkpointer(run_dir, cfg, dist)
    start_step = checkpointer.resume(raw_model, optimizer, train_loader)
    timer, record = start_run_record(cfg, run_dir, dist, device, precision, raw_model, accum, checkpointer.resumed)
    logger = build_logger(cfg, run_dir, dist.is_main, start_step)
    profiler = build_profiler(cfg, run_dir, dist.is_main, device, start_step)  # profile=none: does nothing

    # training wall time (steps only) and the first eval at or below target_val_loss; continues across a resume
    target = TargetTracker(cfg.target_val_loss, timer.tokens_per_step, cfg.stop_at_target,
                           checkpointer.extras.get("target"))  # fmt: skip

    last_loss = val_loss = None
    max_steps = cfg.optim.max_steps
    for step in range(start_step, max_steps):
        last = step == max_steps - 1
        metrics = {}
        if is_due(step, cfg.eval_interval, last):
            t_eval = time.perf_counter()
            metrics["val_loss"] = val_loss = evaluate(model, val_loader, cfg.eval_steps, precision, device)
            metrics |= target.evaluated(step, val_loss, time.perf_counter() - t_eval)
            if target.should_stop:  # stop_at_target: the run ends here, before training this step
                logger.log(step, metrics)
                break
        if is_due(step, cfg.hellaswag_interval, last):
            # the eager model: every example has its own length, which would recompile a compiled one each time
            metrics["hellaswag"] = hellaswag_accuracy(raw_model, cfg, precision, device, dist)
        # Under FSDP a forward pass is a collective (it gathers the weights), so every rank samples; rank 0 logs.
        if is_due(step, cfg.sample_interval, last) and (dist.is_main or parallel.is_fsdp(raw_model)):
            logger.log_samples(step, sample(raw_model, cfg, precision, device))

        # -- one optimizer step over `accum` micro-batches
        profiler.begin_step()
        timer.start()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(accum):
            with profiler.region("data"):
                x, y = host_to_device(*train_loader.next_batch(), device=device)
            sync = micro_step == accum - 1
            with parallel.maybe_no_sync(model, sync=sync), precision.autocast(), profiler.region("forward"):
                _, loss = model(x, y, return_logits=False)  # only the loss: compiled, no logits are written out
            # The loss is a mean over one micro-batch; gradients add up over micro-steps, so divide to get the
            # gradient of the mean over the whole batch rather than the sum of `accum` means.
            loss = loss / accum
            loss_accum += loss.detach()
            with profiler.region("backward"):
                precision.scaler.scale(loss).backward()
        parallel.all_reduce_mean(loss_accum)
        with profiler.region("optimizer"):
            precision.scaler.unscale_(optimizer)
            grad_norm = parallel.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            scale = lr_scale(step, cfg.optim)
            for group in optimizer.param_groups:
                group["lr"] = scale * group["base_lr"]  # each group's own peak lr (optim=muon: several)
            lr = scale * cfg.optim.lr  # logged: the schedule at optim.lr, AdamW's peak
            precision.scaler.step(optimizer)
            precision.scaler.update()
        metrics |= timer.stop()
        profiler.end_step(metrics["ms_per_batch"])
        target.add_train_time(metrics["ms_per_batch"] / 1000)

        last_loss, norm = loss_accum.item(), grad_norm.item()
        check_finite(step, last_loss, norm, precision, checkpointer)
        metrics |= {"loss": last_loss, "lr": lr, "grad_norm": norm}
        if step % cfg.log_interval == 0 or last or "val_loss" in metrics:
            logger.log(step, metrics | {"peak_mem_bytes": peak_memory_bytes(device)})
        checkpointer.save_if_due(step, last, raw_model, optimizer, train_loader, target=target.state_dict())

    steps = target.reached["step_to_target"] if target.should_stop else max_steps
    results = {"steps": steps, "final_loss": last_loss, "final_val_loss": val_loss, **timer.summary(),
               **target.summary(), "peak_mem_bytes": peak_memory_bytes(device)}  # fmt: skip
    results |= profiler.finish(results)
    logger.log_files(profiler.files)  # trace and profile.md as a W&B artifact
    logger.finish(results)
    parallel.destroy()
    return run_summary(record, results)


def build_loaders(cfg: DictConfig, dist) -> tuple:
    """This rank's train and val loaders; under several ranks rank 0 tokenizes a cold cache once, the others wait."""
    if dist.world_size > 1:
        if dist.is_main:
            prepare_dataset(cfg.data)
        torch.distributed.barrier()
    return tuple(
        build_loader(cfg.data, split, rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
        for split in ("train", "val")
    )


def check_finite(step: int, loss: float, norm: float, precision, checkpointer: Checkpointer) -> None:
    """Stop on a NaN/inf loss (or gradient, unless loss scaling skips such steps) before it can be checkpointed."""
    if not math.isfinite(loss) or (not math.isfinite(norm) and not precision.scaler.is_enabled()):
        raise FloatingPointError(
            f"step {step}: loss={loss} grad_norm={norm} is not finite; stopping. The last good checkpoint "
            f"(if any) is in {checkpointer.dir}; lower optim.lr or try precision=fp32 / bf16."
        )


def start_run_record(cfg, run_dir: Path, dist, device, precision, raw_model, accum: int, resumed) -> tuple:
    """The step timer (with the MFU reference) and the run's record, written to record.json by rank 0."""
    B, T, world = cfg.data.batch_size, cfg.data.seq_len, dist.world_size
    # MFU reference: one device's peak. CPU workers share the cores, so a probe cached under other load would
    # misjudge them: they probe together, now.
    probe = "fresh" if device.type == "cpu" and world > 1 else cfg.peak_probe
    peak, peak_source = peak_flops(device, precision.compute_dtype, precision.uses_tf32, cfg.cache_dir, probe,
                                   cfg.peak_flops)  # fmt: skip
    facts = {
        "world_size": world,
        "grad_accum_steps": accum,
        "tokens_per_step": B * T * accum * world,
        "params": raw_model.num_params(non_embedding=False),
        "flops_per_token": flops_per_token(cfg.model, T),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "torch_device": str(device),
        "device_name": device_name(device),
        "rung": cfg.rung,
        "experiment": cfg.experiment,
        "config_choices": {k: cfg[k].name for k in ("model", "data", "precision", "attention", "loss", "compile",
                                                    "activation_checkpoint", "parallel")},  # fmt: skip
        "resumed": resumed,
    }
    timer = StepTimer(device, cfg.timing_warmup_steps, facts["tokens_per_step"], facts["flops_per_token"], peak, world)
    record = build_run_record(cfg, facts)
    if dist.is_main:
        write_run_record(cfg, run_dir, facts, record=record)  # the record built above, not a second one
        log.info(
            "model=%s (%.2fM params) data=%s B=%d T=%d accum=%d world=%d device=%s precision=%s attention=%s "
            "loss=%s compile=%s", cfg.model.name, facts["params"] / 1e6, cfg.data.name, B, T, accum, world, device,
            cfg.precision.name, cfg.attention.name, cfg.loss.name, cfg.compile.name,
        )  # fmt: skip
    return timer, record


def hellaswag_accuracy(model, cfg: DictConfig, precision, device: torch.device, dist_info) -> float:
    """HellaSwag acc_norm over the val set (or its first hellaswag_limit examples), split across ranks."""
    from gpt2x.evals import hellaswag

    path = cfg.hellaswag_path or hellaswag.download("val", Path(cfg.cache_dir).expanduser() / "hellaswag")
    correct, total = hellaswag.evaluate(
        model, path, device, precision.autocast, dist_info.rank, dist_info.world_size, cfg.hellaswag_limit
    )
    return correct / max(1, total)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: `gpt2x-train [group=choice ...] [key=value ...]`; returns the sweep objective (`objective`).

    Everything that can be refused is refused here, before any worker, data or model: settings (gpt2x.validate) and
    a run dir that holds another run. Ctrl-C ends the run with one line and exit code 130; its checkpoints stay usable.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    launch.export_submitit_env()
    validate(cfg, resolve_device(cfg.device), launch.world_size_to_launch(cfg))
    check_run_dir(run_dir, cfg.resume)
    try:
        # runs of a multirun share this process: free each job's model and optimizer before the next, even if it failed
        summary = run_and_release(launch.launch, train, cfg, run_dir)
    except ResumeError:
        restore_hydra_config(run_dir)  # the refused resume leaves the run's config as it was
        raise
    except (KeyboardInterrupt, SignalException) as e:
        step = last_logged_step(run_dir)
        why = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else f"signal {e.sigval.name}"
        print(f"gpt2x-train: interrupted ({why}) after step {step}; checkpoints in {run_dir / 'checkpoints'} are "
              "intact (continue with resume=auto)", file=sys.stderr)  # fmt: skip
        sys.exit(130)
    return objective_value(cfg, summary)


if __name__ == "__main__":
    # `python -m gpt2x.train` (torchrun's form): run the importable gpt2x.train.main rather than this __main__ copy,
    # because launchers that pickle the task function for other processes (submitit/SLURM) need to import it.
    from gpt2x.train import main as importable_main

    importable_main()
