"""Training checkpoints: atomic saves, keep-last-K, integrity-checked loads, and RNG state capture.

A checkpoint is `<ckpt_dir>/step_NNNNNN.pt`, a plain dict (model and optimizer state dicts, step, loader state, RNG
state, config as nested plain containers) written by `torch.save` and read back with `weights_only=True`, so loading
never runs arbitrary pickled code. A save writes a temp file, fsyncs it and renames it into place: a kill at any moment
leaves the previous checkpoint intact and nothing partial under a `step_*.pt` name.
"""

import dataclasses
import datetime
import errno
import logging
import os
import random
import re
import shutil
import signal
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gpt2x.config import is_due
from gpt2x.speed.parallel import DistInfo, is_fsdp, unwrap

log = logging.getLogger("gpt2x")

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


_OUT_OF_SPACE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the filesystem's or the process's file size limit, ulimit -f)",
}


def _out_of_space(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error`, if any: torch.save reports it as a RuntimeError from its zip
    writer, with the OSError of the failed write as the exception's context."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := _out_of_space(e)) is not None:
            raise OSError(
                full.errno,
                f"{_OUT_OF_SPACE[full.errno]} while saving checkpoint {final}; the checkpoints already in {ckpt_dir} "
                "are intact. Free space there (or lower keep_checkpoints, or point hydra.run.dir at a larger disk) "
                "and resume with resume=auto",
            ) from e
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

    Files that are visibly incomplete (no zip directory at their end: a partial copy, a full disk) are skipped, and
    the skip is logged (console and the run's log) naming the file; that is what keeping K checkpoints is for. A full
    integrity check happens in `load`.
    """
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        if zipfile.is_zipfile(path):  # torch.save's format is a zip whose directory is written last
            return path
        log.warning("resume=auto: skipping checkpoint %s: it is incomplete (truncated, no zip directory)", path)
    return None


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({why}); delete it or pass resume=<another checkpoint>"
    )


def load(path: str | os.PathLike, required_keys: Iterable[str] = REQUIRED_KEYS) -> dict:
    """Load a checkpoint onto the CPU with `weights_only=True`, memory-mapped, after checking every record's CRC32.

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
        # mmap: tensors stay in the file's pages, read on first use, so the ranks of one node that resume from the same
        # file share the page cache instead of each holding a private copy of it (8 x 19 GB for gpt2-xl under FSDP)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as whole (unsharded) tensors, for a checkpoint that rank 0 writes.

    Under FSDP this gathers the shards (a collective: every rank must call it) onto rank 0's CPU; other ranks get
    empty dicts. The optimizer state is then keyed by parameter name (torch.distributed.checkpoint's format), which
    `load_full_state_dicts` reads back under any number of FSDP ranks.
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        eager = unwrap(model)
        return get_model_state_dict(eager, options=options), get_optimizer_state_dict(eager, optimizer, options=options)
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load state written by `full_state_dicts` (each rank passes the whole dicts; FSDP keeps its own shards).

    The optimizer's moments come from the checkpoint, its hyperparameters (each param group's base_lr, weight decay,
    betas) from this run's config: a change that resume_allow accepts (optim.lr) takes effect, and a checkpoint
    written before a group setting existed (base_lr) still loads.
    """
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    _load_full_state_dicts(model, optimizer, model_sd, optim_sd)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


def _load_full_state_dicts(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        eager = unwrap(model)
        set_model_state_dict(eager, model_sd, options=options)
        set_optimizer_state_dict(eager, optimizer, optim_sd, options=options)
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


# Settings that define a run's math: a resume that changes one of them is a different experiment. Everything else
# (intervals, logging, sampling, kernels, compile, the number of ranks) only observes or computes the same math.
MATH_SETTINGS = ("model", "data", "optim", "precision", "seed")
NOT_MATH = ("data.cache_dir", "data.num_proc", "model.init_from", "model.name")


class ResumeError(ValueError):
    """A resume that would silently change the experiment, or cannot continue it."""


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


_NO_DEFAULT = object()


def _schema_default(key: str, current: dict):
    """The default that gpt2x/config.py gives the setting `key` (e.g. optim.schedule), or _NO_DEFAULT."""
    from gpt2x.config import DATA_SCHEMAS, GROUPS, TrainConfig

    group, _, name = key.partition(".")
    if not name:
        schema, name = TrainConfig, group
    elif group == "data":
        schema = DATA_SCHEMAS.get(current.get("data", {}).get("name"))
    else:
        schema = GROUPS.get(group)
    field = {f.name: f for f in dataclasses.fields(schema)}.get(name) if schema else None
    return _NO_DEFAULT if field is None or field.default is dataclasses.MISSING else field.default


def changed_settings(saved: dict, current: dict, allowed: Iterable[str] = ()) -> dict[str, tuple]:
    """The math settings (MATH_SETTINGS) whose value differs between two resolved configs, as key -> (old, new),
    leaving out the keys in NOT_MATH and those named (or under a name) in `allowed`.

    A setting the checkpoint's config lacks that is at its schema default now is no change: it was added to gpt2x
    after the checkpoint was written, and a new setting's default keeps what the code did before.
    """
    old, new = _flatten(saved), _flatten(current)
    allowed = tuple(allowed)
    changes = {}
    for key in sorted(set(old) | set(new)):
        if not key.startswith(tuple(f"{k}." for k in MATH_SETTINGS) + MATH_SETTINGS) or key in NOT_MATH:
            continue
        if any(key == a or key.startswith(f"{a}.") for a in allowed):
            continue
        if key not in old and key in new and new[key] == _schema_default(key, current):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            changes[key] = (old.get(key, "<absent>"), new.get(key, "<absent>"))
    return changes


class Checkpointer:
    """A run's `checkpoints/` dir: when to save, what a checkpoint holds, and resuming exactly from one.

    A checkpoint holds the weights, optimizer state, step, the data loader's position, every rank's RNG state and the
    config; a resumed run logs the same losses, bit for bit, as one that never stopped.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, dist: DistInfo):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.dist = cfg, dist
        self.resumed: dict | None = None  # what `resume` did, for the run record
        self.extras: dict = {}  # the `extras` of the checkpoint resumed from (e.g. the time-to-target tracker's state)

    def save_if_due(self, step: int, last: bool, model: nn.Module, optimizer, loader, **extras) -> None:
        """Save after every checkpoint_interval completed steps and at the end (interval 10: steps 0-9 as step 9)."""
        if is_due(step + 1, self.cfg.checkpoint_interval, last):
            self.save(step, model, optimizer, loader, **extras)

    def save(self, step: int, model: nn.Module, optimizer, loader, **extras) -> None:
        """Everything needed to continue bit-exactly, plus `extras` (plain values); a collective under DDP/FSDP (every
        rank must call it)."""
        rngs = [capture_rng_state()]
        if self.dist.world_size > 1:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, capture_rng_state())
        model_state, optimizer_state = full_state_dicts(model, optimizer)  # FSDP: gathered to rank 0
        if self.dist.is_main:
            state = {
                "model": model_state,
                "optimizer": optimizer_state,
                "step": step,
                "loader": loader.state_dict(),  # the stream position, shared by all ranks
                "rng": rngs,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "extras": extras,
            }
            save(self.dir, step, state, keep=self.cfg.keep_checkpoints)

    def resume_path(self) -> Path | None:
        """The checkpoint `resume` names: the newest complete one for `auto`, the given path, or None."""
        resume = self.cfg.resume
        if resume is None:
            return None
        if resume != "auto":
            return Path(resume)
        path = latest(self.dir)
        if path is None and list_checkpoints(self.dir):
            raise CheckpointError(
                f"resume=auto: every checkpoint in {self.dir} is incomplete; pass resume=<path> or resume=null "
                "(and another hydra.run.dir) to restart"
            )
        return path

    def resume(self, model: nn.Module, optimizer, loader) -> int:
        """Load the checkpoint `resume` names into model, optimizer, loader and RNGs; return the step to start at.

        Refuses, before loading any weights, a checkpoint whose math settings differ from this run's (unless named in
        `resume_allow`) and a model of another shape. After an explicit resume from an older checkpoint, the later
        ones belong to an abandoned timeline: they move to `checkpoints/abandoned-<time>/`, so `resume=auto` never
        jumps back to them.
        """
        path = self.resume_path()
        if path is None:
            return 0
        state = load(path)
        saved = state.get("config") or {}
        current = OmegaConf.to_container(self.cfg, resolve=True)
        changes = changed_settings(saved, current, self.cfg.resume_allow)
        if changes:
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ResumeError(
                f"resume from {path}: these settings define the run's math and differ from the checkpoint's:\n{lines}\n"
                f"Resume with the checkpoint's values, start a new run (another hydra.run.dir), or accept the change "
                f"with resume_allow=[{','.join(changes)}]"
            )
        _check_shapes(path, state["model"], unwrap(model).state_dict())
        if is_fsdp(model) != (saved.get("parallel", {}).get("name") == "fsdp"):
            raise ResumeError(
                f"resume from {path}: written under parallel={saved.get('parallel', {}).get('name')}, resumed under "
                f"parallel={self.cfg.parallel.name}; FSDP checkpoints key the optimizer state by name, so resume "
                "parallel=fsdp checkpoints with parallel=fsdp and single/ddp ones with single or ddp"
            )
        load_full_state_dicts(model, optimizer, state["model"], state["optimizer"])
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]  # one per rank; resuming on more ranks than saved, the new ones start from rank 0's
        restore_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        self.extras = state.get("extras") or {}
        step = state["step"]
        abandoned = self._set_aside_later(step) if self.cfg.resume != "auto" and self.dist.is_main else None
        allowed = changed_settings(saved, current)
        self.resumed = {"from": str(path), "step": step, "changed": {k: list(v) for k, v in allowed.items()}}
        if abandoned:
            self.resumed["abandoned"] = str(abandoned)
        if allowed:
            self.resumed["checkpoint_config"] = saved
        log.info("resumed from %s at step %d", path, step + 1)
        return step + 1

    def _set_aside_later(self, step: int) -> Path | None:
        later = [p for s, p in list_checkpoints(self.dir) if s > step]
        if not later:
            return None
        aside = self.dir / f"abandoned-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in later:
            shutil.move(str(p), aside / p.name)
        log.warning(
            "resume=%s: continuing from step %d; the later checkpoints of the abandoned run (%s) moved to %s",
            self.cfg.resume, step, ", ".join(p.name for p in later), aside,
        )  # fmt: skip
        return aside


def _check_shapes(path: Path, saved: dict, expected: dict) -> None:
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)}, this model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    missing = sorted(set(expected) - set(saved))
    if mismatched or missing:
        raise ResumeError(
            f"checkpoint {path} holds a model of another shape than model=... here: "
            + "; ".join(mismatched[:4] + ([f"missing {missing[:4]}"] if missing else []))
        )
