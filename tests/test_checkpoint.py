"""Checkpoints: atomic under SIGKILL, keep-last-K, integrity-checked loads, weights_only round trips, RNG replay."""

import logging
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_env
from omegaconf import OmegaConf

from gpt2x.config import ModelConfig
from gpt2x.model.gpt import GPT
from gpt2x.run import checkpoint
from gpt2x.run.checkpoint import CheckpointError


def small_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "optimizer": {}, "step": step}


def tiny_model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16), real_vocab_size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def train_step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (2, 8), generator=g)
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_full_checkpoint_round_trips_under_weights_only_and_resumes_training_identically(tmp_path):
    model, optimizer = tiny_model_and_optimizer()
    train_step(model, optimizer, seed=1)
    config = OmegaConf.to_container(
        OmegaConf.create({"model": {"n_layer": 1, "tags": ["a", "b"]}, "optim": {"lr": 1e-2, "fused": None}}),
        resolve=True,
    )
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 1,
        "loader": {"epoch": 0, "shard_index": 2, "position": 4096},
        "rng": checkpoint.capture_rng_state(),
        "config": config,
    }
    path = checkpoint.save(tmp_path, 1, state, keep=2)
    assert path == tmp_path / "step_000001.pt"

    loaded = checkpoint.load(path)  # weights_only=True inside: fails if anything above is not plain data
    assert loaded["step"] == 1 and loaded["loader"] == state["loader"] and loaded["config"] == config
    model2, optimizer2 = tiny_model_and_optimizer(seed=123)  # different init: everything must come from the file
    model2.load_state_dict(loaded["model"])
    optimizer2.load_state_dict(loaded["optimizer"])
    train_step(model, optimizer, seed=2)
    train_step(model2, optimizer2, seed=2)
    for (name, p), p2 in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(p, p2), name


def test_rng_state_round_trip_through_a_checkpoint_repeats_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state, which must survive too
    checkpoint.save(tmp_path, 5, {**small_state(5), "rng": checkpoint.capture_rng_state()}, keep=1)

    def draws():
        return (
            [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.rand(3).tolist() + [np.random.randn()],
            torch.rand(3).tolist() + torch.randn(2).tolist(),
        )

    expected = draws()
    draws()  # move every generator on, so restoring has to actually rewind them
    checkpoint.restore_rng_state(checkpoint.load(checkpoint.latest(tmp_path))["rng"])
    assert draws() == expected


def test_keep_last_k_deletes_the_oldest_and_never_the_checkpoint_just_written(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, small_state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000030.pt", "step_000040.pt"]

    # Resumed from an older checkpoint: the new (lower-step) one is kept, the rest trimmed to keep - 1 newest.
    checkpoint.save(tmp_path, 35, small_state(35), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000035.pt", "step_000040.pt"]
    checkpoint.save(tmp_path, 36, small_state(36), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000036.pt"]

    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        checkpoint.save(tmp_path, 37, small_state(37), keep=0)


def test_latest_is_the_highest_step_and_ignores_temp_and_foreign_files(tmp_path):
    assert checkpoint.latest(tmp_path / "missing") is None
    assert checkpoint.latest(tmp_path) is None
    for step in (9, 100, 1_000_000):  # 7 digits sorts after 6 by number, not by name
        checkpoint.save(tmp_path, step, small_state(step), keep=10)
    (tmp_path / ".step_2000000.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert checkpoint.latest(tmp_path) == tmp_path / "step_1000000.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 1_000_000


def test_truncated_checkpoint_raises_checkpoint_error_naming_resume_and_latest_falls_back(tmp_path, caplog):
    good = checkpoint.save(tmp_path, 1, small_state(1), keep=5)
    data = good.read_bytes()
    bad = tmp_path / "step_000002.pt"
    bad.write_bytes(data[: len(data) // 2])  # e.g. an interrupted copy between machines

    with pytest.raises(CheckpointError, match=r"step_000002\.pt is corrupt or truncated.*resume=") as info:
        checkpoint.load(bad)
    assert isinstance(info.value, RuntimeError)
    with caplog.at_level(logging.WARNING, logger="gpt2x"):
        assert checkpoint.latest(tmp_path) == good
    # the skip is in the run's log (console and train.log), naming the file and why
    assert f"skipping checkpoint {bad}: it is incomplete" in caplog.text
    assert checkpoint.load(good)["step"] == 1


@pytest.mark.parametrize("where", [0.5, 0.02, -200])
def test_flipped_bytes_anywhere_raise_checkpoint_error(tmp_path, where):
    state = {"model": {"w": torch.arange(20_000, dtype=torch.float32)}, "optimizer": {}, "step": 3}
    path = checkpoint.save(tmp_path, 3, state, keep=1)
    data = bytearray(path.read_bytes())
    pos = int(len(data) * where) if where > 0 else len(data) + where  # tensor bytes, pickle, zip directory
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(path)


def test_non_checkpoint_files_and_missing_keys_raise_clear_errors(tmp_path):
    junk = tmp_path / "step_000001.pt"
    junk.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.load(junk)

    weights_only = tmp_path / "weights.pt"
    torch.save({"model": {}}, weights_only)
    with pytest.raises(CheckpointError, match=r"lacks keys \['optimizer', 'step'\]"):
        checkpoint.load(weights_only)
    assert checkpoint.load(weights_only, required_keys=("model",)) == {"model": {}}

    with pytest.raises(FileNotFoundError, match="resume="):
        checkpoint.load(tmp_path / "nope.pt")


# Saves the checkpoints of steps 1, 2 and 3 (keep=2) and SIGKILLs itself inside the save of step 3, at the point
# argv[2] names: "writing" (halfway through the temp file's bytes) or "renaming" (temp file complete and fsynced, not
# yet renamed into place). Wrapping torch.save and os.replace, which checkpoint.save calls, places the kill exactly.
_KILLED_INSIDE_A_SAVE = """
import contextlib, io, os, signal, sys, torch
from gpt2x.run import checkpoint

ckpt_dir, where, kill_step = sys.argv[1], sys.argv[2], 3
real_torch_save, real_replace = torch.save, os.replace

def torch_save_half_then_die(obj, f, *args, **kwargs):
    if where != "writing" or obj["step"] != kill_step:
        return real_torch_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_torch_save(obj, buffer, *args, **kwargs)
    with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as out:
        out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        out.flush()
        os.kill(os.getpid(), signal.SIGKILL)

def die_before_rename(src, dst, *args, **kwargs):
    if where == "renaming" and os.path.basename(dst) == checkpoint.checkpoint_path(ckpt_dir, kill_step).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

torch.save, os.replace = torch_save_half_then_die, die_before_rename
state = {"model": {"w": torch.randn(1_000_000)}, "optimizer": {}}
for step in range(1, kill_step + 1):
    checkpoint.save(ckpt_dir, step, dict(state, step=step), keep=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_sigkill_during_saves_never_leaves_a_partial_checkpoint(tmp_path, where):
    ckpt_dir = tmp_path / "checkpoints"
    cmd = [sys.executable, "-c", _KILLED_INSIDE_A_SAVE, str(ckpt_dir), where]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    temps = list(ckpt_dir.glob(".step_*.tmp"))
    assert temps, "a save killed at its kill point left no temp file: does it still write a temp file first?"
    checkpoints = checkpoint.list_checkpoints(ckpt_dir)
    assert checkpoints, "the first checkpoint must survive"
    assert [step for step, _ in checkpoints] == [1, 2]  # the killed save of step 3 left nothing under its name
    for step, path in checkpoints:  # every file under a checkpoint name is complete
        assert checkpoint.load(path)["step"] == step
    newest_step = checkpoints[-1][0]
    assert checkpoint.load(checkpoint.latest(ckpt_dir))["step"] == newest_step

    # The next save (the resumed run's first) sweeps the killed save's temp file away.
    checkpoint.save(ckpt_dir, newest_step + 1, small_state(newest_step + 1), keep=2)
    assert not list(ckpt_dir.glob(".step_*.tmp"))


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 256 KiB filesystem (tmpfs), so a save runs into ENOSPC exactly as on a full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_save_onto_a_full_disk_says_no_space_left_naming_the_path_and_keeps_earlier_checkpoints(small_disk):
    ckpt_dir = small_disk / "checkpoints"
    checkpoint.save(ckpt_dir, 0, small_state(0), keep=2)
    too_big = {**small_state(1), "model": {"w": torch.zeros(512 * 1024 // 4)}}  # 512 KiB on a 256 KiB disk
    with pytest.raises(OSError, match=f"no space left on device while saving checkpoint {ckpt_dir / 'step_000001.pt'}"):
        checkpoint.save(ckpt_dir, 1, too_big, keep=2)
    assert [p.name for p in ckpt_dir.iterdir()] == ["step_000000.pt"]  # no temp file left filling the disk
    assert checkpoint.load(checkpoint.latest(ckpt_dir))["step"] == 0
