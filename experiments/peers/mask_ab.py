"""Before/after of GPT.logits' padding mask: the -inf write recorded by autograd (before) or hidden from it (after).

Same model, same batch, the two forms taking turns step by step (bench_peers' loop), one thread, CPU time per step:

    python experiments/peers/mask_ab.py --modes fp32,bf16,bf16+compile --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_peers
import torch
from bench_peers import MODES, bench_one

from gpt2x.model.gpt import GPT


class RecordedMaskGPT(GPT):
    """GPT.logits as it was: autograd records the write, and its backward copies the whole (B, T, V) gradient."""

    def logits(self, x):
        logits = self.lm_head(x)
        logits[..., self.real_vocab_size :] = float("-inf")
        return logits


def build(kind: str, shape: tuple, vocab: int):
    model = _build("gpt2x", shape, vocab)
    if kind == "gpt2x_recorded_mask":
        model.model.__class__ = RecordedMaskGPT
    return model


_build, bench_peers.build = bench_peers.build, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="fp32,bf16,bf16+compile", help=f"of {', '.join(MODES)}")
    parser.add_argument("--shape", default="small")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kinds = ["gpt2x", "gpt2x_recorded_mask"]
    for mode in args.modes.split(","):
        per_round = bench_one(args.shape, 50304, mode, kinds, args.rounds, 1, 1, clock=time.process_time)
        med = {k: statistics.median(v) for k, v in per_round.items()}
        ratios = [a / b for a, b in zip(*per_round.values(), strict=True)]
        after, before = med["gpt2x"], med["gpt2x_recorded_mask"]
        print(f"{mode:14s} after {after:.0f} ms, before {before:.0f} ms, after/before {after / before:.3f} "
              f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
