"""The trainer end to end on a tiny model: run records, learning, accumulation, and clear errors for bad input."""

from __future__ import annotations

import json
import re

import pytest
from helpers import TINY, losses, read_metrics, run_train, train_cli


def test_a_run_writes_metrics_summary_and_record_and_its_loss_falls(tmp_path):
    summary = run_train(tmp_path, ["optim.max_steps=12", "optim.lr=3e-3", "optim.warmup_steps=2", "eval_interval=6"])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(12))
    for key in ("loss", "lr", "grad_norm", "ms_per_batch", "tokens_per_sec", "mfu", "peak_mem_bytes"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 11]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # from ~10.8 (uniform over 50257 tokens) it must learn something
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final_loss"] == pytest.approx(summary["final_loss"]) == pytest.approx(rows[-1]["loss"])
    assert on_disk["timed_steps"] == 12 - 1  # TINY leaves the first step out of the timing summary
    assert on_disk["ms_per_batch_p10"] <= on_disk["ms_per_batch"] <= on_disk["ms_per_batch_p90"]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["config"]["seed"] == 1337 and "torch" in json.dumps(record)


@pytest.mark.slow  # two training runs
def test_gradient_accumulation_matches_one_bigger_batch_over_the_same_tokens(tmp_path):
    # B=2 with 2 micro-steps reads the same 4 sequences as B=4 in one step, so the steps must agree.
    accum = run_train(tmp_path / "accum", ["data.batch_size=2", "data.total_batch_size=128", "eval_interval=0"])
    big = run_train(tmp_path / "big", ["data.batch_size=4", "eval_interval=0"])
    assert accum["grad_accum_steps"] == 2 and big["grad_accum_steps"] == 1
    losses_accum = losses(tmp_path / "accum")
    losses_big = losses(tmp_path / "big")
    assert losses_accum == pytest.approx(losses_big, abs=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.seq_len=256"], "data.seq_len=256 exceeds model.block_size=128"),
        (["data.total_batch_size=100"], "data.total_batch_size=100 is not divisible"),
        (["data=text", "data.path=/no/such/corpus"], "data.path"),
        (["precision=fp16"], "precision.allow_slow=true"),
        (["device=cuda"], "CUDA is not available"),
    ],
)
def test_bad_input_fails_before_training_with_a_message_naming_the_setting(tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace(".", r"\.").replace("*", r"\*")):
        run_train(tmp_path, overrides)
    assert not (tmp_path / "metrics.jsonl").exists() or not read_metrics(tmp_path)


@pytest.mark.slow
def test_the_cli_runs_a_hydra_job_into_its_own_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    out = train_cli([*TINY, "optim.max_steps=2", f"hydra.run.dir={run_dir}"])
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / ".hydra" / "overrides.yaml").exists()
    assert len(read_metrics(run_dir)) == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert "sample 0 | First Citizen:" in out.stdout + out.stderr


def test_hellaswag_is_evaluated_in_training_and_logged_as_an_accuracy(tmp_path):
    from test_hellaswag import make_examples, write_examples

    path = write_examples(tmp_path / "hellaswag_val.jsonl", make_examples())
    run_train(tmp_path / "run", ["optim.max_steps=3", "hellaswag_interval=2", f"hellaswag_path={path}"])
    rows = read_metrics(tmp_path / "run")
    scored = [r for r in rows if "hellaswag" in r]
    assert [r["step"] for r in scored] == [2]  # the interval's step, which is also the last
    assert 0.0 <= scored[0]["hellaswag"] <= 1.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from gpt2x.run import checkpoint

    # An absurd learning rate blows the weights up within a few steps: a real divergence, not an injected NaN.
    overrides = ["optim.max_steps=20", "optim.lr=1e9", "optim.warmup_steps=1", "checkpoint_interval=1"]
    with pytest.raises(FloatingPointError, match=r"step (\d+): loss=.* is not finite") as e:
        run_train(tmp_path, overrides)
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert 0 < bad_step < 19
    last_good = checkpoint.latest(tmp_path / "checkpoints")
    assert last_good == checkpoint.checkpoint_path(tmp_path / "checkpoints", bad_step - 1)
    assert checkpoint.load(last_good)["step"] == bad_step - 1
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(bad_step))
