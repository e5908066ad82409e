"""Run dirs and resume that never lose work (issue: a rerun, a resume under changed settings, a Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, cli_env, compose, run_train, train_cli

from gpt2x.run import checkpoint
from gpt2x.run.checkpoint import ResumeError
from gpt2x.validate import validate

CLI = [*TINY, "peak_flops=1e12", "optim.max_steps=2", "checkpoint_interval=1", "sample_interval=0"]


def cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`gpt2x-train` in a subprocess, as a user runs it, into `run_dir`."""
    return train_cli([*CLI, *overrides, f"hydra.run.dir={run_dir}"], ok=False)


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `run_dir` with its bytes and modification time."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


@pytest.mark.slow
def test_a_new_run_refuses_a_dir_that_holds_a_run_and_resume_auto_on_a_finished_run_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert cli(run_dir).returncode == 0
    before = snapshot(run_dir)

    again = cli(run_dir)  # the same hydra.run.dir, without resume
    assert again.returncode != 0
    assert f"{run_dir} already holds a run" in again.stderr and "resume=auto" in again.stderr
    assert snapshot(run_dir) == before  # not one byte or timestamp of the old run changed, .hydra/ included

    finished = cli(run_dir, "resume=auto")
    assert finished.returncode == 0, finished.stderr
    assert "already finished its optim.max_steps=2 steps; nothing to do" in finished.stderr
    assert snapshot(run_dir) == before
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_loss"] is not None and summary["steps"] == 2


@pytest.mark.slow
def test_resume_refuses_changed_math_settings_naming_old_and_new_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["optim.max_steps=2", "checkpoint_interval=1"])
    changed = ["resume=auto", "optim.max_steps=4", "optim.lr=1e-3", "data.seq_len=16", "seed=7", "log_interval=2"]
    with pytest.raises(ResumeError) as info:
        run_train(run_dir, changed)
    message = str(info.value)
    for line in ("optim.lr: 0.0006 -> 0.001", "optim.max_steps: 2 -> 4", "data.seq_len: 32 -> 16", "seed: 1337 -> 7"):
        assert line in message
    assert "log_interval" not in message  # observes the run, does not define it
    assert "resume_allow=[data.seq_len,optim.lr,optim.max_steps,seed]" in message

    # naming the change continues the run; the record keeps the checkpoint's config beside the new one
    summary = run_train(run_dir, ["resume=auto", "optim.max_steps=4", "resume_allow=[optim.max_steps]"])
    assert summary["steps"] == 4
    record = json.loads((run_dir / "record.json").read_text())
    assert record["resumed"]["changed"] == {"optim.max_steps": [2, 4]}
    assert record["resumed"]["checkpoint_config"]["optim"]["max_steps"] == 2
    assert record["config"]["optim"]["max_steps"] == 4
    assert record["previous"][0]["config"]["optim"]["max_steps"] == 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


@pytest.mark.slow
def test_resume_of_a_model_of_another_shape_names_both_shapes_and_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["optim.max_steps=1", "checkpoint_interval=1"])
    ckpt = run_dir / "checkpoints" / "step_000000.pt"
    with pytest.raises(ResumeError, match=r"model.n_embd: 64 -> 128"):
        run_train(run_dir, [f"resume={ckpt}", "optim.max_steps=2", "model.n_embd=128"])
    allow = "resume_allow=[optim.max_steps,model.n_embd]"
    shapes = r"transformer.wte.weight: checkpoint \(50257, 64\), this model \(50257, 128\)"
    with pytest.raises(ResumeError, match=rf"{ckpt} holds a model of another shape.*{shapes}"):
        run_train(run_dir, [f"resume={ckpt}", "optim.max_steps=2", "model.n_embd=128", allow])


@pytest.mark.slow
def test_an_explicit_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["optim.max_steps=4", "checkpoint_interval=1", "keep_checkpoints=4"])
    old_step3 = (run_dir / "checkpoints" / "step_000003.pt").read_bytes()
    run_train(run_dir, ["resume=" + str(run_dir / "checkpoints" / "step_000001.pt"), "optim.max_steps=4",
                        "checkpoint_interval=1", "keep_checkpoints=4"])  # fmt: skip
    (aside,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_000002.pt", "step_000003.pt"]
    assert (aside / "step_000003.pt").read_bytes() == old_step3
    # resume=auto now continues the new timeline, never the abandoned one
    assert checkpoint.latest(run_dir / "checkpoints") == run_dir / "checkpoints" / "step_000003.pt"
    record = json.loads((run_dir / "record.json").read_text())
    assert record["resumed"]["abandoned"] == str(aside)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the history matches the checkpoint in use: rows 2-3 are the new run's


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["log_interval=0"], r"log_interval=0 must be at least 1"),
        (["checkpoint_interval=5", "keep_checkpoints=0"], r"keep_checkpoints=0 must be at least 1 when checkpoint_"),
        (["optim.lr=0"], r"optim.lr=0.0 must be positive"),
        (["optim.lr=-1e-3"], r"optim.lr=-0.001 must be positive"),
        (["eval_interval=5", "eval_steps=0"], r"eval_steps=0 must be at least 1 when eval_interval > 0"),
        (["sample_interval=-1"], r"sample_interval=-1 must be >= 0 \(0 = never"),
        (["resume=outputs/run"], r"resume=outputs/run: use resume=auto, resume=null or the path of a step_NNNNNN"),
    ],
)
def test_bad_run_settings_are_refused_before_any_work_naming_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose(TINY + overrides), torch.device("cpu"), 1)


@pytest.mark.slow
def test_a_run_that_never_evaluates_writes_strict_json_with_null_val_loss(tmp_path):
    run_train(tmp_path, ["eval_interval=0", "optim.max_steps=1"])
    text = (tmp_path / "summary.json").read_text()

    def refuse(constant):
        raise ValueError(f"summary.json holds {constant}, which strict JSON parsers reject")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["final_val_loss"] is None and summary["final_loss"] > 0


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The CLI with stderr apart from stdout (the interruption must be its one stderr line)."""
    cmd = [sys.executable, "-m", "gpt2x.train", *TINY, "peak_flops=1e12", "optim.max_steps=100000",
           "checkpoint_interval=1", "eval_interval=0", "sample_interval=0", *overrides, f"hydra.run.dir={run_dir}"]
    # a session of its own: Ctrl-C in a terminal signals the whole foreground process group, workers included
    return subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, already exited, do not count)."""
    ps = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
    return any(not stat.startswith("Z") for stat in ps)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)  # polling for the event, not timing the kill


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel=single"], ["parallel=ddp", "parallel.nproc_per_node=2"]])
def test_ctrl_c_ends_a_run_with_one_line_exit_130_and_usable_checkpoints(tmp_path, layout):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, *layout)
    _wait_for(run_dir / "checkpoints" / "step_000002.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2x-train: interrupted ("), stderr[-3000:]
    assert "continue with resume=auto" in lines[0]
    deadline = time.monotonic() + 20
    while _group_alive(proc.pid):  # no worker outlives the run (an exited one may linger as a zombie until reaped)
        assert time.monotonic() < deadline, subprocess.run(["ps", "-g", str(proc.pid)], capture_output=True).stdout
        time.sleep(0.1)
    newest = checkpoint.latest(run_dir / "checkpoints")
    assert checkpoint.load(newest)["step"] >= 2
