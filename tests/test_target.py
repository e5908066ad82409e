"""Time to target: the first eval at or below target_val_loss gives step, tokens and training time (evals excluded)."""

from __future__ import annotations

import json

import pytest
from helpers import compose, run_train

from gpt2x.run.target import objective_value

# 12 steps, an eval every 3 over 8 val batches: evals take a visible share of the run's wall time.
RUN = ["optim.max_steps=12", "optim.lr=3e-3", "optim.warmup_steps=2", "eval_interval=3", "eval_steps=8"]


def val_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


@pytest.fixture(scope="module")
def unreachable(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unreachable")
    return run_dir, run_train(run_dir, RUN + ["target_val_loss=0.5"])


@pytest.mark.slow
def test_a_run_that_misses_the_target_records_nulls_and_its_best_val_loss(unreachable):
    run_dir, summary = unreachable
    rows = val_rows(run_dir)
    assert [r["step"] for r in rows] == [3, 6, 9, 11]
    best = min(rows, key=lambda r: r["val_loss"])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    for s in (summary, on_disk):
        assert s["reached_target"] is False and s["target_val_loss"] == 0.5
        assert s["step_to_target"] is None and s["tokens_to_target"] is None and s["time_to_target_s"] is None
        assert (s["best_val_loss"], s["best_val_step"]) == (best["val_loss"], best["step"])
    assert not any("step_to_target" in r for r in rows)
    # each eval row says where the run stands: tokens trained and training seconds so far, both growing
    assert [r["tokens"] for r in rows] == [r["step"] * summary["tokens_per_step"] for r in rows]
    times = [r["train_time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0


@pytest.mark.slow
def test_a_reached_target_records_the_first_eval_at_or_below_it_with_eval_time_left_out(unreachable, tmp_path):
    _, first = unreachable
    # the same seed trains the same model, so a target between the 2nd and 3rd val loss is first reached at the 3rd
    losses = [r["val_loss"] for r in val_rows(unreachable[0])]
    assert losses[2] < losses[1]
    target = (losses[1] + losses[2]) / 2
    summary = run_train(tmp_path, RUN + [f"target_val_loss={target}"])
    rows = val_rows(tmp_path)
    assert [r["val_loss"] for r in rows] == pytest.approx(losses, abs=1e-6)
    hit = next(r for r in rows if r["val_loss"] <= target)
    assert summary["reached_target"] is True
    assert summary["step_to_target"] == hit["step"] == 9
    assert summary["tokens_to_target"] == hit["tokens_to_target"] == 9 * summary["tokens_per_step"]
    assert summary["time_to_target_s"] == hit["time_to_target_s"] == hit["train_time_s"]
    assert [r for r in rows if "step_to_target" in r] == [hit]  # recorded once, at the first eval below the target
    eval_time = sum(r["eval_s"] for r in rows)
    assert eval_time == pytest.approx(summary["eval_time_s"]) and eval_time > 0
    # training time only: the run's wall time minus every eval still covers the steps up to the target
    assert summary["time_to_target_s"] <= summary["wall_time_s"] - eval_time
    assert summary["time_to_target_s"] < summary["train_time_s"] <= summary["wall_time_s"] - eval_time
    assert summary["steps"] == 12 and len([r for r in rows]) == 4  # without stop_at_target the run goes on


@pytest.mark.slow
def test_stop_at_target_ends_the_run_at_the_eval_that_reaches_it(unreachable, tmp_path):
    losses = [r["val_loss"] for r in val_rows(unreachable[0])]
    target = (losses[0] + losses[1]) / 2
    summary = run_train(tmp_path, RUN + [f"target_val_loss={target}", "stop_at_target=true"])
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["step_to_target"] == 6 and summary["steps"] == 6
    assert [r["step"] for r in metrics] == list(range(7))  # steps 0-5 trained, then the eval at the top of step 6
    assert "loss" not in metrics[-1] and metrics[-1]["step_to_target"] == 6
    assert summary["final_val_loss"] == metrics[-1]["val_loss"] <= target


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["target_val_loss=-1"], "target_val_loss=-1.0 must be a positive loss"),
        (["target_val_loss=3.0", "eval_interval=0"], "eval_interval=0 evaluates only at the end"),
        (["stop_at_target=true"], "stop_at_target=true needs a target"),
        (["objective=speed"], "objective='speed' is not an objective; valid: auto, final_val_loss"),
        (["objective=time_to_target_s"], "objective=time_to_target_s needs target_val_loss"),
    ],
)
def test_bad_target_settings_fail_before_training_naming_the_setting(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_train(tmp_path, overrides)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_the_sweeper_objective_is_time_to_target_with_a_target_and_the_final_val_loss_without():
    summary = {"final_val_loss": 4.2, "best_val_loss": 4.1, "time_to_target_s": 12.5, "tokens_to_target": None}
    assert objective_value(compose([]), summary) == 4.2
    assert objective_value(compose(["target_val_loss=4.0"]), summary) == 12.5
    assert objective_value(compose(["target_val_loss=4.0", "objective=final_val_loss"]), summary) == 4.2
    # a run that missed the target ranks below every run that reached it
    assert objective_value(compose(["target_val_loss=4.0", "objective=tokens_to_target"]), summary) == float("inf")


def test_the_speedrun_experiments_are_the_final_ladder_rung_with_a_target_that_stops_the_run():
    cpu = compose(["+experiment=speedrun_baseline"])
    gpu = compose(["+experiment=speedrun_baseline_gpu"])
    for cfg in (cpu, gpu):
        chosen = (cfg.precision.name, cfg.attention.name, cfg.compile.name, cfg.model.vocab_size, cfg.optim.fused)
        assert chosen == ("bf16", "flash", "default", 50304, True) and cfg.loss.name == "plain"
        assert cfg.stop_at_target and cfg.eval_interval > 0 and cfg.objective == "auto"
    assert (cpu.model.name, cpu.data.name, cpu.parallel.name) == ("small", "shakespeare", "single")
    assert cpu.rung == "fused_adamw"
    assert 0 < cpu.target_val_loss < 10
    assert (gpu.model.name, gpu.data.name, gpu.target_val_loss) == ("gpt2", "fineweb_edu", 3.28)
    assert (gpu.parallel.name, gpu.parallel.nproc_per_node, gpu.data.total_batch_size) == ("ddp", 8, 524288)
