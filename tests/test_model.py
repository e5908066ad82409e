"""GPT-2 model: parity with transformers' GPT-2, init, padded vocabulary, learning, and generation."""

import pytest
import torch
import transformers

from gpt2x.config import ModelConfig
from gpt2x.model.gpt import GPT
from gpt2x.model.hf import export_hf, from_pretrained
from gpt2x.sample import generate

# tests/conftest.py sets HF_HUB_OFFLINE=1 before this import: every checkpoint here is made locally, never downloaded

TINY = dict(n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def hf_dir(hf_gpt2_dir):
    return hf_gpt2_dir


def _hf_logits(path, idx):
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return hf(idx).logits


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 50257, (2, 23), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_from_pretrained_logits_match_transformers(hf_dir, idx, attention):
    model = from_pretrained(hf_dir, attention=attention).eval()
    assert model.config == ModelConfig(name=str(hf_dir), block_size=64, vocab_size=50257, init_from=str(hf_dir), **TINY)
    assert model.attention == attention
    with torch.no_grad():
        logits, loss = model(idx)
    assert loss is None
    torch.testing.assert_close(logits, _hf_logits(hf_dir, idx), atol=1e-5, rtol=1e-5)


def test_export_hf_round_trips_through_transformers_and_drops_vocab_padding(hf_dir, idx, tmp_path):
    model = from_pretrained(hf_dir, vocab_size=50304).eval()
    export_hf(model, tmp_path / "export")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    assert reloaded.config.vocab_size == 50257
    torch.testing.assert_close(_hf_logits(tmp_path / "export", idx), _hf_logits(hf_dir, idx), atol=1e-6, rtol=1e-6)
    # and back into gpt2x
    again = from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], model(idx)[0][..., :50257], atol=1e-6, rtol=1e-6)


def test_from_pretrained_pads_vocab_and_crops_block_size(hf_dir, idx):
    model = from_pretrained(hf_dir, vocab_size=50304, block_size=32).eval()
    assert model.transformer.wte.weight.shape == (50304, 32)
    assert model.transformer.wpe.weight.shape == (32, 32)
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.isneginf(logits[..., 50257:]).all()
    torch.testing.assert_close(logits[..., :50257], _hf_logits(hf_dir, idx), atol=1e-5, rtol=1e-5)


def test_from_pretrained_rejects_bad_overrides_and_non_gpt2_checkpoints(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"model.n_layer=3 does not match the checkpoint .*n_layer=2"):
        from_pretrained(hf_dir, n_layer=3)
    from_pretrained(hf_dir, n_layer=2)  # restating the checkpoint's value is fine
    with pytest.raises(ValueError, match=r"model.block_size=128 exceeds the checkpoint's 64 position embeddings"):
        from_pretrained(hf_dir, block_size=128)
    with pytest.raises(ValueError, match=r"unknown model override\(s\) \['dropout'\]"):
        from_pretrained(hf_dir, dropout=0.1)
    transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"is a 'llama' checkpoint, not GPT-2"):
        from_pretrained(tmp_path / "llama")
    transformers.GPT2Config(activation_function="relu", **TINY).save_pretrained(tmp_path / "relu")
    with pytest.raises(ValueError, match=r"GPT-2 variant this model does not implement.*activation_function=relu"):
        from_pretrained(tmp_path / "relu")
    with pytest.raises(ValueError, match=r"model.init_from=.*missing.* could not be loaded"):
        from_pretrained(tmp_path / "missing")


def test_init_follows_gpt2_scaled_residual_init():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(ModelConfig(block_size=64, vocab_size=512, n_layer=n_layer, n_head=4, n_embd=256), real_vocab_size=512)
    residual_std = 0.02 / (2 * n_layer) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert (p == 0).all(), name
        elif ".ln_" in name:
            assert (p == 1).all(), name
    assert model.lm_head.weight is model.transformer.wte.weight
    # tied weights are counted once; non_embedding drops only the position embeddings (as in nanoGPT)
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 64 * 256


def test_gpt2_124m_has_the_published_parameter_count():
    with torch.device("meta"):  # shapes only, no memory or init time
        model = GPT(ModelConfig())
    assert model.num_params(non_embedding=False) == 124_439_808


def test_padded_vocab_gives_the_same_loss_and_never_predicts_padding():
    torch.manual_seed(0)
    padded = GPT(ModelConfig(block_size=16, vocab_size=50304, **TINY), real_vocab_size=50257)
    exact = GPT(ModelConfig(block_size=16, vocab_size=50257, **TINY), real_vocab_size=50257)
    sd = padded.state_dict()
    sd = {k: (v[:50257] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in sd.items()}
    exact.load_state_dict(sd)
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    logits, loss = padded(idx, targets)
    _, loss_exact = exact(idx, targets)
    assert loss.item() == pytest.approx(loss_exact.item(), abs=1e-6)
    assert torch.isneginf(logits[..., 50257:]).all()
    loss.backward()
    assert padded.lm_head.weight.grad[50257:].abs().max() == 0  # padding rows learn nothing
    out = generate(padded, idx[:, :4], max_new_tokens=8, top_k=None, generator=torch.Generator().manual_seed(0))
    assert out.max() < 50257


class _RecordedMaskGPT(GPT):
    """The padding mask as autograd records it: the form GPT.logits avoids, kept here as the reference."""

    def logits(self, x):
        logits = self.lm_head(x)
        logits[..., self.real_vocab_size :] = float("-inf")
        return logits


def _backward_ops(loss):
    seen, todo = set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_padding_mask_adds_no_backward_op_and_leaves_gradients_bit_identical(dtype):
    # cross-entropy's gradient at a -inf logit is softmax = 0, so hiding the -inf write from autograd changes no
    # gradient, and saves the backward the CopySlices node (a copy of the whole (B, T, V) gradient)
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, vocab_size=50304, **TINY)
    model, recorded = GPT(config, real_vocab_size=50257), _RecordedMaskGPT(config, real_vocab_size=50257)
    recorded.load_state_dict(model.state_dict())
    idx, targets = torch.randint(0, 50257, (2, 2, 16)).unbind(0)
    losses = []
    for m in (model, recorded):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits, loss = m(idx, targets)
        assert torch.isneginf(logits[..., 50257:]).all()
        loss.backward()
        losses.append(loss)
    assert "CopySlices" in _backward_ops(losses[1]) and "CopySlices" not in _backward_ops(losses[0])
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(model.named_parameters(), recorded.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_sequence_longer_than_block_size_is_refused_before_any_work():
    from helpers import compose

    from gpt2x.validate import validate

    message = r"data.seq_len=9 exceeds model.block_size=8 \(model=tiny\); use data.seq_len<=8"
    with pytest.raises(ValueError, match=message):
        validate(compose(["model=tiny", "model.block_size=8", "data.seq_len=9"]), torch.device("cpu"), 1)


def test_tiny_model_overfits_a_single_batch():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64), real_vocab_size=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 32))
    y = torch.roll(x, -1, dims=1)
    for _ in range(60):  # reaches ~0.05; 1.0 is crossed around step 25
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0


def test_greedy_generation_matches_transformers(hf_dir):
    prompt = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    want = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=50256
    )
    model = from_pretrained(hf_dir, vocab_size=50304)
    got = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert got.tolist() == want.tolist()
    assert len(set(want[:, 5:].flatten().tolist())) > 3  # a non-degenerate continuation, not one repeated token
    assert model.training  # generate restores the mode it found
    # top_k=1 sampling is greedy too
    assert generate(model, prompt, 12, top_k=1).tolist() == want.tolist()


def test_sampling_is_reproducible_per_seed_and_crops_to_block_size():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=16, vocab_size=256, **TINY), real_vocab_size=256).eval()
    prompt = torch.zeros(2, 10, dtype=torch.long)

    def sample(seed):
        return generate(model, prompt, max_new_tokens=20, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(0), sample(0), sample(1)
    assert a.shape == (2, 30)  # 30 > block_size: the context window slides
    assert torch.equal(a[:, :10], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not model.training
