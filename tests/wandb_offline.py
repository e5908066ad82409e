"""Read W&B offline runs (`run-<id>.wandb`) without the W&B server.

wandb 0.31 ships no Python reader for its transaction log, so this is a small one. The file is LevelDB's
log format (https://github.com/google/leveldb/blob/main/doc/log_format.md) with a W&B header:

    file   = header(7) blocks...           header = b":W&B" + magic 0xBEE1 (uint16 LE) + version 0 (uint8)
    block  = 32 KiB of records; a tail shorter than a record header is zero padding
    record = crc(4, uint32 LE) length(2, uint16 LE) type(1) data(length)
             type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST (a message split across blocks); 0 is padding
             crc  = zlib.crc32(type byte + data) (IEEE, unmasked, unlike LevelDB's masked crc32c)

Each reassembled message is a `wandb.proto.wandb_internal_pb2.Record`. We use it to check what a run
logged (tests) and to rebuild sweep reports from the runs' own W&B records.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER = struct.Struct("<4sHB")  # ident, magic, version: 7 bytes
RECORD_HEADER = struct.Struct("<IHB")  # crc, length, type: 7 bytes
BLOCK_SIZE = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What one offline W&B run logged, decoded from its `.wandb` file."""

    path: Path
    run_id: str | None = None
    name: str | None = None
    group: str | None = None
    job_type: str | None = None
    project: str | None = None
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # as passed to wandb.init(config=...), without "_wandb"
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per history row, keys as logged
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None  # None when the run never finished (crash, still running)

    def metric(self, key: str) -> list[tuple[Any, Any]]:
        """`[(step, value), ...]` for one history key, the step taken from the logged "step" when present."""
        return [(row.get("step", row.get("_step")), row[key]) for row in self.history if key in row]


def iter_messages(path: str | Path) -> Iterator[bytes]:
    """The raw messages of a `.wandb` file, fragments reassembled and checksums verified."""
    data = Path(path).read_bytes()
    _check_header(data, path)
    for message, _ in _scan(data, HEADER.size, path):
        yield message


def _check_header(data: bytes, path: str | Path) -> None:
    if len(data) < HEADER.size:
        raise ValueError(f"{path} is too short to be a W&B transaction log")
    ident, magic, version = HEADER.unpack_from(data, 0)
    if ident != HEADER_IDENT or magic != HEADER_MAGIC or version != 0:
        raise ValueError(f"{path} is not a W&B transaction log (header {data[: HEADER.size]!r})")


def _scan(data: bytes, pos: int, path: str | Path) -> Iterator[tuple[bytes, int]]:
    """`(message, offset just past it)` for each whole message from `pos`; stops quietly at a torn tail."""
    pending = None
    while pos + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # zero padding at the end of a block
            pos += left_in_block
            continue
        crc, length, rtype = RECORD_HEADER.unpack_from(data, pos)
        start = pos + RECORD_HEADER.size
        if rtype == 0 and length == 0:  # zeroed space: nothing more was written (yet)
            return
        chunk = data[start : start + length]
        if len(chunk) < length:  # a record still being written, or cut off when the run was killed
            return
        if zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) != crc:
            raise ValueError(f"{path}: bad checksum in record at byte {pos}; the file is corrupt")
        pos = start + length
        if rtype == FULL:
            yield chunk, pos
        elif rtype == FIRST:
            pending = bytearray(chunk)
        elif rtype == MIDDLE and pending is not None:
            pending += chunk
        elif rtype == LAST and pending is not None:
            pending += chunk
            yield bytes(pending), pos
            pending = None
        else:
            raise ValueError(f"{path}: unexpected record type {rtype} at byte {pos}")


def wait_for_exit(path: str | Path, timeout: float = 10.0) -> bool:
    """Wait until the run's exit record is on disk; False if it is not there within `timeout` seconds.

    `wandb.finish()` returns before W&B's service process has written the end of the log, so a reader
    that starts right after finish (a test, a sweep report) could see a cut-off run without this.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    path, pos = Path(path), HEADER.size
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.is_file() else b""
        if len(data) >= HEADER.size:
            _check_header(data, path)
            for message, end in _scan(data, pos, path):
                pos = end  # resume after the last whole message: the file only grows
                record = pb.Record()
                record.ParseFromString(message)
                if record.WhichOneof("record_type") == "exit":
                    return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def iter_records(path: str | Path) -> Iterator[Any]:
    """The `wandb_internal_pb2.Record` messages of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for msg in iter_messages(path):
        record = pb.Record()
        record.ParseFromString(msg)
        yield record


def find_runs(directory: str | Path) -> list[Path]:
    """All `run-*.wandb` files under a directory (a run dir, a sweep dir, a `wandb/` dir), sorted by path."""
    return sorted(Path(directory).rglob("run-*.wandb"))


def read_run(path: str | Path) -> OfflineRun:
    """Decode an offline run: `path` is a `run-*.wandb` file or a directory holding exactly one."""
    path = Path(path)
    if path.is_dir():
        found = find_runs(path)
        if len(found) != 1:
            raise FileNotFoundError(
                f"{path} holds {len(found)} W&B runs ({[str(p) for p in found[:5]]}); pass one run-*.wandb file"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a run-*.wandb file or a directory holding one")
    wait_for_exit(path)  # W&B's service writes the end of the log ~0.1-1 s after `finish` returns

    run = OfflineRun(path=path)
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _read_run_record(run, record.run)
        elif kind == "config":
            _apply_items(run.config, record.config.update, record.config.remove)
        elif kind == "history":
            run.history.append(_history_row(record.history))
        elif kind == "summary":
            _apply_items(run.summary, record.summary.update, record.summary.remove)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def _read_run_record(run: OfflineRun, r: Any) -> None:
    run.run_id = r.run_id or run.run_id
    run.name = r.display_name or run.name
    run.group = r.run_group or run.group
    run.job_type = r.job_type or run.job_type
    run.project = r.project or run.project
    run.entity = r.entity or run.entity
    run.notes = r.notes or run.notes
    run.tags = list(r.tags) or run.tags
    _apply_items(run.config, r.config.update, r.config.remove)
    _apply_items(run.summary, r.summary.update, r.summary.remove)


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _apply_items(target: dict[str, Any], updates: Any, removes: Any = ()) -> None:
    """Apply config/summary items (key or nested_key path, JSON value) to a nested dict."""
    for item in updates:
        *parents, leaf = _item_path(item)
        node = target
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = json.loads(item.value_json) if item.value_json else None
    for item in removes:
        *parents, leaf = _item_path(item)
        node = target
        for k in parents:
            node = node.get(k, {})
        node.pop(leaf, None)


def _history_row(h: Any) -> dict[str, Any]:
    """One history record -> `{key: value}` (media such as tables come back as their nested metadata dicts)."""
    row: dict[str, Any] = {}
    _apply_items(row, h.item)
    if h.HasField("step") and "_step" not in row:
        row["_step"] = h.step.num
    return row


def artifacts(path: str | Path) -> list[dict[str, Any]]:
    """The artifacts a run logged, in order: `{"name", "type", "files"}`, files by their names in the artifact."""
    found = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "artifact":
            a = record.artifact
            found.append({"name": a.name, "type": a.type, "files": [entry.path for entry in a.manifest.contents]})
    return found
