"""Speed figures are honest: FLOPs by hand count, MFU arithmetic, warm-up left out, peaks from the right source."""

from __future__ import annotations

import json
import logging
import statistics
import sys

import pytest
import torch
from helpers import read_metrics, run_train

from gpt2x.config import ModelConfig
from gpt2x.model.gpt import GPT
from gpt2x.run.metrics import (
    flops_per_token,
    gpu_peak_flops,
    peak_flops,
    peak_memory_bytes,
    reset_peak_memory,
    timing_summary,
)

CPU = torch.device("cpu")


def test_flops_per_token_matches_a_hand_count_for_a_small_config():
    cfg = ModelConfig(name="hand", n_layer=2, n_head=2, n_embd=8, vocab_size=50257)
    # one block: c_attn 8*24+24=216, attn c_proj 8*8+8=72, c_fc 8*32+32=288, mlp c_proj 32*8+8=264, 2 LayerNorms 32
    block = 216 + 72 + 288 + 264 + 32
    n = 2 * block + 16 + 50257 * 8  # + ln_f + the tied lm_head; the position table is a lookup, not a matmul
    attention = 2 * 2 * 2 * 8 * 16 * 3  # layers x (QK^T, AV) x 2 FLOPs x d x T, x3 forward + backward
    assert flops_per_token(cfg, seq_len=16) == 6 * n + attention == 2_425_968
    # the same N the model itself counts (tied wte counted once, wpe left out)
    model = GPT(ModelConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=2, n_embd=8))
    assert n == model.num_params(non_embedding=True)


def test_vocab_padding_adds_no_model_flops():
    real = ModelConfig(name="s", n_layer=2, n_head=2, n_embd=8, vocab_size=50257)
    padded = ModelConfig(name="s", n_layer=2, n_head=2, n_embd=8, vocab_size=50304)
    assert flops_per_token(padded, 16) == flops_per_token(real, 16)


def test_mfu_is_model_flops_times_tokens_per_second_over_peak():
    s = timing_summary([100.0, 300.0, 200.0, 400.0, 500.0], tokens_per_step=1000, flops_per_tok=1_000_000, peak=1e10)
    assert s["ms_per_batch"] == 300.0  # the median step
    assert s["ms_per_batch_p10"] == pytest.approx(140.0) and s["ms_per_batch_p90"] == pytest.approx(460.0)
    assert s["tokens_per_sec"] == pytest.approx(1000 / 0.3)
    assert s["mfu"] == pytest.approx(1e6 * (1000 / 0.3) / 1e10)
    assert s["timed_steps"] == 5


def test_a_run_without_timed_steps_says_so_instead_of_reporting_warm_up_as_speed(caplog):
    with caplog.at_level(logging.WARNING):
        s = timing_summary([], tokens_per_step=1000, flops_per_tok=1, peak=1.0, warmup_ms=[30_000.0])
    assert s == {"timed_steps": 0, "warmup_steps": 1, "warmup_s": 30.0}
    assert "no timed steps" in caplog.text


def test_summary_times_only_post_warm_up_steps_and_derives_tokens_and_mfu_from_them(tmp_path):
    summary = run_train(tmp_path, ["optim.max_steps=5", "timing_warmup_steps=2", "peak_flops=1e12"])
    rows = read_metrics(tmp_path)
    step_ms = [r["ms_per_batch"] for r in rows]
    assert summary["timed_steps"] == 3 and summary["warmup_steps"] == 2
    assert summary["ms_per_batch"] == pytest.approx(statistics.median(step_ms[2:]))
    assert summary["warmup_s"] == pytest.approx(sum(step_ms[:2]) / 1000)
    assert summary["tokens_per_sec"] == pytest.approx(summary["tokens_per_step"] / (summary["ms_per_batch"] / 1000))
    flops = flops_per_token(ModelConfig(name="tiny", n_layer=2, n_head=2, n_embd=64), seq_len=32)
    assert summary["mfu"] == pytest.approx(flops * summary["tokens_per_sec"] / 1e12)
    assert (summary["peak_flops"], summary["peak_flops_source"]) == (1e12, "peak_flops setting")
    assert summary["peak_mem_bytes"] > 0


def test_known_gpus_use_the_data_sheet_peak_of_the_dtype_in_use():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # the more specific name wins
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", "tf32") == 156e12
    assert gpu_peak_flops("Some Future GPU", "bfloat16") is None


def test_cpu_peak_is_probed_once_and_cached_and_fresh_measures_again(tmp_path):
    first, source = peak_flops(CPU, torch.float32, False, str(tmp_path))
    assert first > 1e8 and source == "matmul probe (float32, first measurement)"
    again, source = peak_flops(CPU, torch.float32, False, str(tmp_path))
    assert again == first and source == "matmul probe (float32, cached)"
    # plant a figure in the cache: cached mode returns it, fresh mode re-measures and replaces it
    cache = tmp_path / "peak_flops.json"
    cache.write_text(json.dumps({k: 123.0 for k in json.loads(cache.read_text())}))
    assert peak_flops(CPU, torch.float32, False, str(tmp_path))[0] == 123.0
    fresh, source = peak_flops(CPU, torch.float32, False, str(tmp_path), probe="fresh")
    assert fresh > 1e8 and source == "matmul probe (float32, fresh)"
    assert list(json.loads(cache.read_text()).values()) == [fresh]


@pytest.mark.parametrize("bad", [-1e12, 0, "fast"])
def test_a_cached_peak_that_is_not_a_positive_number_is_measured_again(tmp_path, caplog, bad):
    peak_flops(CPU, torch.float32, False, str(tmp_path))
    cache = tmp_path / "peak_flops.json"
    cache.write_text(json.dumps({k: bad for k in json.loads(cache.read_text())}))
    peak, source = peak_flops(CPU, torch.float32, False, str(tmp_path))
    assert peak > 1e8 and source == "matmul probe (float32, first measurement)"
    assert list(json.loads(cache.read_text()).values()) == [peak]  # the bad figure is replaced
    assert "not a positive FLOP/s figure; measuring again" in caplog.text


def test_peak_settings_are_checked_with_messages_naming_them():
    with pytest.raises(ValueError, match="peak_probe='sometimes' is not a probe mode; valid: cached, fresh"):
        peak_flops(CPU, torch.float32, False, None, probe="sometimes")
    with pytest.raises(ValueError, match="peak_flops=0 must be positive"):
        peak_flops(CPU, torch.float32, False, None, override=0)
    assert peak_flops(CPU, torch.bfloat16, False, None, override=2.5e12) == (2.5e12, "peak_flops setting")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-run CPU peak memory uses /proc/self/clear_refs")
def test_peak_memory_restarts_for_each_run_of_a_process():
    reset_peak_memory(CPU)
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    with_big = peak_memory_bytes(CPU)
    del big
    reset_peak_memory(CPU)  # what train() does first: a multirun's earlier jobs do not leak into this one's peak
    assert peak_memory_bytes(CPU) < with_big - 200 * 2**20
