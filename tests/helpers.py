"""Test plumbing in one place: the real composed config, training in this process or through the CLI, a run's files.

Tests import from here (`from helpers import compose, TINY`); conftest.py sets the offline environment and fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Small and quick: a 2-layer model, short sequences, few steps, no periodic evals or samples until the end.
TINY = [
    "model=tiny",
    "data.batch_size=2",
    "data.seq_len=32",
    "optim.max_steps=3",
    "optim.warmup_steps=1",
    "eval_steps=1",
    "sample_max_tokens=4",
    "sample_count=1",
    "timing_warmup_steps=1",
]

# Set by a launcher in the shell running the tests; a child that inherits them would think it is already a rank.
_RANK_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The real composed config (conf/config.yaml) with command-line style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gpt2x.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def yaml_options(group: str) -> list[str]:
    """The options a user can pick for a config group: the names of conf/<group>/*.yaml, sorted.

    Raises if there are none, so a test parametrized by them cannot pass by collecting nothing (a moved conf/, a typo).
    """
    options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if not options:
        groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()) if CONF_DIR.is_dir() else []
        raise FileNotFoundError(f"no {CONF_DIR}/{group}/*.yaml: {group!r} is not a config group here; groups: {groups}")
    return options


def tiny_corpus() -> Path:
    """The first 200 kB of the Shakespeare corpus as a text file in the session's cache, written on first use."""
    path = Path(os.environ["GPT2X_CACHE_DIR"]) / "tiny_corpus.txt"
    if not path.is_file():
        from gpt2x.data import shakespeare

        path.write_text(shakespeare.render_plays()[:200_000], encoding="utf-8")
    return path


def run_train(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Train in this process on the TINY composed config plus `overrides`, and return the summary.

    Unless `overrides` pick a dataset, the run reads tiny_corpus() as data=text: data=shakespeare renders all 38 plays
    on every run (twice, to check its cache), which was most of a tiny run's time. data=shakespeare is tested in
    test_data.py and by every CLI test.
    """
    from gpt2x.train import train

    overrides = overrides or []
    data = [] if any(o.startswith("data=") for o in overrides) else ["data=text", f"data.path={tiny_corpus()}"]
    cfg = compose(TINY + data + overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(cfg, run_dir)


def cli_env(**extra: str) -> dict:
    """The environment for a gpt2x subprocess: offline, this checkout importable, unbuffered, not already a rank."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**env, **extra}


def train_cli(args: list[str], cwd: Path = REPO, timeout: float = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m gpt2x.train ARGS` (what gpt2x-train runs) to its end; with `ok`, assert that it succeeded."""
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2x.train", *args],
        cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if ok:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def start_train_cli(args: list[str], cwd: Path = REPO, **env: str) -> subprocess.Popen:
    """Start `python -m gpt2x.train ARGS` in its own session (a kill of its group takes its workers too).

    stdout and stderr together are in `proc.stdout` (bytes).
    """
    return subprocess.Popen(
        [sys.executable, "-m", "gpt2x.train", *args],
        cwd=cwd, env=cli_env(**env), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def read_metrics(run_dir: Path) -> list[dict]:
    """Every line of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    """The per-step training loss of a run, from its metrics.jsonl."""
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def needs_tiny_shakespeare() -> Path:
    """Karpathy's Tiny Shakespeare beside the clone (../shared/data), or skip the test."""
    if not TINY_SHAKESPEARE.is_file():
        pytest.skip(f"needs Tiny Shakespeare at {TINY_SHAKESPEARE} (the shared/ folder beside the clone)")
    return TINY_SHAKESPEARE
