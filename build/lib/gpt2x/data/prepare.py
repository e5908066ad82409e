"""`gpt2x-prepare`: tokenize FineWeb-Edu (or any `datasets` text source) into token shards for data=fineweb_edu.

    gpt2x-prepare --out ~/.cache/gpt2x/data/fineweb_edu                  # FineWeb-Edu sample-10BT, ~10B tokens
    gpt2x-prepare --source json --data-files docs.jsonl --out DIR --shard-size 1000000 --num-proc 8

Rerunning the same command after an interruption continues from the last finished shard.
"""

import argparse
import os

from gpt2x.data.fineweb import DEFAULT_NAME, DEFAULT_SHARD_SIZE, DEFAULT_SOURCE, prepare_fineweb


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of gpt2x-prepare."""
    parser = argparse.ArgumentParser(
        prog="gpt2x-prepare",
        description="Tokenize a `datasets` text source with GPT-2's tokenizer into uint16 shards: val_000000.npy, "
        "then train_000001.npy, ... Resumable: rerun the same command to continue.",
    )
    parser.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help=f"datasets.load_dataset path or builder (json, parquet, text, a hub id); default {DEFAULT_SOURCE}",
    )
    parser.add_argument(
        "--name",
        default=None,
        help=f"dataset config name; default {DEFAULT_NAME} for {DEFAULT_SOURCE}, else none (pass --name '' for none)",
    )
    parser.add_argument("--split", default="train", help="split to read (default train)")
    parser.add_argument("--data-files", nargs="+", default=None, help="local files for --source json/parquet/text")
    parser.add_argument("--text-field", default="text", help="column holding the document text (default text)")
    parser.add_argument("--out", required=True, help="output directory for the shards (data.path)")
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"tokens per shard (default {DEFAULT_SHARD_SIZE})"
    )
    parser.add_argument(
        "--num-proc", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="tokenizer worker processes"
    )
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (quick trials)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gpt2x-prepare`."""
    args = build_parser().parse_args(argv)
    name = args.name
    if name is None:
        name = DEFAULT_NAME if args.source == DEFAULT_SOURCE else None
    out = prepare_fineweb(
        source=args.source,
        name=name or None,
        split=args.split,
        out_dir=args.out,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        text_field=args.text_field,
        data_files=args.data_files,
        max_docs=args.max_docs,
    )
    print(f"shards ready in {out}")


if __name__ == "__main__":
    main()
