"""Token shards on disk and the loader that streams (x, y) batches out of them.

A prepared dataset is a directory of uint16 `.npy` shards, `train_000000.npy, ...` and `val_000000.npy, ...`
(GPT-2's 50257 ids fit in 16 bits, half the disk and memory of int32). `prepare_token_shards` tokenizes documents
into such a directory, cached by content; `ShardLoader` walks the shards like build-nanogpt's DataLoaderLite.

The directory's manifest (`meta.json` for cached corpora, `manifest.json` for gpt2x-prepare's shards) records the
sha256 of every shard under "shard_sha256". The loader checks a shard against it, and checks that its ids are in
GPT-2's vocabulary, when the shard is first opened in a run: a corrupted or swapped shard stops the run naming it,
instead of training silently on wrong tokens or failing later in the embedding.
"""

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gpt2x.data.tokenizer import EOT, N_VOCAB, gpt2_encoding

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CHECKSUMS = "shard_sha256"  # manifest key: {shard file name: sha256 of its bytes}
MANIFESTS = ("manifest.json", "meta.json")  # gpt2x-prepare's, prepare_token_shards'


def write_shard(path: str | os.PathLike, tokens) -> str:
    """Save `tokens` as a 1-D uint16 .npy file, atomically (a crash never leaves a half-written shard).

    Returns the sha256 of the file, for the directory's manifest.
    """
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D token sequence, got shape {tokens.shape} for {path}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(
            f"token ids must be in [0, 65536) to be stored as uint16 in {path}; got range "
            f"[{tokens.min()}, {tokens.max()}]"
        )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:  # a file object, because np.save(str) would append ".npy" to the tmp name
        np.save(f, tokens.astype(np.uint16))
    digest = file_sha256(tmp)
    os.replace(tmp, path)
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (a 100M-token shard is 200 MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(directory: str | os.PathLike) -> tuple[Path | None, dict[str, str] | None]:
    """The shard directory's manifest and its {shard name: sha256}; (None, None) without a manifest and
    (manifest, None) for one written before gpt2x recorded checksums."""
    for name in MANIFESTS:
        path = Path(directory) / name
        if path.is_file():
            return path, json.loads(path.read_text()).get(CHECKSUMS)
    return None, None


def check_shard(path: Path, tokens: np.ndarray, manifest: Path | None, checksums: dict[str, str] | None) -> None:
    """Fail naming `path` if it is not the shard its manifest recorded, or holds ids outside GPT-2's vocabulary."""
    if checksums is not None:
        fix = (
            f"delete {path.parent} and it is tokenized again"
            if manifest.name == "meta.json"
            else f"restore it, or rerun gpt2x-prepare with the settings in {manifest} into a new --out"
        )
        if path.name not in checksums:
            raise ValueError(f"token shard {path} is not listed in {manifest}, so it was not written with the others; "
                             f"remove it, or {fix}")  # fmt: skip
        actual = file_sha256(path)
        if actual != checksums[path.name]:
            raise ValueError(
                f"token shard {path} has sha256 {actual}, but {manifest} records {checksums[path.name]}: the file "
                f"was corrupted or swapped for another since it was written; {fix}"
            )
    if tokens.size and (top := int(tokens.max())) >= N_VOCAB:
        raise ValueError(
            f"token shard {path} holds token id {top} at position {int(tokens.argmax())}, outside GPT-2's vocabulary "
            f"(ids < {N_VOCAB}); it is corrupted or was made with another tokenizer"
        )


def load_shard(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Load a shard written by `write_shard` (memory-mapped if `mmap`), failing with the path if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token shard {path} does not exist; delete its cache directory and prepare again")
    try:
        tokens = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError or EOFError depending on how the file is damaged
        raise ValueError(
            f"token shard {path} is corrupt ({type(e).__name__}: {e}); delete its cache directory and prepare again"
        ) from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(
            f"token shard {path} holds {tokens.dtype} of shape {tokens.shape}; expected a 1-D uint16 array "
            "as written by gpt2x.data.shards.write_shard"
        )
    return tokens


def shard_paths(directory: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split in a prepared directory, in order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    paths = sorted(Path(directory).glob(f"{split}_*.npy"))
    if not paths:
        raise FileNotFoundError(f"no {split}_*.npy shards in {directory}; delete that directory and prepare again")
    return paths


def write_split_shards(directory: Path, split: str, tokens: np.ndarray, shard_size: int) -> dict[str, str]:
    """Cut one split into `<split>_NNNNNN.npy` shards of `shard_size` tokens, the last one taking the remainder.
    Returns {shard name: sha256}.

    Folding the remainder into the last shard (instead of writing a short one) keeps every shard at least
    `shard_size` long, so one batch window fits in any shard whenever it fits in the first.
    """
    n_shards = max(1, len(tokens) // shard_size)
    checksums = {}
    for i in range(n_shards):
        end = (i + 1) * shard_size if i < n_shards - 1 else len(tokens)
        name = f"{split}_{i:06d}.npy"
        checksums[name] = write_shard(directory / name, tokens[i * shard_size : end])
    return checksums


def cache_key(*parts) -> str:
    """A short, stable hash of `parts` (strings/bytes/numbers) naming a cache directory."""
    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed, so ("ab", "c") != ("a", "bc")
        h.update(data)
    return h.hexdigest()[:16]


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Rename the fully written `tmp` dir to `final`; if another process (a DDP rank) got there first, keep theirs.

    A `final` made before shards had checksums is replaced (moved aside, then deleted).
    """
    manifest, checksums = read_checksums(final)
    if manifest is not None and checksums is None:
        old = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        except FileNotFoundError:  # another process moved it aside first
            pass
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def prepare_token_shards(cfg, documents: Sequence[str]) -> Path:
    """Tokenize `documents` (EOT between them) into `<cache_dir>/<name>/<hash>/{train,val}_NNNNNN.npy`, once.

    The hash covers the text, the tokenizer, data.val_fraction and data.shard_size, so changing any of them makes a
    new cache and an unchanged config reuses the old one without tokenizing. Val is the last data.val_fraction of
    the token stream (as in nanoGPT's shakespeare), train the rest.
    """
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1): both splits need tokens")
    if cfg.shard_size < 1:
        raise ValueError(f"data.shard_size={cfg.shard_size} must be a positive number of tokens")
    enc = gpt2_encoding()
    text_hash = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        text_hash.update(len(data).to_bytes(8, "little"))
        text_hash.update(data)
    final = Path(cfg.cache_dir) / cfg.name / cache_key(text_hash.digest(), enc.name, cfg.val_fraction, cfg.shard_size)
    if final.is_dir():
        if read_checksums(final)[1] is not None:
            return final
        log.info("re-tokenizing %s: it was cached before shards had checksums", final)

    stream: list[int] = []
    for i, ids in enumerate(enc.encode_ordinary_batch(list(documents))):
        if i:
            stream.append(EOT)  # marks the document boundary, as in GPT-2's training data
        stream.extend(ids)
    tokens = np.asarray(stream, dtype=np.uint16)
    n_val = int(len(tokens) * cfg.val_fraction)
    if n_val == 0 or n_val == len(tokens):
        raise ValueError(
            f"data={cfg.name} has {len(tokens)} tokens: data.val_fraction={cfg.val_fraction} leaves an empty "
            f"{'val' if n_val == 0 else 'train'} split; use more text or change data.val_fraction"
        )

    # Write into a private tmp dir and rename it at the end, so a crash never leaves a half-filled cache behind.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        checksums = write_split_shards(tmp, "train", tokens[:-n_val], cfg.shard_size)
        checksums |= write_split_shards(tmp, "val", tokens[-n_val:], cfg.shard_size)
        meta = {
            "dataset": cfg.name,
            "tokenizer": enc.name,
            "documents": len(documents),
            "tokens": len(tokens),
            "train_tokens": len(tokens) - n_val,
            "val_tokens": n_val,
            "val_fraction": cfg.val_fraction,
            "shard_size": cfg.shard_size,
            "text_sha256": text_hash.hexdigest(),
            CHECKSUMS: checksums,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return _publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardLoader:
    """Stream (x, y) batches of B sequences of T tokens from token shards, build-nanogpt DataLoaderLite style.

    All ranks walk the shards in lockstep: each step consumes one window of B*T*world_size tokens, of which rank r
    takes the slice starting at B*T*r (plus one token for the shifted targets). When the next window would not fit
    in the current shard, every rank moves to the next shard; after the last shard a new epoch starts at the first
    (in a new seeded order if `shuffle_shards`). The position is the same for all ranks, so rank 0's `state_dict()`
    resumes every rank.
    """

    def __init__(
        self,
        shard_paths: Sequence[str | os.PathLike],
        B: int,
        T: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_shards: bool = False,
    ):
        if B < 1 or T < 1:
            raise ValueError(f"data.batch_size={B} and data.seq_len={T} must both be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if not shard_paths:
            raise ValueError("ShardLoader needs at least one shard path")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.seed, self.shuffle_shards = seed, shuffle_shards
        self.shard_paths = [Path(p) for p in shard_paths]
        self.window = B * T * world_size  # tokens consumed per step by all ranks together
        # mmap reads only the header: cheap, and fails before training. A short tail shard (the last one a prep
        # writes) is skipped as long as others can feed a step; if none can, the sizes are wrong for this data.
        sizes = {path: len(load_shard(path, mmap=True)) for path in self.shard_paths}
        usable = [path for path in self.shard_paths if sizes[path] >= self.window + 1]
        if not usable:
            path = max(sizes, key=sizes.get)
            raise ValueError(
                f"token shard {path} has {sizes[path]} tokens, fewer than one step needs: data.batch_size * "
                f"data.seq_len * world_size + 1 = {B} * {T} * {world_size} + 1 = {self.window + 1}; lower "
                "data.batch_size or data.seq_len (or use more text / a larger data.shard_size or data.val_fraction)"
            )
        for path in self.shard_paths:
            if path not in usable:
                log.warning("skipping token shard %s: %d tokens is less than one step (%d)", path, sizes[path],
                            self.window + 1)  # fmt: skip
        self.shard_paths = usable
        self.manifests = {d: read_checksums(d) for d in {path.parent for path in self.shard_paths}}
        self.checked: set[Path] = set()  # shards verified in this run (each is hashed once, when first opened)
        self.reset()

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle_shards:
            return list(range(len(self.shard_paths)))
        # A fresh generator per (seed, epoch) makes the order a pure function of the state: resuming reproduces it.
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_paths)).tolist()

    def _load(self, epoch: int, shard_index: int, position: int) -> None:
        self.epoch, self.shard_index, self.position = epoch, shard_index, position
        self.order = self._order(epoch)
        path = self.shard_paths[self.order[shard_index]]
        self.tokens = load_shard(path, mmap=True)
        if path not in self.checked:
            check_shard(path, self.tokens, *self.manifests[path.parent])
            self.checked.add(path)

    def reset(self) -> None:
        """Go back to the first window of the first shard of epoch 0."""
        self._load(epoch=0, shard_index=0, position=0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, int64 CPU tensors of shape (B, T), with y[b, t] = the token after x[b, t]."""
        B, T = self.B, self.T
        start = self.position + B * T * self.rank
        buf = torch.from_numpy(self.tokens[start : start + B * T + 1].astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets
        self.position += self.window
        if self.position + self.window + 1 > len(self.tokens):
            if self.shard_index + 1 < len(self.shard_paths):
                self._load(self.epoch, self.shard_index + 1, 0)
            else:
                self._load(self.epoch + 1, 0, 0)
        return x, y

    def state_dict(self) -> dict[str, int]:
        """Where the next batch comes from, as plain ints (fits a weights_only=True checkpoint); same on all ranks."""
        return {"epoch": self.epoch, "shard_index": self.shard_index, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict()`, e.g. one saved by rank 0, with the same shards."""
        epoch, shard_index, position = int(state["epoch"]), int(state["shard_index"]), int(state["position"])
        if not 0 <= shard_index < len(self.shard_paths):
            raise ValueError(
                f"loader state has shard_index={shard_index} but there are {len(self.shard_paths)} shards; "
                "was it saved with a different dataset?"
            )
        self._load(epoch, shard_index, position)
        if position < 0 or position + self.window + 1 > len(self.tokens):
            raise ValueError(
                f"loader state has position={position}, outside shard {self.shard_paths[self.order[shard_index]]} "
                f"({len(self.tokens)} tokens) for data.batch_size={self.B} data.seq_len={self.T} "
                f"world_size={self.world_size}; was it saved with different data settings?"
            )
