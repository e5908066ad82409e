"""Run dirs that never lose work: a new run refuses a dir that already holds one, and a finished run stays finished.

The checks run as a Hydra callback before Hydra writes anything into the run dir (`on_run_start`, and for sweeps
`on_multirun_start`), and again in `gpt2x-train`'s main for torchrun and SLURM ranks, which start Hydra themselves.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("gpt2x")

RUN_FILES = ("record.json", "metrics.jsonl", "summary.json")


class RunDirError(RuntimeError):
    """A run would overwrite another run's files."""


def run_files(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to a run (its record, metrics, summary, checkpoints); [] for a new or empty dir."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if any((run_dir / "checkpoints").glob("step_*.pt")):
        found.append("checkpoints/")
    return found


def check_run_dir(run_dir: Path, resume: str | None) -> None:
    """Refuse a new run (resume=null) into a dir that holds a run, before anything in it is touched."""
    found = run_files(run_dir)
    if found and resume is None:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(found)}); nothing was changed. Continue it with resume=auto, "
            "or start a new run in another dir (leave hydra.run.dir to its dated default, or name a new one)"
        )


def finished_step(run_dir: Path, max_steps: int) -> int | None:
    """The step count of a run in `run_dir` that finished `max_steps` steps (its summary.json says so), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    steps = summary.get("steps")
    return steps if isinstance(steps, int) and steps >= max_steps else None


class RunDirGuard(Callback):
    """Hydra callback: the run-dir checks above, before Hydra writes `.hydra/` and the log into the dir."""

    # Hydra turns an exception raised in a callback into a warning and goes on, so a refusal exits here instead.

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir))
        resume = config.get("resume")
        try:
            check_run_dir(run_dir, resume)
        except RunDirError as e:
            raise SystemExit(f"gpt2x-train: {e}") from None
        if resume == "auto" and finished_step(run_dir, config.optim.max_steps) is not None:
            print(
                f"{run_dir}: this run already finished its optim.max_steps={config.optim.max_steps} steps; nothing "
                "to do (raise optim.max_steps with resume_allow=[optim.max_steps] to train on)",
                file=sys.stderr,
            )
            sys.exit(0)
        if resume is not None and (run_dir / ".hydra").is_dir():
            keep_hydra_config(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        taken = [str(p.parent) for p in sweep_dir.glob("*/record.json")] if sweep_dir.is_dir() else []
        if taken and config.get("resume") is None:
            raise SystemExit(
                f"gpt2x-train: sweep dir {sweep_dir} already holds runs ({', '.join(sorted(taken)[:3])}...); nothing "
                "was changed. Use a new hydra.sweep.dir (or its dated default)"
            )


def keep_hydra_config(run_dir: Path) -> Path:
    """Copy the run's `.hydra/` (the config it ran under) aside before a resume rewrites it."""
    kept = run_dir / ".hydra" / "before-resume" / time.strftime("%Y%m%d-%H%M%S")
    kept.mkdir(parents=True, exist_ok=True)
    for path in (run_dir / ".hydra").glob("*.yaml"):
        shutil.copy2(path, kept / path.name)
    return kept


def restore_hydra_config(run_dir: Path) -> None:
    """Put back the newest `.hydra/` copy: a refused resume leaves the run's config as it was."""
    copies = sorted((run_dir / ".hydra" / "before-resume").glob("*"))
    if copies:
        for path in copies[-1].glob("*.yaml"):
            shutil.copy2(path, run_dir / ".hydra" / path.name)
        shutil.rmtree(copies[-1], ignore_errors=True)


def last_logged_step(run_dir: Path) -> int | None:
    """The last step in `run_dir/metrics.jsonl`, or None."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None

