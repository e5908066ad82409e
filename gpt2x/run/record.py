"""The run record: everything needed to know what a run was and to run it again (`run_dir/record.json`).

Composed config, Hydra overrides, seed, code version (git commit + dirty flag), software versions,
hardware, world size, host, command line and time, plus whatever the train loop adds (e.g. the peak
FLOP/s figure used for MFU). Written once by the main rank at the start of a run.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Distributions whose versions decide a run's numbers or speed (import name differs for some: hydra-core).
RECORDED_PACKAGES = (
    "torch",
    "numpy",
    "hydra-core",
    "omegaconf",
    "tiktoken",
    "transformers",
    "wandb",
    "datasets",
)

REPO_DIR = Path(__file__).resolve().parents[2]


@functools.cache
def git_info(repo_dir: str | None = None) -> dict[str, Any]:
    """`{"commit": sha or None, "dirty": bool or None}` for the repo holding this package (None outside git)."""
    cwd = repo_dir or str(REPO_DIR)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # not a checkout, no git, or a repo without commits yet
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    """Python and the key packages' versions (None for one that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in RECORDED_PACKAGES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def device_info(device: str | None = None) -> dict[str, Any]:
    """Accelerator type, name and count as torch sees it, falling back to the CPU's name."""
    import torch

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    from gpt2x.run.metrics import device_name

    kind = str(device).split(":")[0]
    info: dict[str, Any] = {"type": kind, "name": device_name(torch.device(device)), "count": 1}
    if kind == "cuda" and torch.cuda.is_available():
        info["count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["cpu_count"] = os.cpu_count()
    return info


def build_run_record(cfg: DictConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run record as a dict (see module docstring); `extra` keys are merged in last."""
    hydra = hydra_run_info()
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "overrides": hydra.get("overrides"),
        "sweep_dir": hydra.get("sweep_dir"),
        "job_num": hydra.get("job_num"),
        "seed": OmegaConf.select(cfg, "seed", default=None),
        "git": git_info(),
        "versions": package_versions(),
        "device": device_info(OmegaConf.select(cfg, "device", default=None)),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "hostname": socket.gethostname(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    record.update(extra or {})
    return jsonable(record)


def write_json(path: str | Path, data: Any) -> Path:
    """Write strict JSON (NaN/inf as null) atomically: a temp file beside `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_run_record(
    cfg: DictConfig, run_dir: str | Path, extra: dict[str, Any] | None = None, record: dict[str, Any] | None = None
) -> Path:
    """Write `run_dir/record.json` (`record`, or `build_run_record(cfg, extra)`) and return its path.

    A resumed run keeps the records of its earlier starts under `previous` (oldest first), so a run's record shows
    every config it ran under.
    """
    path = Path(run_dir) / "record.json"
    record = dict(record) if record is not None else build_run_record(cfg, extra)
    if path.exists() and (extra or {}).get("resumed"):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            record["previous"] = old.pop("previous", []) + [old]
        except (OSError, ValueError):
            pass
    return write_json(path, record)


# record.json facts that a run's summary is read together with (report rows, `train()`'s return value)
SUMMARY_FACTS = (
    "world_size", "grad_accum_steps", "tokens_per_step", "params", "flops_per_token", "peak_flops",
    "peak_flops_source", "device_name", "rung", "experiment", "config_choices",
)  # fmt: skip


def run_summary(record: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """A run's results (summary.json) with the record's facts beside them: what one reads to compare runs."""
    facts = {k: record.get(k) for k in SUMMARY_FACTS}
    facts["config"] = facts.pop("config_choices")
    facts["torch_version"] = (record.get("versions") or {}).get("torch")
    facts["git_commit"] = (record.get("git") or {}).get("commit")
    facts["device"] = record.get("torch_device")
    return facts | results


def read_run_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """`run_summary` of a finished run dir, or None where it has no summary.json (failed or still running)."""
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        return None
    results = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    record_path = run_dir / "record.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.exists() else {}
    return run_summary(record, results)


# Task overrides that say where things are, not what was run: left out of the W&B run name.
_NOISY_OVERRIDE_KEYS = ("logger", "hydra", "resume")
_NOISY_OVERRIDE_WORDS = ("path", "dir", "url", "sha256")


HYDRA_INFO_ENV = "GPT2X_HYDRA_INFO"


def hydra_run_info() -> dict[str, Any]:
    """Task overrides, multirun flag, sweep dir and job number of the current Hydra job.

    Read from HydraConfig inside the Hydra app; in worker processes spawned by `parallel.launch` (where Hydra
    is not set up) from the environment `export_hydra_info` left; {} otherwise (tests, notebooks).
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - HydraConfig raises ValueError when not set
        env = os.environ.get(HYDRA_INFO_ENV)
        return json.loads(env) if env else {}
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "overrides": list(hc.overrides.task),
        "multirun": multirun,
        "sweep_dir": str(hc.sweep.dir) if multirun else None,
        "job_num": hc.job.get("num") if multirun else None,
        "cwd": hc.runtime.cwd,
    }


def export_hydra_info() -> None:
    """Hand this Hydra job's info (see `hydra_run_info`) to worker processes it spawns, via the environment.

    Call in the Hydra main before starting workers, so that their W&B run name/group and record.json match.
    """
    info = hydra_run_info()
    if info:
        os.environ[HYDRA_INFO_ENV] = json.dumps(info)
    else:
        os.environ.pop(HYDRA_INFO_ENV, None)


def run_name(overrides: list[str]) -> str:
    """W&B run name from the task overrides, minus where-things-are ones: `precision=bf16,attention=flash`."""
    kept = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0] in _NOISY_OVERRIDE_KEYS or any(w in key for w in _NOISY_OVERRIDE_WORDS):
            continue
        kept.append(o.lstrip("+"))
    return ",".join(kept) or "default"


def run_group(info: dict[str, Any]) -> str | None:
    """W&B group: the multirun's sweep dir (shared by all its jobs), relative to the launch dir; None otherwise."""
    if not info.get("multirun") or not info.get("sweep_dir"):
        return None
    sweep = Path(info["sweep_dir"])
    try:
        sweep = sweep.resolve().relative_to(Path(info["cwd"]).resolve())
    except (ValueError, TypeError, KeyError):
        pass
    return str(sweep)[-128:]  # W&B limits group names to 128 characters; the end is the distinctive part


def job_type(cfg: DictConfig) -> str:
    """W&B job_type: the experiment's name when one is set, else "train"."""
    exp = OmegaConf.select(cfg, "experiment", default=None)
    return str(exp) if exp else "train"


def jsonable(obj: Any) -> Any:
    """Plain JSON types for dumps: tensors/numpy scalars via .item(), paths as str, NaN/inf as None (strict JSON)."""
    if OmegaConf.is_config(obj):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):
        try:
            return jsonable(obj.item())
        except (ValueError, RuntimeError):
            pass
    return str(obj)
