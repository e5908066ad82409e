"""Seeds as a sweep dimension: runs differing only in seed form one configuration with mean ± std, a Welch p-value
against the baseline and the speedrunner's plot; an Optuna search over the lr writes its best lr."""

from __future__ import annotations

import math

import pytest
from helpers import compose
from omegaconf import OmegaConf
from test_report import PNG_MAGIC, multirun, read_csv

from gpt2x.run.report import main
from gpt2x.run.seeds import speedup_with_spread, welch_p_value

# every run reaches the target (tiny model at a high lr drops below 10.5 within a few steps): time to target exists
TARGETED = ["optim.max_steps=6", "optim.lr=1e-2", "eval_interval=2", "target_val_loss=10.5"]


@pytest.fixture(scope="module")
def seed_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("seeds")
    out = multirun(sweep_dir, *TARGETED, "attention=manual,sdpa", "seed=1,2")
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir, out.stdout


@pytest.mark.slow
def test_a_seed_sweep_groups_runs_by_configuration_with_a_p_value_and_the_loss_curves(seed_sweep):
    sweep_dir, stdout = seed_sweep
    runs = read_csv(sweep_dir / "sweep.csv")
    assert [(r["run"], r["config"], r["seed"]) for r in runs] == [
        ("attention=manual seed=1", "attention=manual", "1"),
        ("attention=manual seed=2", "attention=manual", "2"),
        ("attention=sdpa seed=1", "attention=sdpa", "1"),
        ("attention=sdpa seed=2", "attention=sdpa", "2"),
    ]
    assert all(r["step_to_target"] and float(r["time_to_target_s"]) > 0 for r in runs)
    groups = read_csv(sweep_dir / "sweep_seeds.csv")
    assert [(g["config"], g["n"], g["reached"], g["compared_on"]) for g in groups] == [
        ("attention=manual", "2", "2", "time_to_target_s"),
        ("attention=sdpa", "2", "2", "time_to_target_s"),
    ]
    base, other = groups
    times = [[float(r["time_to_target_s"]) for r in runs if r["config"] == g["config"]] for g in groups]
    assert float(other["time_to_target_s_mean"]) == pytest.approx(sum(times[1]) / 2)
    assert float(other["speedup"]) == pytest.approx(sum(times[0]) / sum(times[1]))
    assert float(base["speedup"]) == 1.0 and base["p_value"] == ""  # the baseline is not tested against itself
    assert 0 < float(other["p_value"]) <= 1 and math.isfinite(float(other["speedup_std"]))
    markdown = (sweep_dir / "sweep.md").read_text()
    assert "## Per configuration, over seeds" in markdown and "| attention=sdpa | 2 | 2/2 |" in markdown
    assert "tokens to target | time to target |" in markdown  # the per-run table gains the to-target columns
    assert "| attention=sdpa | 2 | 2/2 |" in stdout
    for name in ("sweep.png", "sweep_curves.png"):
        png = (sweep_dir / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000


@pytest.mark.slow
def test_the_baseline_configuration_is_a_setting_and_an_unknown_one_names_the_valid_ones(seed_sweep, capsys):
    sweep_dir, _ = seed_sweep
    assert main([str(sweep_dir), "-q", "--baseline", "attention=sdpa"]) == 0
    groups = read_csv(sweep_dir / "sweep_seeds.csv")
    assert [g["baseline"] for g in groups] == ["attention=sdpa"] * 2
    assert float(groups[1]["speedup"]) == 1.0 and groups[0]["p_value"] != ""
    assert "Speed-up vs report_baseline=attention=sdpa" in (sweep_dir / "sweep.md").read_text()
    with pytest.raises(SystemExit):
        main([str(sweep_dir), "--baseline", "attention=flash"])
    assert "report_baseline='attention=flash' is not a configuration of this sweep; valid: 'attention=manual'" in (
        capsys.readouterr().err
    )


def test_welch_p_value_and_speedup_spread_match_hand_computed_figures():
    # t = -3/sqrt(2/3) = -3.674 with 4 degrees of freedom: two-sided p = 0.0213
    assert welch_p_value([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.0213, abs=1e-4)
    assert welch_p_value([1.0], [2.0, 3.0]) is None  # one run has no spread to test
    ratio, spread = speedup_with_spread([10.0, 12.0], [5.0, 5.0])
    assert ratio == pytest.approx(2.2) and spread == pytest.approx(2.2 * math.sqrt(2) / 11)


@pytest.mark.slow
def test_an_optuna_lr_search_runs_its_trials_and_writes_the_best_lr(tmp_path):
    out = multirun(tmp_path, "+hparams_search=lr", "hydra.sweeper.n_trials=2")
    assert out.returncode == 0, out.stderr[-3000:]
    results = OmegaConf.load(tmp_path / "optimization_results.yaml")
    trials = read_csv(tmp_path / "sweep.csv")
    assert len(trials) == 2 and all(r["status"] == "ok" for r in trials)
    best = min(trials, key=lambda r: float(r["final_val_loss"]))  # objective auto without a target: final val loss
    assert results.best_value == pytest.approx(float(best["final_val_loss"]))
    assert f"optim.lr={results.best_params['optim.lr']}" in best["overrides"]
    assert 1e-4 <= results.best_params["optim.lr"] <= 3e-2


def test_the_lr_search_config_uses_the_optuna_sweeper_on_a_log_scale():
    cfg = compose(["+hparams_search=lr"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    assert cfg.hydra.sweeper.params["optim.lr"] == "tag(log, interval(1e-4, 3e-2))"
    assert cfg.objective == "auto"
