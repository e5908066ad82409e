"""FineWeb-Edu (or any `datasets` text source) tokenized into uint16 shards, build-nanogpt fineweb.py style, resumable.

Documents stream from `datasets.load_dataset(..., streaming=True)`; worker processes tokenize them as
[EOT] + GPT-2 tokens; the token stream fills shards of exactly `shard_size` tokens (a document may continue in the
next shard), `val_000000.npy` first, then `train_000001.npy`, `train_000002.npy`, ..., the last shard taking the
remainder. After each shard a JSON manifest records the exact stream position (documents done + token offset into
a split document), so an interrupted run continues where the last shard ended and produces the same shards as an
uninterrupted one. Building 10B tokens takes a while and is never done implicitly: `prepare(cfg)` only finds the
shards and otherwise says which `gpt2x-prepare` command builds them.
"""

import contextlib
import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shlex
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import filelock
import numpy as np
from tqdm import tqdm

from gpt2x.config import FinewebDataConfig
from gpt2x.data.shards import CHECKSUMS, file_sha256, write_shard
from gpt2x.data.tokenizer import EOT, gpt2_encoding

log = logging.getLogger(__name__)

# The defaults live once, in the data=fineweb_edu schema.
DEFAULT_SOURCE = FinewebDataConfig.hf_path
DEFAULT_NAME = FinewebDataConfig.hf_name
DEFAULT_SHARD_SIZE = FinewebDataConfig.shard_size
MANIFEST = "manifest.json"
_BATCH_DOCS = 1024  # documents read from the stream per batch handed to the workers
_CHUNKSIZE = 16  # documents per worker task, as in build-nanogpt


def tokenize_document(text: str | None) -> np.ndarray:
    """[EOT] + the GPT-2 tokens of `text`, as uint16 (EOT first: it marks where a document starts).

    A null text (a row without a document) gives no tokens at all, so the row is skipped while still counting as
    one document of the stream: resume positions stay document indices.
    """
    if text is None:
        return np.empty(0, dtype=np.uint16)
    return np.asarray([EOT] + gpt2_encoding().encode_ordinary(text), dtype=np.uint16)  # GPT-2 ids all fit 16 bits


def shard_name(index: int) -> str:
    """The first shard is the val split, every later one train."""
    return f"{'val' if index == 0 else 'train'}_{index:06d}.npy"


def _text_sha1(text: str | None) -> str:
    return hashlib.sha1((text or "").encode("utf-8")).hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def _lock(out_dir: Path):
    """An exclusive lock on `out_dir` for the `with` block, so two preps never interleave."""
    lock = filelock.FileLock(out_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise RuntimeError(f"another gpt2x-prepare is writing {out_dir}; wait for it or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temps(out_dir: Path) -> None:
    # Left by a killed run: the manifest's temp file and write_shard's "<shard>.npy.<pid>.<id>.tmp".
    for path in [*out_dir.glob(f".{MANIFEST}.*.tmp"), *out_dir.glob("*.npy.*.tmp")]:
        path.unlink(missing_ok=True)


def _normalize_data_files(data_files) -> list[str] | None:
    # Store existing local files as absolute paths, so a resume from another working directory still matches.
    if data_files is None:
        return None
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    return [str(Path(f).resolve()) if Path(f).exists() else str(f) for f in data_files]


def _load_stream(source: str, name: str | None, split: str, data_files):
    from gpt2x.extras import import_extra

    # imported here: `datasets` is slow to import, and only prep needs it
    load_dataset = import_extra("datasets", "prepare", "gpt2x-prepare").load_dataset

    return load_dataset(source, name=name, split=split, data_files=data_files, streaming=True)


class _DocStream:
    """The dataset's document texts in order from document `start` on, read in batches; each batch comes with the
    stream state just before its first document, which a later resume can seek to instead of re-reading."""

    def __init__(self, load, text_field: str, start: int, stop: int | None, seek: dict | None):
        self.load, self.text_field, self.stop = load, text_field, stop
        self.next_doc = start
        self.ds = load()
        # `ds.state_dict()` describes the current iterator only once it has yielded a document; before that, the
        # position is the state we sought to (or the start of the stream, which needs no state).
        self.start_state, self.pulled = None, False
        if seek and seek.get("stream_state") is not None and 0 < seek["stream_doc"] <= start:
            if self._seek(seek["stream_state"], seek["stream_doc_sha1"]):
                if start == seek["stream_doc"]:
                    self.start_state = seek["stream_state"]
                self.it = self._skip(iter(self.ds), start - seek["stream_doc"])
                return
            self.ds = load()
        self.it = self._skip(iter(self.ds), start)

    def _text(self, example, index: int | None = None) -> str | None:
        try:
            text = example[self.text_field]
        except KeyError:
            raise ValueError(
                f"text field {self.text_field!r} is not in the dataset's columns {sorted(example)}; "
                "pass --text-field (data.text_field) naming the column with the document text"
            ) from None
        if text is not None and not isinstance(text, str):
            where = f"document {index}" if index is not None else "a document"
            raise ValueError(
                f"{where} (counting from 0) has a {type(text).__name__} in text field {self.text_field!r}, not a "
                f"string: {str(text)[:80]!r}; pass --text-field naming the column with the document text"
            )
        return text

    def _seek(self, state: dict, first_sha1: str) -> bool:
        """Move the stream to `state`, checking that the document there is the one recorded with it."""
        try:
            self.ds.load_state_dict(state)
            first = next(iter(self.ds), None)
            if first is not None and _text_sha1(self._text(first)) == first_sha1:
                self.ds.load_state_dict(state)  # rewind past the document just read
                return True
            warnings.warn("the saved stream state points at another document; re-reading the stream", stacklevel=3)
        except ValueError:
            raise
        except Exception as e:  # e.g. a `datasets` version with another state layout
            warnings.warn(f"cannot seek the stream to its saved state ({e}); re-reading the stream", stacklevel=3)
        return False

    def _skip(self, it: Iterator, n: int) -> Iterator:
        for _ in tqdm(range(n), desc="skipping documents already in shards", unit="doc", disable=n < 100_000):
            if next(it, None) is None:
                break
            self.pulled = True
        return it

    def next_batch(self) -> tuple[int, dict | None, list[str]]:
        """(index of the batch's first document, stream state before it or None, texts); no texts at the end."""
        first = self.next_doc
        state = self._state() if self.pulled else self.start_state
        n = _BATCH_DOCS if self.stop is None else max(0, min(_BATCH_DOCS, self.stop - first))
        texts = []
        for example in self.it if n else ():
            texts.append(self._text(example, first + len(texts)))
            if len(texts) == n:
                break
        self.next_doc += len(texts)
        self.pulled = self.pulled or bool(texts)
        return first, state, texts

    def _state(self) -> dict | None:
        try:
            state = self.ds.state_dict()
            json.dumps(state)  # it goes into the JSON manifest
            return state
        except Exception:  # a source without resumable state: resuming will re-read the stream instead
            return None


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
    with _lock(out_dir):
        _remove_stale_temps(out_dir)
        manifest_path = out_dir / MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            changed = {k: (manifest.get(k), v) for k, v in settings.items() if manifest.get(k) != v}
            if changed:
                diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise ValueError(
                    f"{out_dir} was prepared with other settings ({diff}); rerun with the original settings to "
                    "resume, or pass another --out (data.path)"
                )
            _add_missing_checksums(out_dir, manifest)
            if manifest["complete"]:
                return out_dir
        elif any(out_dir.glob("*.npy")):
            raise ValueError(
                f"{out_dir} holds .npy shards but no {MANIFEST}, so they were not made by gpt2x-prepare and cannot be "
                "resumed; pass another --out (data.path) or empty that directory"
            )
        else:
            manifest = {**settings, "shards": [], "docs_done": 0, "token_offset": 0, "tokens": 0, "complete": False}
        load = functools.partial(_load_stream, source, name, split, data_files)
        try:
            _fill_shards(out_dir, manifest, load, text_field, shard_size, num_proc, max_docs)
        except StopIteration:  # `datasets` reads a source's first record to learn its columns; an empty one has none
            raise _no_documents(source, name, split, data_files) from None
        except Exception as e:
            if source == "json" and (bad := first_bad_json_line(data_files)):
                raise ValueError(
                    f"{bad}; fix or remove that line and rerun the same command (the shards already written are kept)"
                ) from e
            raise
    if manifest["tokens"] == 0:
        raise _no_documents(source, name, split, data_files)
    if manifest.get("null_texts"):
        warnings.warn(
            f"skipped {manifest['null_texts']} documents whose {text_field!r} is null (of {manifest['docs_done']}); "
            f"the count is in {manifest_path}",
            stacklevel=2,
        )
    if len(manifest["shards"]) < 2:
        warnings.warn(
            f"{out_dir} has a single shard ({manifest['tokens']} tokens), which is the val split: there is no "
            "train split; use a smaller --shard-size or more documents",
            stacklevel=2,
        )
    return out_dir


def _no_documents(source: str, name: str | None, split: str, data_files) -> ValueError:
    return ValueError(
        f"{source} (name={name}, split={split}, data_files={data_files}) produced no documents (an empty file?); "
        "check --source, --name, --split and --data-files"
    )


def first_bad_json_line(data_files) -> str | None:
    """'FILE line N is not valid JSON (why)' for the first broken line of local JSON Lines files, else None.

    `datasets` reports a parse error by its position in an Arrow block, which points nowhere in the file; this
    re-reads the files only after such an error, to name the line to fix.
    """
    for path in [Path(f) for f in _normalize_data_files(data_files) or []]:
        if not path.is_file() or path.suffix not in (".json", ".jsonl"):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                try:
                    if line.strip():
                        json.loads(line)
                except json.JSONDecodeError as e:
                    if number == 1 and line.lstrip().startswith("["):
                        break  # one JSON document spread over lines, not JSON Lines: no line to blame
                    return f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno})"
    return None


def _add_missing_checksums(out_dir: Path, manifest: dict) -> None:
    """Record the sha256 of shards written before manifests held checksums, as the files are now."""
    checksums = manifest.setdefault(CHECKSUMS, {})
    missing = [name for name in manifest["shards"] if name not in checksums]
    for name in tqdm(missing, desc=f"recording checksums of the shards in {out_dir}", disable=not missing):
        checksums[name] = file_sha256(out_dir / name)
    if missing:
        _write_json_atomic(out_dir / MANIFEST, manifest)


def _fill_shards(out_dir: Path, manifest: dict, load, text_field: str, shard_size: int, num_proc: int, max_docs):
    """Stream documents from the manifest's position on into shards, updating the manifest after each shard."""
    buf = np.empty(shard_size, dtype=np.uint16)  # the shard being filled
    fill = 0
    skip = manifest["token_offset"]  # tokens of the first document that are already in the previous shard
    manifest.setdefault("null_texts", 0)  # rows without text: skipped, counted up to the manifest's position

    def finish_shard(docs_done: int, token_offset: int, batch_first: int, batch_state, batch_sha1) -> None:
        index = len(manifest["shards"])
        manifest.setdefault(CHECKSUMS, {})[shard_name(index)] = write_shard(out_dir / shard_name(index), buf[:fill])
        manifest["shards"].append(shard_name(index))
        manifest.update(docs_done=docs_done, token_offset=token_offset, tokens=manifest["tokens"] + fill)
        manifest.update(stream_doc=batch_first, stream_state=batch_state, stream_doc_sha1=batch_sha1)
        _write_json_atomic(out_dir / MANIFEST, manifest)  # after the shard: a kill in between only redoes this shard

    gpt2_encoding()  # build it once here; forked workers inherit it
    pool = mp.Pool(num_proc) if num_proc > 1 else None  # started before `datasets` runs any threads
    progress = tqdm(unit="tok", unit_scale=True, initial=manifest["tokens"], desc=f"tokenizing into {out_dir}")
    try:
        docs = _DocStream(load, text_field, manifest["docs_done"], max_docs, manifest)
        pending = deque()  # batches handed to the workers: (first doc index, stream state, sha1 of its text, tokens)
        exhausted = False
        while True:
            # Two batches in flight: the workers tokenize one while this process reads the next from the stream.
            while not exhausted and len(pending) < 2:
                first, state, texts = docs.next_batch()
                if texts:
                    pending.append((first, state, _text_sha1(texts[0]), _map(pool, texts)))
                exhausted = not texts
            if not pending:
                break
            batch_first, batch_state, batch_sha1, token_arrays = pending.popleft()
            for doc_index, tokens in enumerate(token_arrays, start=batch_first):
                manifest["null_texts"] += len(tokens) == 0  # only a null text has no tokens (a document has its EOT)
                pos, skip = skip, 0
                while pos < len(tokens):  # a long document may fill several shards
                    n = min(shard_size - fill, len(tokens) - pos)
                    buf[fill : fill + n] = tokens[pos : pos + n]
                    fill, pos = fill + n, pos + n
                    progress.update(n)
                    if fill == shard_size:
                        # resume point: the next document, or the rest of this one if it continues in the next shard
                        done = pos == len(tokens)
                        finish_shard(doc_index + done, 0 if done else pos, batch_first, batch_state, batch_sha1)
                        fill = 0
        if fill:  # the last, shorter shard
            finish_shard(docs.next_doc, 0, docs.next_doc, None, None)
        if manifest["tokens"]:
            manifest["complete"] = True
            _write_json_atomic(out_dir / MANIFEST, manifest)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def prepare_command(
    source: str,
    name: str | None,
    split: str,
    text_field: str,
    out_dir: str | os.PathLike,
    shard_size: int,
    num_proc: int | None = None,
    data_files: list[str] | None = None,
    max_docs: int | None = None,
) -> str:
    """The `gpt2x-prepare` command line for these settings (what `prepare` tells the user to run)."""
    args = ["gpt2x-prepare", "--source", source]
    if name is not None:
        args += ["--name", name]
    elif source == DEFAULT_SOURCE:
        args += ["--name", ""]  # the CLI's default name for FineWeb-Edu is sample-10BT
    args += ["--split", split, "--text-field", text_field]
    if data_files:
        args += ["--data-files", *data_files]
    args += ["--out", str(out_dir), "--shard-size", str(shard_size)]
    if num_proc is not None:
        args += ["--num-proc", str(num_proc)]
    if max_docs is not None:
        args += ["--max-docs", str(max_docs)]
    return shlex.join(args)


def prepare(cfg) -> Path:
    """Return the directory of prepared FineWeb-Edu shards: data.path, else <data.cache_dir>/fineweb_edu.

    Raises FileNotFoundError with the `gpt2x-prepare` command to run when the shards are missing or unfinished
    (10B tokens are too many to build as a side effect of starting a training run).
    """
    out_dir = Path(cfg.path).expanduser() if cfg.path else Path(cfg.cache_dir) / "fineweb_edu"
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        # the same settings the prep started with: rerunning them resumes it, or records missing checksums
        m = manifest
        again = prepare_command(
            m["source"], m["name"], m["split"], m["text_field"], out_dir, m["shard_size"], cfg.num_proc,
            m["data_files"], m["max_docs"],
        )  # fmt: skip
        if not manifest.get("complete"):
            raise FileNotFoundError(
                f"the shards in {out_dir} (data.path) are unfinished ({len(manifest['shards'])} written); rerun "
                f"`{again}` to continue where it stopped"
            )
        if CHECKSUMS not in manifest:
            log.warning(
                "the shards in %s were prepared before gpt2x-prepare recorded checksums, so they are used unchecked; "
                "rerun `%s` to record the checksums of the shards as they are now (or prepare them again into a new "
                "--out to be sure they are intact)", out_dir, again,
            )  # fmt: skip
        if (manifest["source"], manifest["name"], manifest["split"]) != (cfg.hf_path, cfg.hf_name, cfg.hf_split):
            raise ValueError(
                f"{out_dir} (data.path) holds {manifest['source']} name={manifest['name']} split={manifest['split']}, "
                f"but the config asks for data.hf_path={cfg.hf_path} data.hf_name={cfg.hf_name} "
                f"data.hf_split={cfg.hf_split}; set data.path to another directory or change those settings"
            )
    if any(out_dir.glob("train_*.npy")) and any(out_dir.glob("val_*.npy")):
        return out_dir
    command = prepare_command(
        cfg.hf_path, cfg.hf_name, cfg.hf_split, cfg.text_field, out_dir, cfg.shard_size, cfg.num_proc
    )
    raise FileNotFoundError(
        f"no train and val shards in {out_dir} (data.path; default <data.cache_dir>/fineweb_edu); build them once "
        f"with `{command}` (sample-10BT is ~10B tokens, ~20 GB of shards), or set data.path to a directory of "
        "prepared shards"
    )
