"""gpt2x's model and training step against its peers, mode by mode, on one shared loop.

Three models of the same GPT-2 shape train on the same batch with the same loop (zero_grad, forward under the mode's
autocast, backward, AdamW step):
  gpt2x         - gpt2x.model.gpt.GPT, called as its training loop calls it: model(x, y, return_logits=False)
  transformers  - transformers' GPT2LMHeadModel (random init from a GPT2Config, sdpa attention, no dropout), its own
                  loss (labels=x: it shifts them itself, so the task is the same next-token prediction)
  reference     - `ReferenceGPT` below: GPT-2 written for this benchmark from the published architecture (pre-LN blocks,
                  fused qkv projection, causal sdpa, tanh GELU, tied output layer); padding columns left unmasked, as
                  nanoGPT / build-nanogpt leave them
Every model is timed through a loss-only callable (compiled, no logits are written out as a graph output), the
strongest form of each peer. Modes are the optimization ladder's (conf/rung/): fp32, tf32, bf16, bf16+compile,
bf16+compile+fused AdamW. Models take turns step-batch by step-batch in rotating order (A B C, B C A, ...), warm-up
(and compilation) left out; the figure is the median ms per step over all rounds, the spread the min and max of the
per-round medians.

    python experiments/peers/bench_peers.py                                     # both shapes, every mode, both vocabs
    python experiments/peers/bench_peers.py --shapes small --modes bf16 --vocabs 50304 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

N_VOCAB = 50257  # GPT-2's real vocabulary; 50304 pads it to a multiple of 128
SHAPES = {  # name -> (n_layer, n_head, n_embd, T, B)
    "small": (4, 4, 256, 256, 8),
    "mid": (6, 6, 384, 256, 8),
}
# mode -> (autocast dtype, float32 matmul precision, compile, fused AdamW): the ladder's rungs fp32 .. fused_adamw
MODES = {
    "fp32": (None, "highest", False, False),
    "tf32": (None, "high", False, False),
    "bf16": (torch.bfloat16, "highest", False, False),
    "bf16+compile": (torch.bfloat16, "highest", True, False),
    "bf16+compile+fused": (torch.bfloat16, "highest", True, True),
}


# -- the reference: GPT-2 from the paper's description, written for this benchmark ---------------------------------


class RefAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h):
        b, t, w = h.shape
        # (b, t, 3w) -> three (b, nh, t, hs)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in self.qkv(h).chunk(3, dim=-1))
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w))


class RefBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = RefAttention(width, heads)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, h):
        h = h + self.attn(self.norm1(h))
        return h + self.down(F.gelu(self.up(self.norm2(h)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """Pre-LN decoder-only transformer with learned positions and the output layer tied to the token embedding."""

    def __init__(self, layers: int, heads: int, width: int, context: int, vocab: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(RefBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # residual-branch outputs scaled down by depth, as GPT-2 does
                scale = 1 / math.sqrt(2 * layers) if name.endswith(("attn.out.weight", "down.weight")) else 1
                nn.init.normal_(p, std=0.02 * scale)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        h = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- the three models as loss-only callables ------------------------------------------------------------------------


class LossOnly(nn.Module):
    """forward(x, y) -> the mean cross-entropy, the way each model is trained."""

    def __init__(self, kind: str, model: nn.Module):
        super().__init__()
        self.kind, self.model = kind, model

    def forward(self, x, y):
        if self.kind.startswith("gpt2x"):
            return self.model(x, y, return_logits=False)[1]
        if self.kind == "transformers":
            return self.model(input_ids=x, labels=x, use_cache=False).loss
        return self.model(x, y)


def build(kind: str, shape: tuple, vocab: int) -> nn.Module:
    layers, heads, width, context, _ = shape
    if kind == "gpt2x":
        from gpt2x.config import ModelConfig
        from gpt2x.model.gpt import GPT

        config = ModelConfig(name="bench", n_layer=layers, n_head=heads, n_embd=width, block_size=context,
                             vocab_size=vocab)  # fmt: skip
        return LossOnly(kind, GPT(config, attention="sdpa", loss="plain", real_vocab_size=N_VOCAB))
    if kind == "transformers":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            tie_word_embeddings=True, attn_implementation="sdpa")  # fmt: skip
        return LossOnly(kind, GPT2LMHeadModel(config))
    return LossOnly(kind, ReferenceGPT(layers, heads, width, context, vocab))


def optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused)


def bench_one(shape_name: str, vocab: int, mode: str, kinds: list[str], rounds: int, steps: int, warmup: int,
              clock=time.perf_counter):
    """ms per step of each model, round by round: {kind: [per-round median ms]}. `clock`: wall or process CPU time."""
    dtype, matmul_precision, compiled, fused = MODES[mode]
    shape = SHAPES[shape_name]
    torch.set_float32_matmul_precision(matmul_precision)
    torch._dynamo.reset()  # a fresh recompile budget for this setting's graphs
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, N_VOCAB, (shape[4], shape[3]), generator=g)  # (B, T)
    y = torch.randint(0, N_VOCAB, (shape[4], shape[3]), generator=g)
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = build(kind, shape, vocab)
        runs[kind] = (torch.compile(model) if compiled else model, optimizer(model, fused))

    def step(kind):
        model, opt = runs[kind]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(x, y)
        loss.backward()
        opt.step()
        return loss

    for kind in kinds:  # warm-up: compilation, allocator, first optimizer step (state allocation)
        for _ in range(warmup):
            step(kind).item()
    per_round = {kind: [] for kind in kinds}
    for r in range(rounds):
        for kind in kinds[r % len(kinds) :] + kinds[: r % len(kinds)]:  # rotate: no model always goes first
            times = []
            for _ in range(steps):
                t0 = clock()
                step(kind).item()
                times.append((clock() - t0) * 1000)
            per_round[kind].append(statistics.median(times))
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="small,mid", help=f"comma-separated, of {', '.join(SHAPES)}")
    default_modes = [m for m in MODES if m != "tf32"]  # tf32 is fp32 on CPU: no TF32 units, same kernels
    parser.add_argument("--modes", default=",".join(default_modes), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--vocabs", default="50257,50304")
    parser.add_argument("--models", default="gpt2x,transformers,reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the first round")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's choice")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter; cpu: the process's CPU time, which a busy neighbour inflates far "
                        "less than wall time (with --threads 1 it is the step's own compute)")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per setting here")
    args = parser.parse_args()

    kinds = args.models.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, load average "
          f"{os.getloadavg()}", flush=True)
    for shape_name in args.shapes.split(","):
        for mode in args.modes.split(","):
            for vocab in map(int, args.vocabs.split(",")):
                load = os.getloadavg()[0]
                per_round = bench_one(shape_name, vocab, mode, kinds, args.rounds, args.steps, args.warmup, clock)
                med = {k: statistics.median(v) for k, v in per_round.items()}
                peers = {k: v for k, v in med.items() if k != "gpt2x"}
                fastest = min(peers, key=peers.get) if peers else None
                row = dict(shape=shape_name, mode=mode, vocab=vocab, median_ms=med, per_round_ms=per_round,
                           fastest_peer=fastest, load_before=load, load_after=os.getloadavg()[0])  # fmt: skip
                if fastest:
                    row["ratio"] = med["gpt2x"] / med[fastest]
                    # the same round's times side by side: the spread of the ratio that a drifting machine leaves
                    pairs = zip(per_round["gpt2x"], per_round[fastest], strict=True)
                    row["round_ratios"] = [a / b for a, b in pairs]
                rows.append(row)
                cells = "  ".join(f"{k} {med[k]:7.1f} ({min(v):.0f}-{max(v):.0f})" for k, v in per_round.items())
                ratio = (f"  gpt2x/{fastest} {row['ratio']:.3f} (rounds {min(row['round_ratios']):.3f}-"
                         f"{max(row['round_ratios']):.3f})" if fastest else "")  # fmt: skip
                print(f"{shape_name:5s} {mode:19s} V={vocab}  {cells}{ratio}  load {load:.1f}", flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")

    print(f"\n| shape | mode | vocab | {' | '.join(kinds)} | gpt2x / fastest peer | per round |")
    print("|---|---|---:|" + "---:|" * len(kinds) + "---:|---:|")
    for row in rows:
        cells = " | ".join(f"{row['median_ms'][k]:.0f}" for k in kinds)
        if row.get("fastest_peer"):
            r = row["round_ratios"]
            ratio = f"{row['ratio']:.3f} ({row['fastest_peer']}) | {min(r):.2f}-{max(r):.2f}"
        else:
            ratio = "- | -"
        print(f"| {row['shape']} | {row['mode']} | {row['vocab']} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
