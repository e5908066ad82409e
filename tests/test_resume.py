"""Checkpoints resume exactly: a run killed with SIGKILL and resumed logs the same losses as one that never stopped."""

from __future__ import annotations

import shutil
import signal

import pytest
from helpers import TINY, read_metrics, run_train, start_train_cli, train_cli

from gpt2x.run import checkpoint
from gpt2x.run.checkpoint import TEST_KILL_AFTER_CHECKPOINT, CheckpointError

STEPS = 6
RESUMABLE = TINY + [
    f"optim.max_steps={STEPS}",
    "optim.warmup_steps=2",
    "checkpoint_interval=3",  # checkpoints of steps 2 and 5
    "eval_interval=0",
    "sample_interval=0",
]


def kill_after_checkpoint(run_dir, step, extra=()):
    """Run to the checkpoint of `step`, where the run SIGKILLs itself and its workers (a hook in checkpoint.save)."""
    args = [*RESUMABLE, *extra, f"hydra.run.dir={run_dir}"]
    proc = start_train_cli(args, **{TEST_KILL_AFTER_CHECKPOINT: str(step)})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out.decode()[-3000:]
    target = checkpoint.checkpoint_path(run_dir / "checkpoints", step)
    assert checkpoint.latest(run_dir / "checkpoints") == target, "the run got to its end before the kill"


def losses(run_dir):
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["parallel=ddp", "parallel.nproc_per_node=2"]], ids=["single", "ddp-2-procs"]
)
def test_a_run_killed_after_a_checkpoint_resumes_to_bit_identical_losses(tmp_path, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli([*RESUMABLE, *extra, f"hydra.run.dir={straight}"])
    kill_after_checkpoint(resumed, 2, extra)  # 3 steps done (0-2), then SIGKILL, then 3 more on resume
    train_cli([*RESUMABLE, *extra, "resume=auto", f"hydra.run.dir={resumed}"])
    assert losses(resumed) == losses(straight)  # exact float equality, not approx


@pytest.fixture(scope="module")
def one_checkpoint_run(tmp_path_factory):
    """A finished run dir with one checkpoint: nothing older to fall back to."""
    run_dir = tmp_path_factory.mktemp("one_checkpoint")
    run_train(run_dir, RESUMABLE[len(TINY) :] + ["optim.max_steps=3"])
    assert len(checkpoint.list_checkpoints(run_dir / "checkpoints")) == 1
    return run_dir


@pytest.mark.filterwarnings("ignore:skipping incomplete checkpoint")  # what `latest` says about the truncated one
@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_resume_from_a_damaged_checkpoint_fails_naming_it(tmp_path, one_checkpoint_run, damage):
    shutil.copytree(one_checkpoint_run / "checkpoints", tmp_path / "checkpoints")
    ckpt = checkpoint.latest(tmp_path / "checkpoints")
    data = bytearray(ckpt.read_bytes())
    if damage == "truncated":  # as by a full disk or a partial copy
        del data[len(data) // 2 :]
    else:  # flipped bytes inside the weights: the zip still opens, its CRCs do not match
        data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as failure:
        run_train(tmp_path, RESUMABLE[len(TINY) :] + ["optim.max_steps=3", "resume=auto"])
    out = str(failure.value)
    assert str(tmp_path / "checkpoints") in out and "resume=" in out
