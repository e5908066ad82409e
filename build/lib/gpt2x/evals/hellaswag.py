"""HellaSwag in completion style (build-nanogpt hellaswag.py): pick the ending the model finds least surprising.

Each example is a context and 4 endings. We score context + " " + ending for all 4 rows at once and predict the row
with the lowest mean cross entropy over the ending tokens (acc_norm; the mean removes the bias towards short
endings). GPT-2 124M scores ~0.2955 on the 10,042 val examples this way; random is 0.25.

    python -m gpt2x.evals.hellaswag --split val --cache-dir ~/.cache/gpt2x/hellaswag   # download once (needs internet)
"""

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gpt2x.data.tokenizer import gpt2_encoding

URLS = {
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "test": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_test.jsonl",
}


def download(split: str = "val", cache_dir: str | os.PathLike = ".") -> Path:
    """Download hellaswag_{split}.jsonl into `cache_dir` once and return its path."""
    if split not in URLS:
        raise ValueError(f"HellaSwag split={split!r} is not one of {sorted(URLS)}")
    path = Path(cache_dir).expanduser() / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {URLS[split]} to {path}")
    # a temp file, then a rename: never a half-downloaded file under the final name (several ranks may download)
    torch.hub.download_url_to_file(URLS[split], str(path), progress=False)
    return path


def iterate_examples(path: str | os.PathLike) -> Iterator[dict]:
    """The examples of a HellaSwag jsonl file, one dict per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"HellaSwag file {path} does not exist; set hellaswag_path to a hellaswag_val.jsonl, or "
            "hellaswag_path=null to download it into cache_dir "
            "(or run `python -m gpt2x.evals.hellaswag --cache-dir DIR`)"
        )
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def render_example(example: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tokens (4, L) long, mask (4, L) long, label): row i is context + " " + ending i, right-padded with 0;
    mask is 1 on the ending's tokens, where the likelihood is measured."""
    enc = gpt2_encoding()
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode_ordinary(" " + ending)  # the space belongs to the ending's first GPT-2 token
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
    length = max(len(row) for row in rows)
    tokens = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row, row_mask) in enumerate(zip(rows, masks, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row_mask)] = torch.tensor(row_mask)
    return tokens, mask, int(example["label"])


def most_likely_row(tokens: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> int:
    """The row whose ending tokens have the lowest mean cross entropy under `logits` (4, L, V)."""
    shift_logits = logits[..., :-1, :].float()  # position t predicts token t + 1
    shift_tokens = tokens[..., 1:]
    losses = F.cross_entropy(shift_logits.flatten(0, 1), shift_tokens.flatten(), reduction="none")
    losses = losses.view(tokens.size(0), -1)  # (4, L - 1)
    shift_mask = mask[..., 1:]  # the first ending token is predicted from the last context position
    avg_loss = (losses * shift_mask).sum(dim=1) / shift_mask.sum(dim=1)
    return int(avg_loss.argmin().item())


@torch.no_grad()
def evaluate(
    model,
    path: str | os.PathLike,
    device,
    autocast_ctx=contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> tuple[int, int]:
    """(num_correct_norm, num_total) over the first `limit` examples (all if None), summed over ranks.

    `model(idx)` must return (logits, loss). Rank r scores examples r, r + world_size, ...; when torch.distributed is
    initialized the counts are all-reduced, so every rank returns the totals. Every rank runs the same number of
    forward passes (a rank without an example left repeats one uncounted), so sharded models never wait on a
    collective. `autocast_ctx()` wraps each forward (e.g. bf16 autocast). Pass the uncompiled model: the examples
    all have different lengths, and a compiled one would recompile for each.
    """
    examples = list(iterate_examples(path))[:limit]
    if not examples:
        raise ValueError(f"HellaSwag file {path} holds no examples (hellaswag_path, hellaswag_limit={limit})")
    config = getattr(model, "config", None)  # gpt2x GPT (also through torch.compile); None for other models
    block_size = getattr(config, "block_size", None)
    was_training = model.training
    model.eval()
    num_correct_norm = num_total = 0
    per_rank = -(-len(examples) // world_size)  # ceil: the busiest rank's share
    for j in range(per_rank):
        i = rank + j * world_size
        counted = i < len(examples)
        tokens, mask, label = render_example(examples[i if counted else rank % len(examples)])
        if block_size is not None and tokens.size(1) > block_size:
            # keep the endings and the context nearest them: only the earliest context tokens are dropped
            tokens, mask = tokens[:, -block_size:], mask[:, -block_size:]
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast_ctx():
            logits, _ = model(tokens)
        if counted:
            num_correct_norm += int(most_likely_row(tokens, mask, logits) == label)
            num_total += 1
    model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([num_correct_norm, num_total], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        num_correct_norm, num_total = (int(c) for c in counts.tolist())
    return num_correct_norm, num_total


def main(argv: list[str] | None = None) -> None:
    """Download a HellaSwag split: `python -m gpt2x.evals.hellaswag --split val --cache-dir DIR`."""
    parser = argparse.ArgumentParser(description="Download a HellaSwag split for hellaswag_path.")
    parser.add_argument("--split", default="val", choices=sorted(URLS))
    parser.add_argument("--cache-dir", default=".", help="the file goes to <cache-dir>/hellaswag_<split>.jsonl")
    args = parser.parse_args(argv)
    print(download(args.split, args.cache_dir))


if __name__ == "__main__":
    main()
