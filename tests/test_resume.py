"""Checkpoints resume exactly: a run killed with SIGKILL and resumed logs the same losses as one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY

from gpt2x.run import checkpoint

# Slow enough per step (~0.1-0.5 s) that the kill lands between the 10-step checkpoint and the end of the run.
RESUMABLE = TINY + [
    "data.batch_size=4",
    "data.seq_len=32",
    "optim.max_steps=20",
    "optim.warmup_steps=3",
    "checkpoint_interval=10",
    "eval_interval=0",
    "sample_interval=0",
]


def launch(run_dir, extra=()):
    cmd = [sys.executable, "-m", "gpt2x.train", *RESUMABLE, *extra, f"hydra.run.dir={run_dir}"]
    # its own session, so the kill takes the whole process group: the elastic agent and its workers too
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_to_end(run_dir, extra=()):
    proc = launch(run_dir, extra)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]


def kill_after_checkpoint(run_dir, step, extra=()):
    """Start a run and SIGKILL it as soon as the checkpoint of `step` is on disk."""
    proc = launch(run_dir, extra)
    target = checkpoint.checkpoint_path(run_dir / "checkpoints", step)
    deadline = time.monotonic() + 300
    while not target.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.latest(run_dir / "checkpoints") == target, "the run got to its end before the kill"


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(20))
    return [r["loss"] for r in rows]


@pytest.mark.parametrize(
    "extra", [[], ["parallel=ddp", "parallel.nproc_per_node=2"]], ids=["single", "ddp-2-procs"]
)
def test_a_run_killed_after_a_checkpoint_resumes_to_bit_identical_losses(tmp_path, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_to_end(straight, extra)
    kill_after_checkpoint(resumed, 9, extra)  # 10 steps done (0-9), then SIGKILL, then 10 more on resume
    run_to_end(resumed, [*extra, "resume=auto"])
    assert losses(resumed) == losses(straight)  # exact float equality, not approx


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_resume_from_a_damaged_checkpoint_fails_naming_it(tmp_path, damage):
    run_to_end(tmp_path, ["optim.max_steps=10"])  # one checkpoint: nothing older to fall back to
    ckpt = checkpoint.latest(tmp_path / "checkpoints")
    data = bytearray(ckpt.read_bytes())
    if damage == "truncated":  # as by a full disk or a partial copy
        del data[len(data) // 2 :]
    else:  # flipped bytes inside the weights: the zip still opens, its CRCs do not match
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    ckpt.write_bytes(bytes(data))
    proc = launch(tmp_path, ["resume=auto"])
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0
    assert str(tmp_path / "checkpoints") in out and "resume=" in out
