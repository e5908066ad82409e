"""Activation checkpointing's price and payoff: peak memory and time per training step for each activation_checkpoint
choice, each in a fresh process (so each has its own peak), the choices taking turns for --rounds rounds.

A step is gpt2x's: the model built and parallelized from the composed config (activation checkpointing applied there),
then zero_grad, forward (loss only) under the precision's autocast, backward, AdamW. Peak memory is what gpt2x records
as peak_mem_bytes (on CPU the process's resident high-water mark, VmHWM); `above_start` is that peak minus the
resident size once model and optimizer state exist (after a first step), which is the activations' share. Time is the
process's CPU time per step (with one thread: the step's own compute, which a busy neighbour inflates far less than
wall time) and the wall time.

    python experiments/peers/bench_checkpointing.py   # 12 layers, d=384, B=4, T=512, fused loss, fp32, one thread
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHOICES = ["none", "selective", "full"]


def one(args) -> dict:
    """Train --steps steps with one activation_checkpoint choice in this process; its figures as a dict."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose

    from gpt2x.run.metrics import peak_memory_bytes, reset_peak_memory
    from gpt2x.speed import parallel
    from gpt2x.speed.precision import apply_precision
    from gpt2x.train import build_model, build_optimizer  # as the training loop imports them

    torch.set_num_threads(args.threads)
    overrides = [f"model={args.model}", *args.override, f"data.batch_size={args.batch}", f"data.seq_len={args.seq}",
                 f"loss={args.loss}", f"precision={args.precision}", f"activation_checkpoint={args.one}"]  # fmt: skip
    cfg = compose(overrides)
    device = torch.device("cpu")
    precision = apply_precision(cfg.precision, device)
    torch.manual_seed(0)
    raw = build_model(cfg)
    model = parallel.parallelize(raw, cfg, device, precision.autocast_dtype)
    optimizer = build_optimizer(raw, cfg.optim, device.type)
    x, y = torch.randint(0, 50257, (2, args.batch, args.seq)).unbind(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            _, loss = model(x, y, return_logits=False)
        loss.backward()
        optimizer.step()
        return loss.item()

    step()  # optimizer state and gradients now exist: what stays resident through training
    optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers: they count in every later step's peak
    start = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                     if line.startswith("VmRSS:"))) * 1024  # fmt: skip
    reset_peak_memory(device)
    cpu_ms, wall_ms, losses = [], [], []
    for _ in range(args.steps):
        c0, w0 = time.process_time(), time.perf_counter()
        losses.append(step())
        cpu_ms.append((time.process_time() - c0) * 1000)
        wall_ms.append((time.perf_counter() - w0) * 1000)
    peak = peak_memory_bytes(device)
    return dict(choice=args.one, peak_mem_bytes=peak, above_start=peak - start, cpu_ms=cpu_ms, wall_ms=wall_ms,
                losses=losses)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    size = ["model.n_layer=12", "model.n_head=6", "model.n_embd=384", "model.block_size=512"]
    parser.add_argument("--override", nargs="*", default=size, help="model overrides: the size measured")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--loss", default="fused", help="fused: no (B, T, V) logits held through the backward")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process, after one untimed step")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: the child process's choice
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = {c: [] for c in CHOICES}
    for r in range(args.rounds):
        for choice in CHOICES[r % 3 :] + CHOICES[: r % 3]:
            cmd = [sys.executable, __file__, "--one", choice] + [a for a in sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows[choice].append(json.loads(out))
            print(choice, rows[choice][-1], flush=True)
    print(f"\n{' '.join(sys.argv[1:]) or 'defaults'}; torch {__import__('torch').__version__}")
    print("| activation_checkpoint | peak_mem_bytes (MiB) | above start (MiB) | CPU ms/step | wall ms/step | loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for choice, runs in rows.items():
        mib = lambda key, runs=runs: statistics.median(r[key] for r in runs) / 2**20  # noqa: E731
        cpu = statistics.median(t for r in runs for t in r["cpu_ms"])
        wall = statistics.median(t for r in runs for t in r["wall_ms"])
        print(f"| {choice} | {mib('peak_mem_bytes'):.0f} | {mib('above_start'):.0f} | {cpu:.0f} | {wall:.0f} | "
              f"{runs[0]['losses'][-1]:.6f} |")  # fmt: skip


if __name__ == "__main__":
    main()
