"""W&B logging with the real wandb library in offline mode, read back with wandb_offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from helpers import TINY, compose, read_metrics, train_cli
from omegaconf import DictConfig, OmegaConf
from wandb_offline import find_runs, iter_messages, read_run, wait_for_exit

from gpt2x.run.logger import build_logger
from gpt2x.run.record import HYDRA_INFO_ENV

STEP = {
    "loss": 5.0,
    "lr": 6e-4,
    "grad_norm": 1.2,
    "ms_per_batch": 123.4,
    "tokens_per_sec": 8300.0,
    "mfu": 0.12,
    "peak_mem_bytes": 2**30,
}
WANDB_KEYS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/ms_per_batch",
    "perf/tokens_per_sec",
    "perf/mfu",
    "perf/peak_mem",
}


@pytest.fixture(autouse=True)
def wandb_env(tmp_path, monkeypatch) -> Path:
    """W&B's own dirs in tmp, no credentials, no server, no leaked Hydra job info."""
    home = tmp_path / "wandb-home"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", HYDRA_INFO_ENV):
        monkeypatch.delenv(var, raising=False)
    return home


def make_cfg(**logger) -> DictConfig:
    base = {"name": "wandb", "project": "gpt2x-test", "entity": None, "mode": "offline", "tags": ["ci"], "notes": "n"}
    return OmegaConf.create(
        {"seed": 3, "experiment": "ladder", "model": {"n_layer": 2}, "logger": {**base, "init_timeout": 30, **logger}}
    )


def test_offline_run_records_history_config_samples_and_summary(tmp_path):
    run_dir = tmp_path / "run"
    logger = build_logger(make_cfg(), run_dir, is_main=True)
    for step in range(3):
        logger.log(step, {**STEP, "loss": 5.0 - step})
    logger.log(2, {"val_loss": 4.4, "hellaswag": 0.3})
    logger.log_samples(2, ["First Citizen: speak", "again"])
    png = tmp_path / "sweep.png"
    png.write_bytes(_tiny_png())
    md = tmp_path / "sweep.md"
    md.write_text("# sweep\n")
    logger.log_files([png, md])
    logger.finish({"final_val_loss": 4.4, "ms_per_batch": 123.4, "git_commit": None})

    (path,) = find_runs(run_dir)  # W&B files live inside the run dir
    assert path.is_relative_to(run_dir / "wandb")
    run = read_run(run_dir)
    assert (run.name, run.group, run.job_type, run.project) == ("default", None, "ladder", "gpt2x-test")
    assert run.tags == ["ci"] and run.notes == "n" and run.exit_code == 0
    assert run.config == OmegaConf.to_container(make_cfg(), resolve=True)

    train_rows = [r for r in run.history if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [0, 1, 2]
    assert all(WANDB_KEYS <= set(r) for r in train_rows)
    assert run.metric("train/loss") == [(0, 5.0), (1, 4.0), (2, 3.0)]
    assert run.metric("val/loss") == [(2, 4.4)] and run.metric("eval/hellaswag") == [(2, 0.3)]
    (samples,) = [r["samples"] for r in run.history if "samples" in r]
    assert samples["_type"] == "incremental-table-file" and samples["nrows"] == 2 and samples["ncols"] == 2
    table = json.loads(next(run_dir.rglob(Path(samples["path"]).name)).read_text())
    assert table["columns"] == ["step", "sample"] and table["data"] == [[2, "First Citizen: speak"], [2, "again"]]
    assert any(r.get("files/sweep", {}).get("_type") == "image-file" for r in run.history)

    local_summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: run.summary[k] for k in local_summary} == local_summary
    assert run.summary["train/loss"] == 3.0  # W&B's own last-value summary is kept beside ours


def test_run_name_and_group_come_from_the_hydra_job(tmp_path, monkeypatch):
    # What `export_hydra_info` hands to workers; inside the Hydra app the same comes from HydraConfig.
    info = {
        "overrides": ["precision=bf16", "attention=flash", "data.path=/data/x", "logger=wandb"],
        "multirun": True,
        "sweep_dir": str(tmp_path / "outputs" / "multirun" / "ladder"),
        "job_num": 0,
        "cwd": str(tmp_path),
    }
    monkeypatch.setenv(HYDRA_INFO_ENV, json.dumps(info))
    build_logger(make_cfg(), tmp_path / "run", is_main=True).finish({})
    run = read_run(tmp_path / "run")
    assert run.name == "precision=bf16,attention=flash"
    assert run.group == "outputs/multirun/ladder"


def test_real_config_with_logger_wandb_logs_the_composed_config(tmp_path):
    cfg = compose([*TINY, "logger=wandb", "logger.mode=offline", "logger.project=gpt2x-test"])
    logger = build_logger(cfg, tmp_path, is_main=True)
    logger.log(0, STEP)
    logger.finish({"final_loss": 5.0})
    run = read_run(tmp_path)
    assert run.config["model"]["name"] == "tiny" and run.config["optim"]["max_steps"] == 3
    assert run.config["logger"]["name"] == "wandb" and run.job_type == "train"


def test_online_without_credentials_logs_offline_instead_of_prompting(tmp_path, caplog):
    start = time.monotonic()
    logger = build_logger(make_cfg(mode="online"), tmp_path, is_main=True)
    logger.log(0, STEP)
    logger.finish({})
    assert time.monotonic() - start < 30
    assert "logging W&B offline instead" in caplog.text
    (path,) = find_runs(tmp_path)
    assert path.parent.name.startswith("offline-run-") and read_run(path).metric("train/loss") == [(0, 5.0)]


@pytest.mark.slow
def test_unreachable_server_times_out_falls_back_offline_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.monotonic()
    logger = build_logger(make_cfg(mode="online", init_timeout=2), tmp_path, is_main=True)
    assert time.monotonic() - start < 30  # bounded by init_timeout, plus the offline start
    logger.log(0, STEP)
    logger.finish({"ok": True})
    assert "W&B online start failed" in caplog.text
    assert [row["loss"] for row in read_metrics(tmp_path)] == [5.0]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ok": True}
    (path,) = find_runs(tmp_path)  # the failed online attempt leaves no run behind
    assert path.parent.name.startswith("offline-run-")


def test_wandb_error_mid_run_warns_once_and_local_logging_continues(tmp_path, caplog):
    logger = build_logger(make_cfg(), tmp_path, is_main=True)
    logger.log(0, STEP)
    logger.wandb_run.finish()  # a real W&B failure: logging to a finished run raises UsageError
    logger.log(1, STEP)
    logger.log(2, STEP)
    logger.log_samples(2, ["s"])
    logger.finish({"done": 1})
    assert caplog.text.count("continuing with local logging only") == 1
    assert logger.wandb_run is None
    assert [row["step"] for row in read_metrics(tmp_path)] == [0, 1, 2]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"done": 1}


def test_disabled_mode_starts_no_wandb(tmp_path):
    logger = build_logger(make_cfg(mode="disabled"), tmp_path, is_main=True)
    assert logger.wandb_run is None
    logger.finish({})
    assert find_runs(tmp_path) == []


def test_reader_reassembles_messages_split_across_32k_blocks(tmp_path):
    cfg = make_cfg()
    cfg.blob = "".join(chr(65 + i % 26) for i in range(100_000))  # one config record spanning 4 blocks
    logger = build_logger(cfg, tmp_path, is_main=True)
    for step in range(300):  # many small records: some straddle block ends, some leave <7-byte padding
        logger.log(step, STEP)
    logger.finish({})
    (path,) = find_runs(tmp_path)
    assert path.stat().st_size > 4 * 32 * 1024
    run = read_run(path)
    assert run.config["blob"] == cfg.blob
    assert [s for s, _ in run.metric("train/loss")] == list(range(300))
    assert max(len(m) for m in iter_messages(path)) > 100_000


def test_reader_rejects_corrupt_and_foreign_files(tmp_path):
    build_logger(make_cfg(), tmp_path / "run", is_main=True).finish({})
    (path,) = find_runs(tmp_path / "run")
    wait_for_exit(path)  # copy the whole log, not the part written before `finish` returned
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the first record's payload
    bad = tmp_path / "run-bad.wandb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad checksum"):
        read_run(bad)
    foreign = tmp_path / "other" / "run-x.wandb"
    foreign.parent.mkdir()
    foreign.write_text("not a W&B log at all")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_run(foreign)
    with pytest.raises(FileNotFoundError, match="holds 3 W&B runs"):
        read_run(tmp_path)


@pytest.mark.slow
def test_hydra_multirun_jobs_share_one_wandb_group_with_step_history(tmp_path, wandb_env):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "logger=wandb", "logger.mode=offline", "log_interval=1", "logger.project=gpt2x-test"]
    args += ["eval_interval=1", "target_val_loss=10.95"]  # reached at the first eval (step 1): ~ln(50257) = 10.8
    train_cli([*args, "seed=1,2", f"hydra.sweep.dir={sweep}"], timeout=600)

    all_runs = [read_run(p) for p in find_runs(sweep)]
    runs = [r for r in all_runs if r.job_type == "train"]
    reports = [r for r in all_runs if r.job_type == "sweep-report"]
    assert len(runs) == 2 and len(reports) == 1
    # the sweep dir, outside the launch dir: absolute; the sweep's report (table, plot) joins the same group
    assert runs[0].group == runs[1].group == reports[0].group == str(sweep)
    assert any(key.startswith("files/sweep") for row in reports[0].history for key in row)
    assert any(key == "files/sweep_curves" for row in reports[0].history for key in row)  # the speedrunner's plot
    assert sorted(r.config["seed"] for r in runs) == [1, 2]
    assert sorted(r.name.rsplit(",", 1)[-1] for r in runs) == ["seed=1", "seed=2"]
    for run in runs:
        assert run.name.startswith("model=tiny,") and "logger" not in run.name and run.exit_code == 0
        assert [s for s, _ in run.metric("train/loss")] == [0, 1, 2]
        assert run.metric("val/loss") and run.metric("perf/tokens_per_sec")
        assert run.metric("target/step_to_target") == [(1, 1)] and run.metric("val/train_time_s")
    for job in ("0", "1"):
        record = json.loads((sweep / job / "record.json").read_text())
        assert f"seed={int(job) + 1}" in record["overrides"] and record["sweep_dir"] == str(sweep)
        assert (sweep / job / "summary.json").is_file()
        assert len(read_metrics(sweep / job)) == 3


def _tiny_png() -> bytes:
    """A valid 1x1 PNG, made with the standard library."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )
