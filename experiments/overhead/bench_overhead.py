"""How much does gpt2x cost over a bare PyTorch loop, and how does it compare with transformers' GPT-2?

Three ways to train the same GPT-2 shape on the same batches with the same settings, in one process:
  gpt2x  - gpt2x.train.train(cfg, run_dir): the real framework loop (logging, metrics, schedule, clipping, ...)
  bare   - the same gpt2x.model.gpt.GPT in a hand-written loop: next_batch, forward, backward, clip, AdamW step
  hf     - transformers' GPT2LMHeadModel (attn_implementation="sdpa") in that same hand-written loop
The variants take turns for --rounds rounds, in rotating order (so a busy neighbour slows all of them alike), each
round a fresh model trained for --steps optimizer steps. The first --warmup steps of every round are dropped
(allocator warm-up, compilation), and the figure per variant is the median ms per optimizer step over all the rest.

    python experiments/overhead/bench_overhead.py                       # fp32 eager, the CPU default
    python experiments/overhead/bench_overhead.py --compile             # gpt2x and bare compiled, hf eager and compiled
    python experiments/overhead/bench_overhead.py --model gpt2 --batch 16 --seq 1024 --precision bf16 --device cuda

Targets: gpt2x within 3% of bare; gpt2x no slower than hf at fp32 eager, faster with compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # conftest.compose: the real composed config


def compose_cfg(args):
    from conftest import compose

    overrides = [
        f"model={args.model}", f"data.batch_size={args.batch}", f"data.seq_len={args.seq}",
        f"optim.max_steps={args.steps}", f"optim.warmup_steps={max(1, args.steps // 5)}",
        f"timing_warmup_steps={args.warmup}", f"precision={args.precision}", f"attention={args.attention}",
        f"compile={'default' if args.compile else 'none'}", f"device={args.device}",
        "eval_interval=0", "eval_steps=1", "sample_interval=0", "sample_max_tokens=1", "sample_count=1",
        "peak_flops=1e12", "log_interval=1",  # no probe (only ms/batch is compared); every step's ms in metrics.jsonl
    ]  # fmt: skip
    return compose(overrides)


def run_gpt2x(cfg, workdir: Path) -> list[float]:
    """One gpt2x run; its post-warm-up step times from metrics.jsonl (what its summary's median is taken over)."""
    from gpt2x.train import train

    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    train(cfg, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["ms_per_batch"] for r in rows if "ms_per_batch" in r][cfg.timing_warmup_steps :]


def run_bare(cfg, make_model, compile_model: bool) -> list[float]:
    """The minimal loop over the same batches: what any training script has to do, nothing more."""
    from gpt2x.data import build_loader
    from gpt2x.run.metrics import synchronize
    from gpt2x.train import resolve_device

    device = resolve_device(cfg.device)
    torch.set_float32_matmul_precision(cfg.precision.matmul_precision)
    torch.manual_seed(cfg.seed)
    model = make_model().to(device)
    if compile_model:
        torch._dynamo.reset()  # as gpt2x.speed.compile does: a fresh recompile budget for each round
    step_model = torch.compile(model) if compile_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), fused=False)
    loader = build_loader(cfg.data, "train", seed=cfg.seed)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.precision.autocast_dtype)
    times = []
    for _ in range(cfg.optim.max_steps):
        synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step_model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1000)
        loss.item()
    return times[cfg.timing_warmup_steps :]


class WithLoss(torch.nn.Module):
    """forward(x, y) -> mean cross-entropy, so that torch.compile sees the loss too, as it does in GPT.forward."""

    def __init__(self, lm: torch.nn.Module, hf: bool):
        super().__init__()
        self.lm, self.hf = lm, hf

    def forward(self, x, y):
        if not self.hf:
            return self.lm(x, y)[1]
        logits = self.lm(input_ids=x).logits  # (B, T, V); HF's own `labels=` would shift y once more
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))


def gpt2x_model(cfg):
    from gpt2x.train import build_model

    return lambda: WithLoss(build_model(cfg), hf=False)


def hf_model(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=50257, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )  # fmt: skip
    return lambda: WithLoss(GPT2LMHeadModel(config), hf=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per round, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="steps per round left out of the timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--attention", default="sdpa", help="gpt2x/bare kernel; hf always runs its sdpa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile gpt2x and bare; time hf eager and compiled")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    cfg = compose_cfg(args)
    variants = {
        "gpt2x": lambda work: run_gpt2x(cfg.copy(), work),
        "bare": lambda work: run_bare(cfg, gpt2x_model(cfg), args.compile),
        "hf": lambda work: run_bare(cfg, hf_model(cfg), False),
    }
    if args.compile:
        variants["hf_compiled"] = lambda work: run_bare(cfg, hf_model(cfg), True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as work:
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate: no variant always goes first
                times[name] += variants[name](Path(work))
                print(f"round {r}: {name:12s} median so far {statistics.median(times[name]):8.1f} ms", flush=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    setting = f"model={args.model} B={args.batch} T={args.seq} precision={args.precision} attention={args.attention}"
    print(f"\n{setting} compile={args.compile} device={args.device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    print(f"{'variant':12s} {'median ms':>10s} {'p10':>8s} {'p90':>8s} {'steps':>6s} {'gpt2x / this':>13s}")
    for name, t in times.items():
        q = statistics.quantiles(t, n=10)
        print(f"{name:12s} {med[name]:10.1f} {q[0]:8.1f} {q[-1]:8.1f} {len(t):6d} {med['gpt2x'] / med[name]:13.3f}")
    print(f"\ngpt2x overhead over bare: {100 * (med['gpt2x'] / med['bare'] - 1):+.1f}% (target <= +3%)")
    print(f"gpt2x vs transformers GPT2LMHeadModel (sdpa, eager): {med['hf'] / med['gpt2x']:.2f}x faster")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "median_ms": med,
                                        "times_ms": times, "torch": torch.__version__}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
