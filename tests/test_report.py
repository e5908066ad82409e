"""Sweeps end in a report (sweep.csv / .md / .png); the ladder is cumulative rungs over the same data and seed."""

from __future__ import annotations

import csv

import pytest
from helpers import CONF_DIR, TINY, compose, train_cli
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gpt2x.run.report import REPORT_FILES, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LADDER = OmegaConf.load(CONF_DIR / "experiment" / "ladder.yaml").hydra.sweeper.params.rung.split(",")
RUNG_CHOICES = ("precision", "attention", "compile", "parallel", "model.vocab_size", "optim.fused", "loss")


def multirun(sweep_dir, *overrides, ok=True):
    """The real CLI (`gpt2x-train -m ...`) in a subprocess, as a user runs it."""
    args = ["-m", *TINY, "peak_flops=1e12", "optim.max_steps=2", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    return train_cli(args, timeout=600, ok=ok)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    out = multirun(sweep_dir, "precision=fp32,bf16")
    return sweep_dir, out.stdout


@pytest.mark.slow
def test_a_multirun_ends_with_a_report_of_one_row_per_run(sweep):
    sweep_dir, stdout = sweep
    rows = read_csv(sweep_dir / "sweep.csv")
    assert [(r["job"], r["run"], r["status"]) for r in rows] == [
        ("0", "precision=fp32", "ok"),
        ("1", "precision=bf16", "ok"),
    ]
    assert float(rows[0]["speedup"]) == 1.0
    for r in rows:
        ms, tokens = float(r["ms_per_batch"]), int(r["tokens_per_step"])
        assert float(r["ms_per_batch_p10"]) <= ms <= float(r["ms_per_batch_p90"])
        assert float(r["tokens_per_sec"]) == pytest.approx(tokens / (ms / 1000))
        assert float(r["speedup"]) == pytest.approx(float(rows[0]["ms_per_batch"]) / ms)
        assert float(r["final_loss"]) > 0 and int(r["peak_mem_bytes"]) > 0 and 0 < float(r["mfu"])
    markdown = (sweep_dir / "sweep.md").read_text()
    assert (
        "| # | run | ms/batch (p10-p90) | tokens/s | MFU | speed-up | loss | val loss | peak mem | warm-up |"
        in markdown
    )
    assert "| 0 | precision=fp32 |" in markdown and "| 1 | precision=bf16 |" in markdown and "1.00x" in markdown
    assert "every run: `model=tiny" in markdown  # shared overrides are stated once, not in each label
    assert "| 1 | precision=bf16 |" in stdout  # the table is printed at the end of the sweep
    png = (sweep_dir / "sweep.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


@pytest.mark.slow
def test_gpt2x_report_rebuilds_the_report_from_a_finished_sweep_dir(sweep, tmp_path, capsys):
    sweep_dir, _ = sweep
    before = read_csv(sweep_dir / "sweep.csv")
    for name in REPORT_FILES:
        (sweep_dir / name).unlink()
    assert main([str(sweep_dir)]) == 0
    assert read_csv(sweep_dir / "sweep.csv") == before
    assert (sweep_dir / "sweep.png").read_bytes().startswith(PNG_MAGIC)
    assert "| 0 | precision=fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a dir without jobs: argparse's error, naming what to give instead
        main([str(tmp_path)])
    assert "holds no Hydra job dirs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_run_is_marked_in_the_report_and_the_sweep_fails(tmp_path):
    out = multirun(tmp_path, "precision=fp32,fp16", ok=False)
    assert out.returncode != 0  # Hydra re-raises the failed job's error at the end of the sweep
    rows = read_csv(tmp_path / "sweep.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("precision=fp32", "ok"), ("precision=fp16", "failed")]
    assert rows[1]["error"].startswith("ValueError: precision=fp16 (float16) on cpu")
    assert "**failed**: ValueError: precision=fp16" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").exists()


@pytest.fixture(scope="module")
def ladder_cfgs():
    """The composed config of each rung of the ladder, in ladder order (composed once for the tests that read them)."""
    return [compose(["+experiment=ladder", f"rung={name}"]) for name in LADDER]


def test_ladder_rungs_are_cumulative_one_choice_at_a_time(ladder_cfgs):
    assert sorted(LADDER) == sorted(p.stem for p in (CONF_DIR / "rung").glob("*.yaml"))  # every rung is on the ladder
    cfgs = ladder_cfgs
    steps = []
    for name, cfg in zip(LADDER, cfgs, strict=True):
        assert cfg.rung == name
    for prev, cur in zip(cfgs, cfgs[1:], strict=False):
        changed = [k for k in RUNG_CHOICES if _choice(prev, k) != _choice(cur, k)]
        assert len(changed) == 1, (cur.rung, changed)
        steps.append(f"{changed[0]}={_choice(cur, changed[0])}")
    assert steps == ["precision=tf32", "precision=bf16", "compile=default", "attention=flash",
                     "model.vocab_size=50304", "optim.fused=True", "loss=fused", "parallel=ddp"]  # fmt: skip
    first = cfgs[0]
    assert (_choice(first, "precision"), _choice(first, "attention"), _choice(first, "compile")) == (
        "fp32",
        "manual",
        "none",
    )


def _choice(cfg, key):
    node = OmegaConf.select(cfg, key)
    return node.name if OmegaConf.is_config(node) else node


def test_every_rung_of_the_ladder_trains_on_the_same_data_seed_and_tokens_per_step(ladder_cfgs):
    keys = ("seed", "model.name", "model.n_layer", "data.name", "data.seq_len", "data.total_batch_size",
            "optim.max_steps", "optim.lr", "experiment", "peak_probe")  # fmt: skip
    cfgs = ladder_cfgs
    for key in keys:
        assert len({str(OmegaConf.select(c, key)) for c in cfgs}) == 1, key
    assert cfgs[0].peak_probe == "fresh"  # every rung's MFU against the peak measured right before it
    gpu = compose(["+experiment=ladder_gpu", "rung=flash"])
    assert (gpu.model.name, gpu.data.batch_size, gpu.data.seq_len, gpu.experiment) == ("gpt2", 16, 1024, "ladder_gpu")


def test_an_unknown_rung_fails_with_hydras_list_of_rungs():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["+experiment=ladder", "rung=warp_drive"])
    assert "rung/warp_drive" in str(e.value) and "fused_adamw" in str(e.value)


@pytest.mark.slow
def test_gpt2x_report_on_a_single_run_dir_labels_its_row_by_the_run(tmp_path, capsys):
    run_dir = tmp_path / "bf16-trial"
    train_cli([*TINY, "peak_flops=1e12", "optim.max_steps=2", "precision=bf16", f"hydra.run.dir={run_dir}"])
    assert main([str(run_dir)]) == 0
    assert "| - | bf16-trial | " in capsys.readouterr().out  # no job number: a single run has none
    [row] = read_csv(run_dir / "sweep.csv")
    assert row["job"] == "" and row["run"] == "bf16-trial" and "precision=bf16" in row["overrides"]
