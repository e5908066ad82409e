"""The CUDA paths on a real GPU (issue 14): `pytest -m cuda tests/test_cuda.py`, run by experiments/gpu/check.sh.

Each test is the GPU half of a rule that tests/test_gpu_paths.py pins on CPU. Without a GPU they are skipped (the
`cuda` marker, conftest.py); imports stay light (no transformers) so the offline wheelhouse can run them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, compose

from gpt2x.config import ModelConfig
from gpt2x.model.attention import check_attention, flex_attention, manual_attention
from gpt2x.model.gpt import GPT
from gpt2x.model.loss import linear_cross_entropy
from gpt2x.run.metrics import GPU_PEAK_FLOPS, peak_flops
from gpt2x.sample import sample_texts, sampling_attention
from gpt2x.speed.precision import check_precision
from gpt2x.train import host_to_device
from gpt2x.validate import validate

pytestmark = pytest.mark.cuda
GPU = torch.device("cuda")


def _ampere_or_newer() -> bool:
    return torch.cuda.get_device_capability() >= (8, 0)


def test_flash_samples_under_bf16_autocast_and_has_no_float32_kernel():
    if not _ampere_or_newer():
        pytest.skip("FlashAttention needs sm80+")
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64), "flash").to(GPU)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    texts = sample_texts(model, "Hello", 2, 8, device=GPU, autocast=bf16)
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts)
    with pytest.raises(RuntimeError):  # the crash sampling outside autocast used to hit at the last step
        sample_texts(model, "Hello", 1, 2, device=GPU)
    assert sampling_attention("flash", GPU, torch.float32) == "sdpa"  # gpt2x-sample --dtype float32 falls back
    check_attention("flash", GPU, torch.bfloat16)


def test_bf16_is_accepted_only_where_the_gpu_has_bfloat16_units():
    cfg = compose(["precision=bf16"]).precision
    if _ampere_or_newer():
        check_precision(cfg, GPU)
    else:
        with pytest.raises(ValueError, match="no bfloat16 units"):
            check_precision(cfg, GPU)


def test_this_gpus_peak_comes_from_its_data_sheet_or_a_probe_that_says_so():
    name = torch.cuda.get_device_name()
    peak, source = peak_flops(GPU, torch.bfloat16, False, None, probe="fresh")
    if name in GPU_PEAK_FLOPS:
        assert (peak, source) == (GPU_PEAK_FLOPS[name]["bfloat16"], f"data sheet ({name}, bfloat16)")
    else:
        assert source.startswith("matmul probe") and name in source and peak > 1e12


def test_batches_reach_the_gpu_intact_through_pinned_memory():
    x, y = torch.arange(4096).view(4, 1024), torch.arange(1, 4097).view(4, 1024)
    gx, gy = host_to_device(x, y, device=GPU)
    torch.cuda.synchronize()
    assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
    assert x.pin_memory().is_pinned()


def test_fused_ce_under_fp16_keeps_the_gradients_of_improbable_tokens_on_the_gpu():
    torch.manual_seed(0)
    x = (1 + 0.1 * torch.randn(64, 64)).to(GPU)
    weight = (0.1 * torch.randn(256, 64)).to(GPU)
    weight[128:] = -0.4 + 0.01 * torch.randn(128, 64, device=GPU)  # ~25 nats below: p ~ 1e-13, under fp16's range
    targets = torch.randint(0, 128, (64,), device=GPU)
    w_ref = weight.clone().requires_grad_()
    F.cross_entropy(x @ w_ref.t(), targets).backward()
    w = weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        linear_cross_entropy(x, w, targets).backward()
    assert w_ref.grad[128:].abs().max() > 0
    assert torch.allclose(w.grad[128:], w_ref.grad[128:], rtol=0.1, atol=0)


def test_more_ddp_workers_than_gpus_fail_before_any_worker_starts(tmp_path):
    n = torch.cuda.device_count() + 1
    cfg = compose(TINY + ["device=cuda", "parallel=ddp", f"parallel.nproc_per_node={n}"])
    with pytest.raises(ValueError, match=rf"{n} worker processes .* parallel.nproc_per_node<={n - 1}"):
        validate(cfg, torch.device("cuda"), n)


@pytest.mark.parametrize("window", [None, 100], ids=["causal", "window100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_flex_attention_matches_manual_with_the_same_window_outputs_and_gradients(dtype, window):
    # 300 tokens: several 128-token blocks, some wholly outside the window (skipped), some cut by it (masked)
    check_attention("flex", GPU, dtype, 64, window)
    g = torch.Generator(device=GPU).manual_seed(0)
    q, k, v, dy = (torch.randn(2, 3, 300, 64, generator=g, device=GPU).to(dtype) for _ in range(4))

    def run(kernel):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = kernel(*leaves, window)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for got, want, what in zip(run(flex_attention), run(manual_attention), ["y", "dq", "dk", "dv"], strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, what=what: f"flex {what}: {m}")


def test_every_model_choice_with_flex_gives_sdpas_band_mask_loss_under_bf16():
    # init=gpt2, not zero_proj: with zeroed c_proj the loss at init would not depend on attention at all
    config = ModelConfig(block_size=256, vocab_size=512, n_layer=4, n_head=2, n_embd=128, position="rope",
                         norm="rmsnorm", norm_gain=False, qk_norm=True, activation="relu2", tie_embeddings=False,
                         logit_softcap=15.0, window=64, window_pattern="SSL", value_embeds=1)  # fmt: skip
    torch.manual_seed(0)
    sdpa = GPT(config, "sdpa", real_vocab_size=512).to(GPU)
    flex = GPT(config, "flex", real_vocab_size=512).to(GPU)
    flex.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 512, (2, 200), device=GPU)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, want = sdpa(idx, idx)
        _, got = flex(idx, idx)
    got.backward()
    assert torch.isfinite(got) and all(p.grad is not None for p in flex.parameters())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_a_flex_model_with_a_window_samples_on_the_gpu():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=64, n_layer=2, n_head=2, n_embd=64, window=16), "flex").to(GPU)
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    texts = sample_texts(model, "Hello", 2, 20, device=GPU, autocast=bf16)  # 20 lengths: unfused, no recompiles
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts)
