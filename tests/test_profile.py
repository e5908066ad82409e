"""profile=trace records a few steps with torch.profiler: a Chrome trace, profile.md, and a split of the step time by
category that adds up to the step; profile=none creates nothing. Sweeps get a split table and sweep_profile.png."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from helpers import TINY, compose, run_train, tiny_corpus, train_cli

import gpt2x.run.profile as profile
from gpt2x.run.profile import CATEGORIES, NullProfiler, build_profiler, categorize
from gpt2x.validate import validate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# 5 steps: step 0 untimed (timing_warmup_steps=1), step 0 is also the profiler's warm-up, steps 1-3 recorded
TRACE = ["optim.max_steps=5", "profile=trace", "profile.steps=3", "eval_interval=0", "sample_interval=0"]


@pytest.mark.parametrize(
    "name,region,category",
    [
        ("aten::mm", None, "matmul"),
        ("aten::addmm", None, "matmul"),
        ("aten::bmm", None, "matmul"),
        ("aten::_addmm_activation", None, "matmul"),
        ("triton_tem_fused_addmm_gelu_0", None, "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", None, "attention"),
        ("aten::_efficient_attention_forward", None, "attention"),
        ("aten::_log_softmax_backward_data", None, "softmax/CE"),
        ("aten::softmax", None, "softmax/CE"),
        ("aten::nll_loss_forward", None, "softmax/CE"),
        ("aten::logsumexp", None, "softmax/CE"),
        ("graph_0_cpp_fused__log_softmax_add_arange_embedding_native_layer_norm_0", None, "softmax/CE"),
        ("graph_0_cpp_fused_gelu_gelu_backward_sum_view_2", None, "elementwise/norms"),
        ("graph_4_cpp_fused__scaled_dot_product_flash_attention_for_cpu_backward__to_copy_sum_3", None,
         "elementwise/norms"),  # fmt: skip
        ("triton_per_fused_native_layer_norm_3", None, "elementwise/norms"),
        ("aten::native_layer_norm_backward", None, "elementwise/norms"),
        ("aten::mul", None, "elementwise/norms"),
        ("aten::view", None, "other"),
        ("aten::mul_", "optimizer", "optimizer"),
        ("aten::_fused_adamw_", None, "optimizer"),
        ("aten::_foreach_norm", None, "optimizer"),
        ("Optimizer.step#AdamW.step", None, "optimizer"),
        ("aten::copy_", "data", "data"),
        ("c10d::allreduce_", None, "communication"),
        ("gloo:all_reduce", "optimizer", "communication"),  # a collective is communication wherever it runs
        ("nccl:all_reduce", None, "communication"),
        ("## Call CompiledFxGraph fabc ##", None, "other"),
        ("autograd::engine::evaluate_function: MmBackward0", None, "other"),
        ("autograd::engine::evaluate_function: LogSoftmaxBackward0", None, "other"),
        ("LogSoftmaxBackward0", None, "other"),
        ("CompiledFunctionBackward", None, "other"),
        ("train/forward", None, "other"),
    ],
)
def test_each_op_name_falls_in_one_category_by_the_documented_rules(name, region, category):
    assert categorize(name, region) == category
    assert category in CATEGORIES


def test_profile_none_creates_no_profiler_no_labels_and_no_files(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("profile=none created a profiler or a record_function")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    monkeypatch.setattr(profile, "record_function", refuse)
    summary = run_train(tmp_path, ["optim.max_steps=2"])  # profile=none is the default
    assert not any(k.startswith("profile") for k in summary)
    assert not [p.name for p in tmp_path.iterdir() if p.name in profile.PROFILE_FILES]
    null = build_profiler(compose(TINY), tmp_path, True, torch.device("cpu"), 0)
    assert isinstance(null, NullProfiler) and null.region("data") is null.region("forward")  # one shared no-op


def test_trace_on_a_tiny_model_writes_a_chrome_trace_and_a_split_that_adds_up_to_the_step(tmp_path):
    summary = run_train(tmp_path, TRACE)

    with gzip.open(tmp_path / "trace.json.gz", "rt") as f:
        trace = json.load(f)
    names = [e.get("name") for e in trace["traceEvents"]]
    assert names.count("train/step") == 3 and names.count("train/optimizer") == 3
    assert "aten::mm" in names

    split = summary["profile_ms"]
    assert list(split) == list(CATEGORIES) and summary["profile_steps"] == [1, 2, 3]
    step_ms = summary["profile_step_ms"]
    # self times: every op counts once, so the categories add up to the step (on CPU exactly, up to rounding)
    assert sum(split.values()) == pytest.approx(step_ms, rel=0.05)
    # the trace's train/step ranges and the StepTimer time the same interval
    assert summary["profile_timer_ms"] == pytest.approx(step_ms, rel=0.05)
    assert min(split["matmul"], split["softmax/CE"], split["optimizer"], split["data"]) > 0
    assert split["communication"] == 0  # one process
    assert json.loads((tmp_path / "summary.json").read_text())["profile_ms"] == pytest.approx(split)

    md = (tmp_path / "profile.md").read_text()
    assert "| category | ms/step | share |" in md and "| matmul |" in md and "| **total** |" in md
    assert "| 1 | `aten::mm` | matmul |" in md  # the biggest op of a tiny model: its 50257-wide output layer


def test_profile_settings_that_cannot_record_fail_before_training_naming_the_settings():
    cfg = compose([*TINY, "profile=trace"])  # start_step = timing_warmup_steps = 1, 3 steps: past max_steps=3
    with pytest.raises(ValueError, match=r"profile.start_step=1 \+ profile.steps=3 runs past optim.max_steps=3"):
        validate(cfg, torch.device("cpu"), 1)
    validate(compose([*TINY, "profile=trace", "profile.steps=2"]), torch.device("cpu"), 1)
    assert compose(["profile=trace", "timing_warmup_steps=5"]).profile.start_step == 5  # after the timing warm-up


@pytest.mark.slow  # a multirun in a subprocess
def test_a_profiled_multirun_reports_the_split_per_rung_and_plots_it(tmp_path):
    data = ["data=text", f"data.path={tiny_corpus()}"]
    args = ["-m", *TINY, *data, *TRACE, "peak_flops=1e12", "rung=fp32,bf16", f"hydra.sweep.dir={tmp_path}"]
    train_cli(args, timeout=600)
    md = (tmp_path / "sweep.md").read_text()
    assert "## Where the time goes (profile=trace)" in md
    header = "| # | run | step ms | " + " | ".join(CATEGORIES) + " |"
    assert header in md
    rows = [line for line in md.split(header)[1].splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[1] for r in rows] == ["fp32", "bf16"]
    png = (tmp_path / "sweep_profile.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert (tmp_path / "0" / "trace.json.gz").is_file() and (tmp_path / "1" / "profile.md").is_file()


@pytest.mark.slow  # 2 worker processes
def test_under_ddp_rank_0_profiles_and_the_wait_for_the_gradient_all_reduce_is_communication(tmp_path):
    data = ["data=text", f"data.path={tiny_corpus()}"]
    train_cli([*TINY, *data, *TRACE, "peak_flops=1e12", "parallel=ddp", f"hydra.run.dir={tmp_path}"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    split = summary["profile_ms"]
    assert split["communication"] > 0
    assert sum(split.values()) == pytest.approx(summary["profile_step_ms"], rel=0.05)
    assert sorted(p.name for p in tmp_path.glob("trace*")) == ["trace.json.gz"]  # one trace: rank 0's


@pytest.mark.slow  # W&B's service process
def test_with_logger_wandb_the_trace_and_profile_md_are_logged_as_an_artifact(tmp_path, monkeypatch):
    from wandb_offline import artifacts, find_runs, read_run

    home = tmp_path / "wandb-home"  # W&B's own dirs in tmp, no credentials
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    monkeypatch.setenv("NETRC", str(home / "no-netrc"))
    run_dir = tmp_path / "run"
    summary = run_train(run_dir, [*TRACE, "logger=wandb", "logger.mode=offline", "logger.project=gpt2x-test"])
    (path,) = find_runs(run_dir)
    run = read_run(path)
    assert run.summary["profile_ms"] == pytest.approx(summary["profile_ms"])
    (files,) = [a["files"] for a in artifacts(path) if a["type"] == "run-files"]
    assert {"trace.json.gz", "profile.md"} <= set(files)
