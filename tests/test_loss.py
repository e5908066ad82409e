"""The fused, chunked output layer + cross-entropy gives the loss and gradients of the plain one, without the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2x.config import ModelConfig
from gpt2x.model.gpt import GPT
from gpt2x.model.loss import linear_cross_entropy


def _plain(x, weight, targets, n_valid):
    logits = (x @ weight.t()).float()
    logits[..., n_valid:] = float("-inf")
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


@pytest.mark.parametrize("chunk_size", [7, 64, 4096], ids=lambda c: f"chunk{c}")
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 16, generator=g, requires_grad=True)  # (B, T, C)
    weight = (0.1 * torch.randn(130, 16, generator=g)).requires_grad_()  # (V, C), rows >= 120 are padding
    targets = torch.randint(0, 120, (3, 20), generator=g)
    targets[0, :5] = -100  # ignored positions count neither in the loss nor in the mean
    want = _plain(x, weight, targets, 120)
    want_grads = torch.autograd.grad(want, [x, weight])
    got = linear_cross_entropy(x, weight, targets, n_valid=120, chunk_size=chunk_size)
    got_grads = torch.autograd.grad(3.0 * got, [x, weight])  # the upstream gradient scales both
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got, 3.0 * g_want, rtol=1e-5, atol=1e-7)
    assert weight.grad is None  # nothing is left behind on the parameters


def test_model_with_fused_ce_trains_like_the_plain_model_and_returns_no_logits():
    config = dict(block_size=32, vocab_size=50304, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    plain = GPT(ModelConfig(**config))
    fused = GPT(ModelConfig(**config), loss="fused")
    fused.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 50257, (2, 2, 16)).unbind(0)
    _, want = plain(idx, targets)
    logits, got = fused(idx, targets)
    assert logits is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.backward()
    got.backward()
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_plain.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert fused(idx)[0].shape == (2, 16, 50304)  # without targets (sampling) the logits are still there


def test_fused_ce_under_bf16_autocast_stays_close_to_plain():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    weight = (0.1 * torch.randn(500, 32)).requires_grad_()
    targets = torch.randint(0, 500, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _plain(x, weight, targets, 500)
        got = linear_cross_entropy(x, weight, targets, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    gx, gw = torch.autograd.grad(got, [x, weight])
    assert gx.dtype == x.dtype and gw.dtype == weight.dtype and torch.isfinite(gw).all()


def test_training_forward_can_skip_the_logits_and_gets_the_same_loss():
    # the training loop asks for the loss only, so a compiled graph need not write the (B, T, V) logits out
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    idx, targets = torch.randint(0, 50257, (2, 2, 8)).unbind(0)
    logits, loss = model(idx, targets)
    no_logits, same = model(idx, targets, return_logits=False)
    assert logits.shape == (2, 8, 50304) and no_logits is None
    assert same.item() == loss.item()


@pytest.mark.slow  # one cold inductor compile
def test_compiled_loss_only_path_of_a_padded_vocab_matches_eager_and_leaves_padding_rows_untrained():
    # compiled, the -inf write hidden from autograd (GPT.logits) becomes part of the graph's softmax kernel
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16), real_vocab_size=50257)
    idx, targets = torch.randint(0, 50257, (2, 2, 16)).unbind(0)
    _, want = model(idx, targets, return_logits=False)
    (want_grad,) = torch.autograd.grad(want, [model.lm_head.weight])
    _, got = torch.compile(model)(idx, targets, return_logits=False)
    (got_grad,) = torch.autograd.grad(got, [model.lm_head.weight])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert got_grad[50257:].abs().max() == 0  # padding rows learn nothing
