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
    kind = str(device).split(":")[0]
    info: dict[str, Any] = {"type": kind, "name": None, "count": 1}
    if kind == "cuda" and torch.cuda.is_available():
        info["name"] = torch.cuda.get_device_name()
        info["count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def build_run_record(cfg: DictConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run record as a dict (see module docstring); `extra` keys are merged in last."""
    from gpt2x.run.logger import hydra_run_info, jsonable

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


def write_run_record(cfg: DictConfig, run_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/record.json` (see `build_run_record`) and return its path."""
    path = Path(run_dir) / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_run_record(cfg, extra), indent=2) + "\n", encoding="utf-8")
    return path
