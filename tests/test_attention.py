"""Every attention kernel computes the textbook causal attention, and check_attention tells the truth about them."""

import pytest
import torch

from gpt2x.config import ModelConfig
from gpt2x.model.attention import ATTENTION_KERNELS, check_attention, get_attention
from gpt2x.model.gpt import GPT

# output/gradient tolerance per dtype: fp32 kernels differ only by summation order; bf16 rounds every intermediate
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _available(name, dtype, device="cpu", window=None):
    try:
        check_attention(name, device, dtype, head_dim=16, window=window)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("window", [None, 5], ids=["causal", "window5"])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("name", list(ATTENTION_KERNELS))
def test_kernel_matches_manual_attention_outputs_and_gradients(name, T, dtype, window):
    # with a window, the same band mask as the manual kernel's (whose band is checked in test_model_components.py)
    reason = _available(name, dtype, window=window)
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(2, 3, T, 16, generator=g).to(dtype) for _ in range(4))  # (B, nh, T, hs)

    def run(kernel):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        y = kernel(*leaves, window)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    tol = TOLERANCE[dtype]
    results = zip(run(ATTENTION_KERNELS[name]), run(ATTENTION_KERNELS["manual"]), ["y", "dq", "dk", "dv"], strict=True)
    for got, want, what in results:
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m, what=what: f"{name} {what}: {m}")


def test_manual_attention_is_causal():
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    y = ATTENTION_KERNELS["manual"](q, k, v)
    v2 = v.clone()
    v2[:, :, 5:] += 100.0  # changing future tokens must not change earlier outputs
    y2 = ATTENTION_KERNELS["manual"](q, k, v2)
    torch.testing.assert_close(y[:, :, :5], y2[:, :, :5])
    assert not torch.allclose(y[:, :, 5:], y2[:, :, 5:])


@pytest.mark.parametrize("window", [None, 4], ids=["causal", "window4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ATTENTION_KERNELS))
def test_check_attention_agrees_with_running_the_kernel(name, dtype, window):
    # a kernel that check_attention rejects must also refuse to run (no silent fallback to another backend), and one it
    # accepts must run; inputs that need gradients, as in training (CPU FlexAttention runs forward only)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    if _available(name, dtype, window=window) is None:
        assert ATTENTION_KERNELS[name](q, k, v, window).shape == q.shape
    else:
        with pytest.raises(RuntimeError):
            ATTENTION_KERNELS[name](q, k, v, window)


def test_flash_attention_runs_on_cpu_in_this_torch():
    # PyTorch ships a CPU flash-attention kernel; attention=flash is therefore a valid CPU choice (fp32 and bf16)
    check_attention("flash", "cpu", torch.float32)
    with torch.no_grad():  # the probe needs autograd; it must work from inside an inference block too
        check_attention("flash", "cpu", "bf16")


def test_check_attention_rejects_impossible_combinations_with_clear_messages():
    with pytest.raises(ValueError, match=r"attention=efficient is not available on cpu.*attention=sdpa"):
        check_attention("efficient", "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"attention=flash is not available on cuda with torch.float32.*bfloat16"):
        check_attention("flash", "cuda", torch.float32)
    with pytest.raises(ValueError, match=r"attention=flash supports head_dim <= 256"):
        check_attention("flash", "cuda", torch.bfloat16, head_dim=512)
    with pytest.raises(ValueError, match=r"attention=nope is not a known attention kernel; valid choices: manual"):
        check_attention("nope", "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"dtype='float99' is not a torch dtype"):
        check_attention("sdpa", "cpu", "float99")


def test_unknown_kernel_name_is_rejected_naming_the_valid_ones():
    with pytest.raises(ValueError, match="valid choices: " + ", ".join(ATTENTION_KERNELS)):
        get_attention("flash3")
    assert get_attention("sdpa") is ATTENTION_KERNELS["sdpa"]


def test_every_available_kernel_gives_the_same_model_loss():
    config = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    reference = GPT(ModelConfig(**config), attention="manual", real_vocab_size=64)
    idx = torch.randint(0, 64, (2, 19))
    _, want = reference(idx, idx)
    for name in ATTENTION_KERNELS:
        if _available(name, torch.float32):
            continue
        model = GPT(ModelConfig(**config), attention=name, real_vocab_size=64)
        model.load_state_dict(reference.state_dict())
        _, got = model(idx, idx)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"attention={name}: {m}")
