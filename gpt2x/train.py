"""gpt2x-train: the Hydra entry point and the training loop.

Reads top to bottom like build-nanogpt's train_gpt2.py: set up processes, device and precision, data, model,
compile, parallel wrap, optimizer, then the step loop with its micro-steps inline. Every choice comes from the
composed config (conf/config.yaml); each concern's code lives in its own module.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gpt2x import checkpoint, parallel
from gpt2x.attention import check_attention
from gpt2x.compile import apply_compile, check_compile
from gpt2x.config import TrainConfig  # noqa: F401  (registers the schemas with Hydra's ConfigStore)
from gpt2x.data import build_loader, prepare_dataset
from gpt2x.logger import build_logger
from gpt2x.metrics import (
    check_peak_settings,
    device_name,
    flops_per_token,
    mfu,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    synchronize,
    timing_summary,
)
from gpt2x.model import GPT, GPTConfig
from gpt2x.optim import build_optimizer, lr_at
from gpt2x.precision import AUTOCAST_DTYPES, apply_precision, check_precision
from gpt2x.record import git_info, write_run_record
from gpt2x.sample import sample_texts
from gpt2x.target import TargetTracker, check_target_settings, objective_value

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
    """Cross-group rules, checked once before any work starts; each error names the settings involved."""
    if cfg.data.seq_len > cfg.model.block_size:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.block_size={cfg.model.block_size} "
            f"(model={cfg.model.name}); "
            f"use data.seq_len<={cfg.model.block_size}"
        )
    if cfg.data.batch_size < 1 or cfg.data.seq_len < 1:
        raise ValueError("data.batch_size and data.seq_len must be positive")
    if cfg.model.vocab_size < 50257:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than GPT-2's 50257 tokens")
    if cfg.model.n_embd % cfg.model.n_head:
        raise ValueError(f"model.n_embd={cfg.model.n_embd} is not divisible by model.n_head={cfg.model.n_head}")
    if cfg.optim.max_steps < 1:
        raise ValueError(f"optim.max_steps={cfg.optim.max_steps} must be at least 1")
    grad_accum_steps(cfg, world_size)
    check_precision(cfg.precision, device)
    dtype = AUTOCAST_DTYPES.get(cfg.precision.autocast_dtype, torch.float32)
    check_attention(cfg.attention.name, device, dtype, cfg.model.n_embd // cfg.model.n_head)
    check_compile(cfg.compile, device)
    check_peak_settings(cfg.peak_probe, cfg.peak_flops)
    check_target_settings(cfg)
    parallel.check_parallel(cfg.parallel, cfg.precision, device, world_size)


def build_model(cfg: DictConfig) -> GPT:
    """Random init at the configured size, or the weights of a transformers GPT-2 (model.init_from)."""
    if cfg.model.init_from:
        return GPT.from_pretrained(
            cfg.model.init_from,
            attention=cfg.attention.name,
            vocab_size=cfg.model.vocab_size,
            fused_ce=cfg.model.fused_ce,
        )
    return GPT(
        GPTConfig(
            block_size=cfg.model.block_size,
            vocab_size=cfg.model.vocab_size,
            n_layer=cfg.model.n_layer,
            n_head=cfg.model.n_head,
            n_embd=cfg.model.n_embd,
            attention=cfg.attention.name,
            fused_ce=cfg.model.fused_ce,
        )
    )


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


def sample(model: GPT, cfg: DictConfig, device: torch.device) -> list[str]:
    """A few top-k samples from a fixed seed, so the same checkpoint always prints the same text."""
    return sample_texts(
        model,
        cfg.sample_prompt,
        cfg.sample_count,
        cfg.sample_max_tokens,
        top_k=cfg.sample_top_k,
        seed=cfg.seed,
        device=device,
    )


def is_due(step: int, interval: int, last: bool) -> bool:
    return last or (interval > 0 and step > 0 and step % interval == 0)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one training job in this process (one rank of it under DDP/FSDP). Returns the summary."""
    # -- processes, device, precision
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = parallel.init_distributed(cfg.parallel, device)
    run_dir = parallel.shared_run_dir(run_dir, dist_info, device)  # torchrun ranks may each have made a dir
    rank, world_size = dist_info.rank, dist_info.world_size
    validate(cfg, device, world_size)
    precision = apply_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)  # same init on every rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reset_peak_memory(device)  # runs of one multirun share this process; each reports its own peak

    # -- data: each rank reads its own B*T windows of the same stream
    B, T = cfg.data.batch_size, cfg.data.seq_len
    accum = grad_accum_steps(cfg, world_size)
    if world_size > 1:  # rank 0 tokenizes a cold cache once; the others wait and then read it
        if dist_info.is_main:
            prepare_dataset(cfg.data)
        torch.distributed.barrier()
    train_loader = build_loader(cfg.data, "train", rank=rank, world_size=world_size, seed=cfg.seed)
    val_loader = build_loader(cfg.data, "val", rank=rank, world_size=world_size, seed=cfg.seed)

    # -- model: build, compile, then wrap for data parallelism (torchtitan's order)
    raw_model = build_model(cfg).to(device)
    model = apply_compile(raw_model, cfg.compile)
    model = parallel.apply_parallel(model, cfg.parallel, dist_info, device, precision.autocast_dtype)
    optimizer = build_optimizer(raw_model, cfg.optim, device.type)

    # -- bookkeeping: run record, logger, MFU reference
    tokens_per_step = B * T * accum * world_size
    flops_tok = flops_per_token(cfg.model, T)
    # MFU reference; peak_probe=fresh measures it right here, between the previous run of a multirun and this one.
    # CPU workers share the cores, so a probe cached under other load would misjudge them: they probe together, now.
    probe = "fresh" if device.type == "cpu" and world_size > 1 else cfg.peak_probe
    peak, peak_source = peak_flops(
        device, precision.compute_dtype, precision.uses_tf32, cfg.cache_dir, probe, cfg.peak_flops
    )
    peak *= world_size

    # -- resume: model, optimizer, data position and RNG continue exactly where the checkpoint left them
    ckpt_dir = run_dir / "checkpoints"
    start_step = 0
    resume_path = checkpoint.latest(ckpt_dir) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and resume_path is None and checkpoint.list_checkpoints(ckpt_dir):
        raise checkpoint.CheckpointError(
            f"resume=auto: every checkpoint in {ckpt_dir} is incomplete; pass resume=<path> or resume=null to restart"
        )
    if resume_path:
        state = checkpoint.load(resume_path)
        parallel.load_full_state_dicts(raw_model, optimizer, state["model"], state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        rngs = state["rng"]  # one per rank; resuming on more ranks than saved, the new ones start from rank 0's
        checkpoint.restore_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        start_step = state["step"] + 1
        log.info("resumed from %s at step %d", resume_path, start_step)

    logger = build_logger(cfg, run_dir, dist_info.is_main, start_step)
    if dist_info.is_main:
        write_run_record(
            cfg,
            run_dir,
            {
                "world_size": world_size,
                "grad_accum_steps": accum,
                "tokens_per_step": tokens_per_step,
                "params": raw_model.num_params(non_embedding=False),
                "flops_per_token": flops_tok,
                "peak_flops": peak,
                "peak_flops_source": peak_source,
                "torch_device": str(device),
            },
        )
        log.info(
            "model=%s (%.2fM params) data=%s B=%d T=%d accum=%d world=%d device=%s "
            "precision=%s attention=%s compile=%s",
            cfg.model.name, raw_model.num_params(non_embedding=False) / 1e6, cfg.data.name, B, T, accum, world_size,
            device, cfg.precision.name, cfg.attention.name, cfg.compile.name,
        )  # fmt: skip

    step_ms: list[float] = []  # timed steps; the first timing_warmup_steps (allocator warm-up, compile) go to warmup_ms
    warmup_ms: list[float] = []
    last_loss = val_loss = float("nan")
    max_steps = cfg.optim.max_steps
    # training wall time (steps only) and the first eval at or below target_val_loss; continues across a resume
    target = TargetTracker(
        cfg.target_val_loss, tokens_per_step, cfg.stop_at_target, state.get("target") if resume_path else None
    )
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
        if cfg.hellaswag_interval and is_due(step, cfg.hellaswag_interval, last):
            # the eager model: every example has its own length, which would recompile a compiled one each time
            metrics["hellaswag"] = hellaswag_accuracy(raw_model, cfg, precision, device, dist_info)
        # Under FSDP a forward pass is a collective (it gathers the weights), so every rank samples; rank 0 logs.
        if is_due(step, cfg.sample_interval, last) and (dist_info.is_main or parallel.is_fsdp(raw_model)):
            logger.log_samples(step, sample(raw_model, cfg, device))

        # -- one optimizer step over `accum` micro-batches
        synchronize(device)
        t0 = time.perf_counter()
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(accum):
            x, y = train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with parallel.maybe_no_sync(model, sync=micro_step == accum - 1), precision.autocast():
                _, loss = model(x, y, return_logits=False)  # only the loss: compiled, no logits are written out
            # The loss is a mean over one micro-batch; gradients add up over micro-steps, so divide to get the
            # gradient of the mean over the whole batch rather than the sum of `accum` means.
            loss = loss / accum
            loss_accum += loss.detach()
            precision.scaler.scale(loss).backward()
        parallel.all_reduce_mean(loss_accum)
        precision.scaler.unscale_(optimizer)
        grad_norm = parallel.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        lr = lr_at(step, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        precision.scaler.step(optimizer)
        precision.scaler.update()
        synchronize(device)
        dt = time.perf_counter() - t0
        target.add_train_time(dt)

        last_loss, norm = loss_accum.item(), grad_norm.item()
        if not math.isfinite(last_loss) or (not math.isfinite(norm) and not precision.scaler.is_enabled()):
            raise FloatingPointError(
                f"step {step}: loss={last_loss} grad_norm={norm} is not finite; stopping. The last good checkpoint "
                f"(if any) is in {ckpt_dir}; lower optim.lr or try precision=fp32 / bf16."
            )
        (step_ms if step - start_step >= cfg.timing_warmup_steps else warmup_ms).append(dt * 1000)
        tokens_per_sec = tokens_per_step / dt
        metrics |= {
            "loss": last_loss,
            "lr": lr,
            "grad_norm": norm,
            "ms_per_batch": dt * 1000,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu(flops_tok, tokens_per_sec, peak),
        }
        if step % cfg.log_interval == 0 or last or "val_loss" in metrics:
            metrics["peak_mem_bytes"] = peak_memory_bytes(device)
            logger.log(step, metrics)

        # after every checkpoint_interval completed steps: interval 10 saves steps 0-9 as step_000009.pt
        if cfg.checkpoint_interval > 0 and ((step + 1) % cfg.checkpoint_interval == 0 or last):
            save_checkpoint(ckpt_dir, step, raw_model, optimizer, train_loader, cfg, dist_info, target.state_dict())

    summary = {
        "steps": target.reached["step_to_target"] if target.should_stop else max_steps,
        "final_loss": last_loss,
        "final_val_loss": val_loss,
        **timing_summary(step_ms, tokens_per_step, flops_tok, peak, warmup_ms),
        **target.summary(),
        "peak_mem_bytes": peak_memory_bytes(device),
        "tokens_per_step": tokens_per_step,
        "grad_accum_steps": accum,
        "world_size": world_size,
        "device": str(device),
        "device_name": device_name(device),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "torch_version": torch.__version__,
        "git_commit": git_info().get("commit"),
        "config": {k: cfg[k].name for k in ("model", "data", "precision", "attention", "compile", "parallel")},
        "rung": cfg.rung,
        "experiment": cfg.experiment,
    }
    logger.finish(summary)
    parallel.destroy()
    return summary


def hellaswag_accuracy(model, cfg: DictConfig, precision, device: torch.device, dist_info) -> float:
    """HellaSwag acc_norm over the val set (or its first hellaswag_limit examples), split across ranks."""
    from gpt2x import hellaswag

    path = cfg.hellaswag_path or hellaswag.download("val", Path(cfg.cache_dir).expanduser() / "hellaswag")
    correct, total = hellaswag.evaluate(
        model, path, device, precision.autocast, dist_info.rank, dist_info.world_size, cfg.hellaswag_limit
    )
    return correct / max(1, total)


def save_checkpoint(
    ckpt_dir: Path, step: int, raw_model, optimizer, loader, cfg: DictConfig, dist_info, target_state=None
) -> None:
    """Everything needed to continue bit-exactly: weights, optimizer, schedule step, per-rank data position and RNG.

    `target_state` (TargetTracker.state_dict) carries the training time so far, so time to target survives a resume.
    """
    rngs = [checkpoint.capture_rng_state()]
    if dist_info.world_size > 1:
        rngs = [None] * dist_info.world_size
        torch.distributed.all_gather_object(rngs, checkpoint.capture_rng_state())
    model_state, optimizer_state = parallel.full_state_dicts(raw_model, optimizer)  # FSDP: gathers to rank 0
    if dist_info.is_main:
        state = {
            "model": model_state,
            "optimizer": optimizer_state,
            "step": step,
            "loader": loader.state_dict(),  # the stream position, shared by all ranks
            "rng": rngs,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "target": target_state,
        }
        checkpoint.save(ckpt_dir, step, state, keep=cfg.keep_checkpoints)


# conf/ sits beside the package (the repo layout); an absolute path works for editable installs and `python -m`.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: `gpt2x-train [group=choice ...] [key=value ...]`; returns the `objective` for sweepers."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    summary = parallel.launch(train, cfg, run_dir)
    return objective_value(cfg, summary)


if __name__ == "__main__":
    # `python -m gpt2x.train` (torchrun's form): run the importable gpt2x.train.main rather than this __main__ copy,
    # because launchers that pickle the task function for other processes (submitit/SLURM) need to import it.
    from gpt2x.train import main as importable_main

    importable_main()
