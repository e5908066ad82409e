"""Training checkpoints: atomic saves, keep-last-K, integrity-checked loads, and RNG state capture.

A checkpoint is `<ckpt_dir>/step_NNNNNN.pt`, a plain dict (model and optimizer state dicts, step, loader state, RNG
state, config as nested plain containers) written by `torch.save` and read back with `weights_only=True`, so loading
never runs arbitrary pickled code. A save writes a temp file, fsyncs it and renames it into place: a kill at any moment
leaves the previous checkpoint intact and nothing partial under a `step_*.pt` name.
"""

import os
import random
import re
import signal
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

REQUIRED_KEYS = ("model", "optimizer", "step")
_CKPT_NAME = re.compile(r"^step_(\d{6,})\.pt$")
_TMP_SUFFIX = ".tmp"  # temp files are ".step_NNNNNN.pt.<random>.tmp": never matched by _CKPT_NAME
# Test hook: with GPT2X_TEST_KILL_AFTER_CHECKPOINT=N, `save` SIGKILLs its process group (the run, its launcher and
# workers) right after the checkpoint of step N is on disk: a crash at a known point (tests/test_resume.py).
TEST_KILL_AFTER_CHECKPOINT = "GPT2X_TEST_KILL_AFTER_CHECKPOINT"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (truncated, corrupted, or not a gpt2x checkpoint)."""


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of optimizer step `step` lives."""
    return Path(ckpt_dir) / f"step_{step:06d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """All `step_*.pt` files in `ckpt_dir` as (step, path), oldest step first; [] if the dir does not exist."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = _CKPT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry: without this a power loss can forget it.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(ckpt_dir: Path) -> None:
    # Left behind by a save that was killed; only one process (rank 0) saves into a dir, so none is in use.
    for path in ckpt_dir.glob(f".step_*{_TMP_SUFFIX}"):
        path.unlink(missing_ok=True)


def save(ckpt_dir: str | os.PathLike, step: int, state: dict, keep: int) -> Path:
    """Write `state` to `ckpt_dir/step_{step:06d}.pt` atomically, then delete all but the newest `keep` checkpoints.

    The checkpoint just written is never deleted, even if checkpoints of later steps exist (e.g. after resuming from
    an older one). Returns the path written.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints={keep} must be >= 1: the checkpoint just written is always kept")
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(ckpt_dir)
    final = checkpoint_path(ckpt_dir, step)
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{final.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes must be on disk before the rename makes them "the" checkpoint
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(ckpt_dir)

    others = [path for _, path in reversed(list_checkpoints(ckpt_dir)) if path != final]  # newest first
    for path in others[keep - 1 :]:
        path.unlink(missing_ok=True)
    if os.environ.get(TEST_KILL_AFTER_CHECKPOINT) == str(step):  # the test hook above
        os.killpg(0, signal.SIGKILL)
    return final


def latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir` (highest step), or None if there is none.

    Files that are visibly incomplete (no zip directory at their end, e.g. a partial copy) are skipped with a
    warning; a full integrity check happens in `load`.
    """
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if zipfile.is_zipfile(path):  # torch.save's format is a zip whose directory is written last
            return path
        warnings.warn(f"skipping incomplete checkpoint {path} (truncated?)", stacklevel=2)
    return None


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({why}); delete it or pass resume=<another checkpoint>"
    )


def load(path: str | os.PathLike, required_keys: Iterable[str] = REQUIRED_KEYS) -> dict:
    """Load a checkpoint onto the CPU with `weights_only=True`, after checking every record's CRC32.

    Raises FileNotFoundError if `path` does not exist and CheckpointError if it is truncated, tampered with, not a
    torch checkpoint, or lacks any of `required_keys`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; set resume=auto, resume=null or a checkpoint path")
    # torch.load does not verify the zip CRCs, so a flipped bit in a tensor would load silently as a wrong weight.
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except Exception as e:  # BadZipFile for a truncated file, UnicodeDecodeError/zlib errors for damaged records
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if bad_record is not None:
        raise _corrupt(path, f"CRC mismatch in record {bad_record!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a gpt2x checkpoint dict; "
            "pass resume=<a step_NNNNNN.pt written by gpt2x>"
        )
    missing = [key for key in required_keys if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks keys {missing} (has {sorted(state)}), so it is not a gpt2x training "
            "checkpoint; pass resume=<a step_NNNNNN.pt written by gpt2x>"
        )
    return state


def capture_rng_state() -> dict:
    """The state of every global RNG (python, numpy, torch CPU, all CUDA devices) as weights_only-loadable values."""
    version, mt_state, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),  # uint32 -> int64: a dtype every torch version loads
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the RNG states from `capture_rng_state`, so the following random draws repeat exactly."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    nps = state["numpy"]
    keys = np.asarray(nps["keys"], dtype=np.int64).astype(np.uint32)
    np.random.set_state((nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) != torch.cuda.device_count():
            warnings.warn(
                f"checkpoint has RNG states for {len(cuda_states)} CUDA devices, this process sees "
                f"{torch.cuda.device_count()}; restoring the first {min(len(cuda_states), torch.cuda.device_count())}",
                stacklevel=2,
            )
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
