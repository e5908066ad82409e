"""Local run logging (console, metrics.jsonl, samples.jsonl, summary.json), W&B naming rules and record.json."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
from omegaconf import DictConfig, OmegaConf

from gpt2x.run.logger import NullLogger, RunLogger, build_logger, format_metrics, resolve_mode, wandb_has_credentials
from gpt2x.run.record import (
    HYDRA_INFO_ENV,
    git_info,
    job_type,
    package_versions,
    run_group,
    run_name,
    write_run_record,
)

STEP = {
    "loss": 5.12345,
    "lr": 6e-4,
    "grad_norm": 1.234,
    "ms_per_batch": 123.44,
    "tokens_per_sec": 8300.2,
    "mfu": 0.1234,
    "peak_mem_bytes": 3 * 2**30,
}


def make_cfg(name: str = "none", **logger) -> DictConfig:
    """A config with just what the logger and record read (the real one is composed in test_wandb.py)."""
    base = {"name": name, "project": "gpt2x", "entity": None, "mode": "offline", "tags": [], "notes": None}
    return OmegaConf.create({"seed": 7, "experiment": None, "logger": {**base, "init_timeout": 30, **logger}})


@pytest.fixture(autouse=True)
def no_hydra_info(monkeypatch, tmp_path):
    """No leaked Hydra job info or W&B credentials from the shell running the tests."""
    monkeypatch.delenv(HYDRA_INFO_ENV, raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_console_line_is_compact_and_shows_only_the_metrics_given():
    line = format_metrics(10, STEP)
    assert line == (
        "step    10 | loss 5.1235 | lr 6.00e-04 | norm 1.23 | 123.4 ms | 8,300 tok/s | mfu 12.3% | mem 3.00 GiB"
    )
    assert format_metrics(20, {"val_loss": 5.3, "hellaswag": 0.29}) == "step    20 | val 5.3000 | hella 0.2900"


def test_main_rank_writes_metrics_samples_and_summary(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gpt2x")
    logger = build_logger(make_cfg(), tmp_path, is_main=True)
    assert isinstance(logger, RunLogger) and logger.wandb_run is None
    for step in range(3):
        logger.log(step, {**STEP, "loss": 5.0 - step})
    logger.log(2, {"val_loss": 4.5})
    # Each line is on disk when logged, so a run that dies keeps its history.
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 2]
    assert lines[1] == {"step": 1, **STEP, "loss": 4.0}
    assert lines[3] == {"step": 2, "val_loss": 4.5}

    logger.log_samples(2, ["First Citizen: hello", "second"])
    logger.finish({"final_val_loss": 4.5, "ms_per_batch": 120.0, "nan_is_kept": float("nan")})
    logger.finish({"ignored": True})  # idempotent: the first summary stands

    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "sample": "First Citizen: hello"}, {"step": 2, "sample": "second"}]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val_loss"] == 4.5 and summary["ms_per_batch"] == 120.0 and "ignored" not in summary
    assert not (tmp_path / "wandb").exists()
    console = [r.getMessage() for r in caplog.records if r.name == "gpt2x"]
    assert console[0].startswith("step     0 | loss 5.0000 | lr 6.00e-04")
    assert "step     2 | val 4.5000" in console
    assert any("First Citizen: hello" in m for m in console)


def test_non_main_rank_logger_does_nothing_even_with_wandb(tmp_path):
    logger = build_logger(make_cfg("wandb"), tmp_path / "run", is_main=False)
    assert isinstance(logger, NullLogger)
    logger.log(0, STEP)
    logger.log_samples(0, ["x"])
    logger.log_files([tmp_path / "missing.png"])
    logger.finish({"a": 1})
    assert not (tmp_path / "run").exists()


def test_summary_json_accepts_tensor_and_path_values(tmp_path):
    torch = pytest.importorskip("torch")
    logger = build_logger(make_cfg(), tmp_path, is_main=True)
    logger.finish({"loss": torch.tensor(2.5), "dir": tmp_path, "nested": {"n": torch.tensor(3)}})
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "loss": 2.5,
        "dir": str(tmp_path),
        "nested": {"n": 3},
    }


def test_bad_logger_name_or_mode_is_rejected_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="logger.name='tensorboard'.*'none' or 'wandb'"):
        build_logger(make_cfg("tensorboard"), tmp_path, is_main=True)
    with pytest.raises(ValueError, match="logger.mode='dry'.*auto, online, offline, disabled"):
        build_logger(make_cfg("wandb", mode="dry"), tmp_path, is_main=True)


def test_run_name_keeps_what_was_run_and_drops_where_things_are():
    overrides = ["precision=bf16", "attention=flash", "data.path=/x/y", "logger=wandb", "logger.mode=offline"]
    overrides += ["hydra.sweep.dir=/tmp/s", "resume=auto", "+data.cache_dir=/c", "seed=2"]
    assert run_name(overrides) == "precision=bf16,attention=flash,seed=2"
    assert run_name([]) == "default"


def test_group_is_the_multirun_sweep_dir_and_none_outside_multirun(tmp_path):
    sweep = tmp_path / "outputs" / "multirun" / "2024-01-01" / "12-00-00"
    info = {"multirun": True, "sweep_dir": str(sweep), "cwd": str(tmp_path)}
    assert run_group(info) == "outputs/multirun/2024-01-01/12-00-00"
    assert run_group({**info, "cwd": "/elsewhere"}) == str(sweep)
    assert run_group({**info, "sweep_dir": "/" + "d" * 300})[-10:] == "d" * 10  # clipped to W&B's 128 chars
    assert len(run_group({**info, "sweep_dir": "/" + "d" * 300})) == 128
    assert run_group({"multirun": False, "sweep_dir": None}) is None
    assert run_group({}) is None


def test_job_type_is_the_experiment_name_else_train():
    assert job_type(OmegaConf.create({"experiment": "ladder"})) == "ladder"
    assert job_type(OmegaConf.create({"experiment": None})) == "train"
    assert job_type(OmegaConf.create({})) == "train"


def test_auto_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    assert not wandb_has_credentials()
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online" and resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"  # an explicit WANDB_MODE wins over the guess
    monkeypatch.delenv("WANDB_MODE")

    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_has_credentials() and resolve_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_has_credentials() and resolve_mode("auto") == "online"


def test_run_record_holds_config_code_versions_device_and_extra(tmp_path, monkeypatch):
    monkeypatch.setenv(
        HYDRA_INFO_ENV,
        json.dumps({"overrides": ["seed=7"], "multirun": True, "sweep_dir": "/s", "job_num": 1, "cwd": "/"}),
    )
    path = write_run_record(make_cfg(), tmp_path, {"peak_flops": 1.5e12, "world_size": 2})
    record = json.loads(path.read_text())
    assert path == tmp_path / "record.json"
    assert record["config"]["logger"]["project"] == "gpt2x" and record["seed"] == 7
    assert record["overrides"] == ["seed=7"] and record["sweep_dir"] == "/s" and record["job_num"] == 1
    assert record["peak_flops"] == 1.5e12 and record["world_size"] == 2  # extra wins
    assert set(record["versions"]) >= {"python", "torch", "numpy", "hydra-core", "omegaconf", "wandb", "datasets"}
    assert record["versions"]["torch"] == package_versions()["torch"] is not None
    assert record["device"]["type"] in ("cpu", "cuda", "mps") and record["device"]["name"]
    assert record["hostname"] and record["time"] and record["command"]
    assert set(record["git"]) == {"commit", "dirty"}


def test_git_info_reports_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert git_info(str(repo)) == {"commit": None, "dirty": None}  # no commits yet
    (repo / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    git_info.cache_clear()
    assert git_info(str(repo)) == {"commit": head, "dirty": False}
    (repo / "a.txt").write_text("changed")
    git_info.cache_clear()
    assert git_info(str(repo)) == {"commit": head, "dirty": True}
    git_info.cache_clear()
    assert git_info(str(tmp_path)) == {"commit": None, "dirty": None}  # not a checkout
