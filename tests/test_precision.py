"""Each precision mode trains to the loss fp32 gets, says where it does nothing, and fails early where it cannot run."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers import compose, run_train

from gpt2x.speed.precision import apply_precision
from gpt2x.validate import validate

CPU = torch.device("cpu")
FAST = ["peak_flops=1e12", "optim.max_steps=3", "eval_interval=3"]  # no peak probe: the numbers are what is tested


@pytest.fixture(autouse=True)
def restore_matmul_precision():
    """Precision modes set a process-wide matmul precision; leave the next test the default."""
    yield
    torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("fp32"), FAST + ["precision=fp32"])


@pytest.mark.slow  # three training runs
@pytest.mark.parametrize("precision,tolerance", [("tf32", 0.0), ("bf16", 0.05)])
def test_every_cpu_precision_trains_to_a_finite_loss_close_to_fp32s(tmp_path, fp32_run, precision, tolerance):
    summary = run_train(tmp_path, FAST + [f"precision={precision}"])
    assert summary["config"]["precision"] == precision
    for key in ("final_loss", "final_val_loss"):
        assert math.isfinite(summary[key])
        # tf32 does nothing on a CPU, so it must be fp32 bit for bit; bf16 rounds every matmul input to 8 bits
        assert summary[key] == pytest.approx(fp32_run[key], abs=tolerance), key
    if precision == "bf16":
        assert summary["final_loss"] != fp32_run["final_loss"]  # autocast really ran in bf16


def test_tf32_on_cpu_says_once_that_it_has_no_effect(caplog):
    with caplog.at_level(logging.INFO, logger="gpt2x.speed.precision"):
        precision = apply_precision(compose(["precision=tf32"]).precision, CPU)
    notes = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert notes == ["precision=tf32: TF32 has no effect on cpu (matmuls under 'high' equal full fp32 bit for bit); "
                     "this run is fp32"]  # fmt: skip
    assert precision.compute_dtype == torch.float32 and not precision.uses_tf32


def test_fp16_on_cpu_is_refused_before_any_work_unless_forced(tmp_path):
    with pytest.raises(ValueError, match=r"precision=fp16 \(float16\) on cpu: .* precision\.allow_slow=true"):
        run_train(tmp_path, ["precision=fp16"])
    assert not (tmp_path / "record.json").exists()  # refused before the run started


@pytest.mark.slow  # float16 matmuls on a CPU: tens to hundreds of times slower than fp32
def test_fp16_forced_on_cpu_trains_a_minuscule_model_with_loss_scaling(tmp_path):
    minuscule = ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "data.seq_len=16", "sample_max_tokens=2"]
    summary = run_train(tmp_path, FAST + minuscule + ["precision=fp16", "precision.allow_slow=true"])
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] == pytest.approx(math.log(50257), abs=0.3)


@pytest.mark.parametrize(
    "overrides,device,message",
    [
        (["attention=flash", "precision=fp32"], "cuda", "attention=flash is not available on cuda with torch.float32"),
        (["attention=efficient"], "cpu", "attention=efficient is not available on cpu"),
        (["precision.autocast_dtype=float8"], "cpu", "precision.autocast_dtype='float8' is not supported"),
        (["precision.matmul_precision=low"], "cpu", "precision.matmul_precision='low'; valid: highest, high, medium"),
    ],
)
def test_impossible_precision_and_kernel_choices_fail_validation_naming_the_settings(overrides, device, message):
    # validate() is what train() runs before touching data or the model; cuda here needs no GPU, only the rules
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose(["model=tiny", *overrides]), torch.device(device), world_size=1)
