"""torch.compile is a config choice: a compiled run trains, validates and samples like eager; bad choices fail early.

One compiled run only: a cold inductor compile costs 20-30 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import compose, run_train

from gpt2x.speed.compile import check_compile
from gpt2x.validate import validate

RUN = ["peak_flops=1e12", "optim.max_steps=3", "eval_interval=2", "sample_interval=2"]


@pytest.mark.slow  # one cold inductor compile: 25-50 s on 2 shared CPU cores
def test_compiled_model_trains_validates_and_samples_like_the_eager_one(tmp_path):
    eager = run_train(tmp_path / "eager", RUN)
    compiled = run_train(tmp_path / "compiled", RUN + ["compile=default"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the train graph and the eval graph
    assert compiled["config"]["compile"] == "default"
    # inductor reorders fp32 arithmetic, so agreement is close, not bitwise
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], abs=1e-3)
    assert math.isfinite(compiled["final_val_loss"])
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-3)
    samples = [json.loads(line) for line in (tmp_path / "compiled" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] and samples[0]["sample"].startswith("First Citizen:")
    assert compiled["warmup_s"] > 0 and compiled["timed_steps"] == 2  # compile time is left out of ms/batch


def test_unknown_compile_mode_fails_before_training_listing_the_modes():
    cfg = compose(["model=tiny", "compile=default", "compile.mode=turbo"])
    with pytest.raises(ValueError, match="compile.mode='turbo' is not a torch.compile mode; valid: default, "):
        validate(cfg, torch.device("cpu"), world_size=1)


def test_compile_on_cpu_without_a_cxx_compiler_fails_before_training(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="compile=default on cpu: inductor needs a C\\+\\+ compiler"):
        check_compile(compose(["compile=default"]).compile, torch.device("cpu"))
    check_compile(compose(["compile=none"]).compile, torch.device("cpu"))  # eager needs no compiler
