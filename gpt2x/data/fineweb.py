"""FineWeb-Edu (or any `datasets` text source) tokenized into uint16 shards, build-nanogpt fineweb.py style, resumable.

Documents stream from `datasets.load_dataset(..., streaming=True)`; worker processes tokenize them as
[EOT] + GPT-2 tokens; the token stream fills shards of exactly `shard_size` tokens (a document may continue in the
next shard), `val_000000.npy` first, then `train_000001.npy`, `train_000002.npy`, ..., the last shard taking the
remainder. After each shard a JSON manifest records the exact stream position (documents done + token offset into
a split document), so an interrupted run continues where the last shard ended and produces the same shards as an
uninterrupted one. Building 10B tokens takes a while and is never done implicitly: `prepare(cfg)` only finds the
shards and otherwise says which `gpt2x-prepare` command builds them.
"""

import hashlib
import json
import multiprocessing as mp
import os
import shlex
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2x.data.shards import write_shard
from gpt2x.tokenizer import EOT, gpt2_encoding

DEFAULT_SOURCE = "HuggingFaceFW/fineweb-edu"
DEFAULT_NAME = "sample-10BT"  # ~10B GPT-2 tokens, the build-nanogpt run
DEFAULT_SHARD_SIZE = 100_000_000  # 100M tokens (200 MB) per shard: ~100 shards for sample-10BT
MANIFEST = "manifest.json"
_BATCH_DOCS = 1024  # documents read from the stream per batch handed to the workers
_CHUNKSIZE = 16  # documents per worker task, as in build-nanogpt


def tokenize_document(text: str) -> np.ndarray:
    """[EOT] + the GPT-2 tokens of `text`, as uint16 (EOT first: it marks where a document starts)."""
    tokens = np.empty(1, dtype=np.uint16)
    tokens[0] = EOT
    return np.concatenate([tokens, np.asarray(gpt2_encoding().encode_ordinary(text), dtype=np.uint16)])


def shard_name(index: int) -> str:
    """The first shard is the val split, every later one train."""
    return f"{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _text_sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _normalize_data_files(data_files) -> list[str] | None:
    # Store existing local files as absolute paths, so a resume from another working directory still matches.
    if data_files is None:
        return None
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    return [str(Path(f).resolve()) if Path(f).exists() else str(f) for f in data_files]


def _load_stream(source: str, name: str | None, split: str, data_files):
    from datasets import load_dataset  # imported here: `datasets` is slow to import and only prep needs it

    return load_dataset(source, name=name, split=split, data_files=data_files, streaming=True)


def _json_state(ds) -> dict | None:
    # The stream's own position (shard + example index) lets a resume seek instead of re-reading every document.
    try:
        state = ds.state_dict()
        json.dumps(state)
        return state
    except Exception:  # a source without resumable state, or with non-JSON values: fall back to skipping
        return None


class _DocStream:
    """Texts of the dataset in order, from document `start` on, read in batches with the stream state at each
    batch start (used to seek on resume)."""

    def __init__(self, ds, text_field: str, start: int, stop: int | None, manifest: dict | None):
        self.ds, self.text_field, self.stop = ds, text_field, stop
        self.it = self._seek(start, manifest)
        self.next_doc = start

    def _text(self, example) -> str:
        try:
            return example[self.text_field]
        except KeyError:
            raise ValueError(
                f"text field {self.text_field!r} is not in the dataset's columns {sorted(example)}; "
                "pass --text-field (data.text_field) naming the column with the document text"
            ) from None

    def _seek(self, start: int, manifest: dict | None) -> Iterator:
        state, state_doc = (manifest or {}).get("stream_state"), (manifest or {}).get("stream_doc", 0)
        if state is not None and 0 < state_doc <= start:
            try:
                self.ds.load_state_dict(state)
                it = iter(self.ds)
                first = next(it, None)
                if first is not None and _text_sha1(self._text(first)) == manifest.get("stream_doc_sha1"):
                    return self._skip(self._prepend(first, it), start - state_doc)
            except ValueError:
                raise
            except Exception as e:
                warnings.warn(f"could not seek the stream with its saved state ({e}); re-reading from the start")
            else:
                warnings.warn("the stream's saved state no longer points at the same document; re-reading it")
            self.ds.load_state_dict(_fresh_state(self.ds))
        return self._skip(iter(self.ds), start)

    @staticmethod
    def _prepend(first, it):
        yield first
        yield from it

    @staticmethod
    def _skip(it, n: int) -> Iterator:
        for _ in tqdm(range(n), desc="skipping prepared documents", unit="doc", disable=n < 10_000):
            if next(it, None) is None:
                break
        return it

    def next_batch(self) -> tuple[int, dict | None, list[str]]:
        """(index of the batch's first document, stream state before it, texts); texts is empty at the end."""
        first, state = self.next_doc, _json_state(self.ds)
        n = _BATCH_DOCS if self.stop is None else max(0, min(_BATCH_DOCS, self.stop - first))
        texts = []
        for example in self.it:
            texts.append(self._text(example))
            if len(texts) == n:
                break
        self.next_doc += len(texts)
        return first, state, texts


def _fresh_state(ds) -> dict:
    # load_state_dict needs a full state; a just-built dataset's state_dict() is "at the start".
    return ds.state_dict()


def _map(pool, texts: list[str]):
    if pool is None:
        return map(tokenize_document, texts)
    return pool.imap(tokenize_document, texts, chunksize=_CHUNKSIZE)


def prepare_fineweb(
    source: str = DEFAULT_SOURCE,
    name: str | None = DEFAULT_NAME,
    split: str = "train",
    out_dir: str | os.PathLike = "fineweb_edu",
    shard_size: int = DEFAULT_SHARD_SIZE,
    num_proc: int = 4,
    text_field: str = "text",
    data_files=None,
    max_docs: int | None = None,
) -> Path:
    """Tokenize a `datasets` text source into `out_dir/{val,train}_NNNNNN.npy` shards; resumes an interrupted run.

    `source`, `name`, `split`, `data_files` go to `datasets.load_dataset(..., streaming=True)` (e.g. source="json",
    data_files="docs.jsonl" for local files). `max_docs` stops after that many documents (for quick trials). Returns
    `out_dir`. A finished `out_dir` is returned as is.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be a positive number of tokens (data.shard_size)")
    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} must be >= 1 (data.num_proc)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "source": source,
        "name": name,
        "split": split,
        "data_files": _normalize_data_files(data_files),
        "text_field": text_field,
        "shard_size": shard_size,
        "max_docs": max_docs,
        "tokenizer": "gpt2",
    }
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is None:
        if any(out_dir.glob("*.npy")):
            raise ValueError(
                f"{out_dir} holds .npy shards but no {MANIFEST}, so they were not made by gpt2x-prepare and cannot be "
                "resumed; pass another --out (data.path) or empty that directory"
            )
        manifest = {**settings, "shards": [], "docs_done": 0, "token_offset": 0, "tokens": 0, "complete": False}
    else:
        changed = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"{out_dir} was prepared with other settings ({diff}); rerun with the original settings to resume, "
                "or pass another --out (data.path)"
            )
        if manifest["complete"]:
            return out_dir

    ds = _load_stream(source, name, split, data_files)
    docs = _DocStream(ds, text_field, manifest["docs_done"], max_docs, manifest)
    buf = np.empty(shard_size, dtype=np.uint16)  # the shard being filled
    fill = 0
    skip = manifest["token_offset"]  # tokens of the first document already in the previous shard
    progress = tqdm(unit="tok", unit_scale=True, initial=manifest["tokens"], desc=f"tokenizing {source} -> {out_dir}")

    def finish_shard(n: int, docs_done: int, token_offset: int, batch_first: int, batch_state, batch_sha1) -> None:
        index = len(manifest["shards"])
        write_shard(out_dir / shard_name(index), buf[:n])
        manifest["shards"].append(shard_name(index))
        manifest.update(docs_done=docs_done, token_offset=token_offset, tokens=manifest["tokens"] + n)
        manifest.update(stream_doc=batch_first, stream_state=batch_state, stream_doc_sha1=batch_sha1)
        _write_json_atomic(manifest_path, manifest)  # after the shard: a kill in between just redoes this shard

    pool = mp.Pool(num_proc) if num_proc > 1 else None
    try:
        # Two batches in flight: the workers tokenize one while this process reads the next from the stream.
        pending = deque()
        while True:
            first, state, texts = docs.next_batch()
            if texts:
                pending.append((first, state, _text_sha1(texts[0]), _map(pool, texts)))
            if not pending or (texts and len(pending) < 2):
                if not pending:
                    break
                continue
            batch_first, batch_state, batch_sha1, token_arrays = pending.popleft()
            for doc_index, tokens in enumerate(token_arrays, start=batch_first):
                pos, skip = skip, 0
                while pos < len(tokens):
                    n = min(shard_size - fill, len(tokens) - pos)
                    buf[fill : fill + n] = tokens[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    progress.update(n)
                    if fill == shard_size:
                        done = pos == len(tokens)  # the resume point: next document, or the rest of this one
                        finish_shard(
                            fill, doc_index + done, 0 if done else pos, batch_first, batch_state, batch_sha1
                        )
                        fill = 0
        if manifest["tokens"] + fill == 0:
            raise ValueError(
                f"{source} (name={name}, split={split}, data_files={data_files}) produced no documents; "
                "check --source/--name/--split/--data-files"
            )
        if fill:
            finish_shard(fill, docs.next_doc, 0, docs.next_doc, None, None)
        manifest["complete"] = True
        _write_json_atomic(manifest_path, manifest)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if len(manifest["shards"]) < 2:
        warnings.warn(
            f"{out_dir} has a single shard ({manifest['tokens']} tokens), which is the val split: there is no "
            "train split; use a smaller --shard-size or more documents",
            stacklevel=2,
        )
    return out_dir


def prepare_command(cfg, out_dir: str | os.PathLike) -> str:
    """The `gpt2x-prepare` command line that builds the shards data config `cfg` asks for."""
    args = ["gpt2x-prepare", "--source", cfg.hf_path]
    if cfg.hf_name is not None:
        args += ["--name", cfg.hf_name]
    elif cfg.hf_path == DEFAULT_SOURCE:
        args += ["--name", ""]
    args += ["--split", cfg.hf_split, "--text-field", cfg.text_field, "--out", str(out_dir)]
    args += ["--shard-size", str(cfg.shard_size), "--num-proc", str(cfg.num_proc)]
    return shlex.join(args)


def prepare(cfg) -> Path:
    """Return the directory of prepared FineWeb-Edu shards: data.path, else <data.cache_dir>/fineweb_edu.

    Raises FileNotFoundError with the `gpt2x-prepare` command to run when the shards are missing or unfinished
    (10B tokens are too many to build as a side effect of starting a training run).
    """
    out_dir = Path(cfg.path).expanduser() if cfg.path else Path(cfg.cache_dir) / "fineweb_edu"
    command = prepare_command(cfg, out_dir)
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise FileNotFoundError(
                f"the shards in {out_dir} (data.path) are unfinished ({len(manifest['shards'])} written); rerun "
                f"`{command}` to continue where it stopped"
            )
        if (manifest["source"], manifest["name"], manifest["split"]) != (cfg.hf_path, cfg.hf_name, cfg.hf_split):
            raise ValueError(
                f"{out_dir} (data.path) holds {manifest['source']} name={manifest['name']} split={manifest['split']}, "
                f"but the config asks for data.hf_path={cfg.hf_path} data.hf_name={cfg.hf_name} "
                f"data.hf_split={cfg.hf_split}; set data.path to another directory or change those settings"
            )
    if any(out_dir.glob("train_*.npy")) and any(out_dir.glob("val_*.npy")):
        return out_dir
    raise FileNotFoundError(
        f"no train and val shards in {out_dir} (data.path; default <data.cache_dir>/fineweb_edu); build them once "
        f"with `{command}` (sample-10BT is ~10B tokens, ~20 GB of shards), or set data.path to a directory of "
        "prepared shards"
    )
