"""The model choices beyond GPT-2 (issue 12), each against an independent reference, and all of them together.

References: torch.nn.RMSNorm and the formula; transformers' Llama rotary embedding; the manual attention kernel with
the same band mask (and attention over the last `window` tokens); the formulas of relu^2 and the softcap; transformers'
GPT-2 parameter names for the default model. Slow: a compiled run and a 2-process gloo DDP run with every choice on.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import TINY, compose, losses, run_train, tiny_corpus

from gpt2x.config import ModelConfig
from gpt2x.model.attention import ATTENTION_KERNELS, band_mask, check_attention, manual_attention
from gpt2x.model.components import ACTIVATIONS, NORMS, POSITIONS, RotaryPositions, apply_rotary, layer_windows
from gpt2x.model.gpt import GPT
from gpt2x.model.hf import export_hf, from_pretrained
from gpt2x.run import checkpoint
from gpt2x.sample import generate, load_model, sample_texts
from gpt2x.validate import validate

SMALL = dict(block_size=32, vocab_size=256, n_layer=4, n_head=2, n_embd=32)
# every choice away from GPT-2 at once, as model.<field> overrides (tiny has 2 layers: one value-embed table, SL)
ALL_CHOICES = [
    "model.position=rope", "model.rope_base=500", "model.norm=rmsnorm", "model.norm_gain=false", "model.qk_norm=true",
    "model.activation=relu2", "model.tie_embeddings=false", "model.logit_softcap=15", "model.init=zero_proj",
    "model.window=8", "model.window_pattern=SL", "model.value_embeds=1",
]  # fmt: skip


def all_choices_config(**changes) -> ModelConfig:
    choices = dict(position="rope", rope_base=500.0, norm="rmsnorm", norm_gain=False, qk_norm=True, activation="relu2",
                   tie_embeddings=False, logit_softcap=15.0, init="zero_proj", window=8, window_pattern="SSL",
                   value_embeds=1)  # fmt: skip
    return ModelConfig(**{**SMALL, **choices, **changes})


def test_default_model_has_exactly_gpt2s_parameters_as_transformers_names_them():
    def shapes(state_dict, conv1d=False):
        # transformers' Conv1D stores (in, out), nn.Linear (out, in); its causal-mask buffers are not parameters
        return {k: tuple(v.shape[::-1]) if conv1d and k.endswith(".weight") and ".c_" in k else tuple(v.shape)
                for k, v in state_dict.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # fmt: skip

    hf_config = transformers.GPT2Config(n_positions=32, vocab_size=256, n_layer=4, n_head=2, n_embd=32)
    want = shapes(transformers.GPT2LMHeadModel(hf_config).state_dict(), conv1d=True)
    assert shapes(GPT(ModelConfig(**SMALL), real_vocab_size=256).state_dict()) == want


def test_rmsnorm_matches_torch_rmsnorm_and_its_formula_with_and_without_gain():
    model = GPT(ModelConfig(**SMALL, norm="rmsnorm"), real_vocab_size=256)
    norm = model.transformer.h[1].ln_2
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32) * 4 + 1
    reference = torch.nn.RMSNorm(32, eps=1e-5)
    reference.load_state_dict(norm.state_dict())
    formula = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), reference(x))
    torch.testing.assert_close(norm(x), formula)

    bare = GPT(ModelConfig(**SMALL, norm="rmsnorm", norm_gain=False), real_vocab_size=256)
    assert not [k for k in bare.state_dict() if "ln_" in k]  # the speedrun's parameter-free norm
    torch.testing.assert_close(bare.transformer.ln_f(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert set(NORMS) == {"layernorm", "rmsnorm"}


def test_rotary_matches_transformers_llama_rotary_embedding():
    # RotaryPositions uses the half-split pairing (i, i + hs/2), the convention of transformers' rotate_half
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, nh, T, hs = 2, 3, 11, 16
    hf = LlamaRotaryEmbedding(transformers.LlamaConfig(hidden_size=nh * hs, num_attention_heads=nh, rope_theta=500.0,
                                                       max_position_embeddings=64))  # fmt: skip
    q, k = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    cos_hf, sin_hf = hf(q, torch.arange(T).expand(B, T))
    want_q, want_k = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)

    cos, sin = RotaryPositions(ModelConfig(n_embd=nh * hs, n_head=nh, rope_base=500.0)).rotation(T, q.device)
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k)


def test_rope_attention_layer_is_qkv_rotated_as_transformers_does_then_causal_attention():
    model = GPT(ModelConfig(**SMALL, position="rope", rope_base=500.0), real_vocab_size=256)
    assert "transformer.wpe.weight" not in model.state_dict()  # rope has no position table
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    attn, x = model.transformer.h[2].attn, torch.randn(2, 9, 32)
    q, k, v = (t.view(2, 9, 2, 16).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=2))
    hf = LlamaRotaryEmbedding(transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, rope_theta=500.0))
    q, k = apply_rotary_pos_emb(q, k, *hf(x, torch.arange(9)[None]))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(attn(x, model.transformer.wpe.rotation(9, x.device)), attn.c_proj(y))


def test_manual_window_is_attention_over_the_last_window_tokens():
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    y = manual_attention(q, k, v, window=4)
    for t in range(12):
        lo = max(0, t - 3)  # token t sees t-3..t
        want = manual_attention(q[:, :, lo : t + 1], k[:, :, lo : t + 1], v[:, :, lo : t + 1])[:, :, -1]
        torch.testing.assert_close(y[:, :, t], want)
    assert band_mask(5, 2, "cpu").sum(-1).tolist() == [1, 2, 2, 2, 2]
    assert not torch.allclose(y, manual_attention(q, k, v))  # (tests/test_attention.py: every kernel == this one)


@pytest.mark.parametrize("window", [None, 5])
def test_flex_kernel_forward_matches_manual_on_cpu(window):
    # CPU FlexAttention has no backward (training is CUDA-only; tests/test_cuda.py checks gradients), but its forward
    # runs here and checks the block mask
    q, k, v = (torch.randn(1, 2, 37, 16) for _ in range(3))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": unfused, fine for a test
        got = ATTENTION_KERNELS["flex"](q, k, v, window)
    torch.testing.assert_close(got, manual_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_window_pattern_cycles_long_and_short_windows_over_the_layers():
    windows = layer_windows(ModelConfig(n_layer=6, window=64, window_pattern="SSL"))
    assert windows == [32, 32, 64, 32, 32, 64]  # short_window null = window // 2
    assert layer_windows(ModelConfig(n_layer=3, window=64, short_window=5, window_pattern="SL")) == [5, 64, 5]
    assert layer_windows(ModelConfig(n_layer=2)) == [None, None]
    model = GPT(ModelConfig(**SMALL, window=6, short_window=2, window_pattern="SL"), "manual", real_vocab_size=256)
    assert [block.attn.window for block in model.transformer.h] == [2, 6, 2, 6]


def test_softcap_caps_logits_in_loss_and_sampling_and_the_fused_loss_agrees():
    torch.manual_seed(0)
    config = dict(SMALL, vocab_size=320)  # padded: columns 256.. stay -inf after the cap
    plain = GPT(ModelConfig(**config), real_vocab_size=256)
    capped = GPT(ModelConfig(**config, logit_softcap=2.0), real_vocab_size=256)
    fused = GPT(ModelConfig(**config, logit_softcap=2.0), loss="fused", real_vocab_size=256)
    with torch.no_grad():
        plain.lm_head.weight.mul_(20)  # logits of a few units, where tanh bends
    capped.load_state_dict(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))

    raw, _ = plain(idx)
    logits, loss = capped(idx, targets)
    assert raw[..., :256].abs().max() > 4
    torch.testing.assert_close(logits[..., :256], 2.0 * torch.tanh(raw[..., :256] / 2.0))
    assert torch.isneginf(logits[..., 256:]).all() and logits[..., :256].abs().max() <= 2.0
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 320), targets.view(-1)))

    _, fused_loss = fused(idx, targets)
    torch.testing.assert_close(fused_loss, loss)
    loss.backward()
    fused_loss.backward()
    for (name, p), q in zip(capped.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    out = generate(capped, idx[:, :3], max_new_tokens=4, top_k=None, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 7) and out.max() < 256


def test_relu2_is_relu_squared_in_the_mlp():
    model = GPT(ModelConfig(**SMALL, activation="relu2"), real_vocab_size=256)
    mlp, x = model.transformer.h[0].mlp, torch.randn(3, 4, 32)
    h = mlp.c_fc(x)
    torch.testing.assert_close(mlp(x), mlp.c_proj(torch.where(h > 0, h * h, torch.zeros_like(h))))
    assert isinstance(ACTIVATIONS["gelu_tanh"](), torch.nn.GELU)


def test_zero_proj_zeroes_the_residual_projections_so_each_block_starts_as_the_identity():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, init="zero_proj"), real_vocab_size=256)
    for name, p in model.named_parameters():
        if name.endswith(("c_proj.weight", "bias")):
            assert (p == 0).all(), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.15), name
    idx = torch.randint(0, 256, (2, 10))
    x = model.transformer.wpe.embed(model.transformer.wte(idx))
    torch.testing.assert_close(model(idx)[0], model.lm_head(model.transformer.ln_f(x)))


def test_untied_embeddings_are_separate_parameters_with_gpt2s_names():
    torch.manual_seed(0)
    tied = GPT(ModelConfig(**SMALL), real_vocab_size=256)
    untied = GPT(ModelConfig(**SMALL, tie_embeddings=False), real_vocab_size=256)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert list(untied.state_dict()) == list(tied.state_dict())
    assert untied.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.1)  # GPT-2's 0.02, see README
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + 256 * 32
    assert untied.num_params() == tied.num_params()  # wte is only looked up once untied
    idx = torch.randint(0, 256, (2, 10))
    untied(idx, idx)[1].backward()
    assert untied.lm_head.weight.grad is not None and untied.transformer.wte.weight.grad is not None
    assert not torch.equal(untied.lm_head.weight.grad, untied.transformer.wte.weight.grad)


def test_value_embeddings_change_the_values_of_their_layers_only():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**dict(SMALL, n_layer=5), value_embeds=2), "manual", real_vocab_size=256)
    # tables sit outside the blocks; table i serves layer i and layer n_layer - N + i (here 0, 3 and 1, 4)
    assert [k for k in model.state_dict() if ".ve." in k] == ["transformer.ve.0.weight", "transformer.ve.1.weight"]
    assert model.ve_tables == [0, 1, None, 0, 1]
    with torch.no_grad():
        for block in model.transformer.h:
            if block.attn.ve_lambdas is not None:
                assert block.attn.ve_lambdas.dim() == 1  # a scalar pair: no weight decay, no Muon
                block.attn.ve_lambdas.copy_(torch.tensor([0.7, 1.3]))
    seen = {}
    for layer, block in enumerate(model.transformer.h):
        block.attn.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__((layer, "x"), args[0]))
        block.attn.attn_fn = lambda q, k, v, w, layer=layer: seen.__setitem__((layer, "v"), v) or manual_attention(
            q, k, v, w
        )
    idx = torch.randint(0, 256, (2, 10))
    model(idx)
    for layer, table in enumerate(model.ve_tables):
        v = model.transformer.h[layer].attn.c_attn(seen[layer, "x"])[..., 64:]  # the value part of the projection
        if table is not None:
            v = 0.7 * v + 1.3 * model.transformer.ve[table](idx)
        torch.testing.assert_close(seen[layer, "v"], v.view(2, 10, 2, 16).transpose(1, 2), msg=f"layer {layer}")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.norm=batchnorm"], r"model.norm=batchnorm is unknown; valid: layernorm, rmsnorm"),
        (["model.position=alibi"], r"model.position=alibi is unknown; valid: learned, rope"),
        (["model.activation=swiglu"], r"model.activation=swiglu is unknown; valid: gelu_tanh, relu2"),
        (["model.init=xavier"], r"model.init=xavier is unknown; valid: gpt2, zero_proj"),
        (["model.position=rope", "model.n_head=4", "model.n_embd=36"], r"model.position=rope .* even head dim"),
        (["model.window=0"], r"model.window=0 must be at least 1"),
        (["model.window=8", "model.window_pattern=SLX"], r"model.window_pattern='SLX' must be .* L .* S"),
        (["model.window_pattern=SL"], r"model.window_pattern=SL has S \(short-window\) layers, .* need model.window"),
        (["model.short_window=4"], r"model.short_window=4 needs model.window"),
        (["model.window=8", "model.short_window=0"], r"model.short_window=0 must be at least 1"),
        (["model.window=1", "model.window_pattern=S"], r"model.window=1 leaves the S layers .* 1 // 2 = 0"),
        (["model.value_embeds=2"], r"model.value_embeds=2: .* 2 \* value_embeds <= model.n_layer=2; use at most 1"),
        (["model.logit_softcap=0"], r"model.logit_softcap=0.0 must be positive"),
        (["attention=flex"], r"attention=flex is CUDA-only for training: .*no backward on cpu; use attention=sdpa"),
    ],
)
def test_model_choices_that_cannot_work_are_refused_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate(compose(["model=tiny", *overrides]), torch.device("cpu"), 1)


def test_flash_refuses_a_window_on_cuda_where_its_kernel_takes_no_mask():
    # (the CPU flash kernel takes SDPA's mask: tests/test_attention.py runs it with a window against manual)
    with pytest.raises(ValueError, match=r"attention=flash cannot apply model.window=8 on cuda: .*attention=flex"):
        check_attention("flash", "cuda", torch.bfloat16, 64, window=8)


def test_gpt2_format_refuses_every_choice_it_cannot_hold(hf_gpt2_dir, tmp_path):
    message = r"loads GPT-2 weights, .* cannot hold model.position=rope, model.qk_norm=true; use GPT-2's model.position"
    with pytest.raises(ValueError, match=message + r"=learned, model.qk_norm=false"):
        from_pretrained(hf_gpt2_dir, position="rope", qk_norm=True)
    from_pretrained(hf_gpt2_dir, init="zero_proj")  # how random weights would start: irrelevant to loaded ones
    cfg = compose(["model=tiny", f"model.init_from={hf_gpt2_dir}", "model.logit_softcap=30"])
    with pytest.raises(ValueError, match=r"model.init_from=.* cannot hold model.logit_softcap=30.0"):
        validate(cfg, torch.device("cpu"), 1)
    for field, value in [("norm", "rmsnorm"), ("norm_gain", False), ("activation", "relu2"), ("tie_embeddings", False),
                         ("window", 4), ("value_embeds", 1)]:  # fmt: skip
        model = GPT(ModelConfig(**SMALL, **{field: value}), real_vocab_size=256)
        with pytest.raises(ValueError, match=rf"export_hf writes GPT-2 weights .* cannot hold model.{field}="):
            export_hf(model, tmp_path / field)
        assert not (tmp_path / field).exists()


def test_every_position_kind_samples_and_crops_the_context_to_block_size():
    for position in POSITIONS:
        model = GPT(all_choices_config(position=position, block_size=8), real_vocab_size=256)
        out = generate(model, torch.zeros(1, 1, dtype=torch.long), max_new_tokens=12,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        assert out.shape == (1, 13)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_with_every_choice_on_trains(tmp_path, precision):
    # through the training loop: validation, the run's precision, evaluation and sampling (which crash if a choice
    # breaks them) at the end
    keep = 8 if precision == "fp32" else 0  # one checkpoint, to sample from below
    run_train(tmp_path, [*ALL_CHOICES, f"precision={precision}", "optim.max_steps=8", "optim.lr=3e-3",
                         "eval_interval=8", "sample_interval=8", f"checkpoint_interval={keep}"])  # fmt: skip
    got = losses(tmp_path)
    assert len(got) == 8 and got[-1] < got[0] - 0.5, got
    if precision != "fp32":
        return
    # gpt2x-sample rebuilds the model from the checkpoint's config, every choice included
    model = load_model(str(checkpoint.list_checkpoints(tmp_path / "checkpoints")[-1][1]), None)
    assert (model.config.value_embeds, model.config.window, model.config.position) == (1, 8, "rope")
    assert sample_texts(model, "To be", 1, 5)[0].startswith("To be")


@pytest.mark.slow
def test_every_choice_on_compiles_without_graph_breaks_and_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    run = [*ALL_CHOICES, "loss=fused", "precision=fp32", "optim.max_steps=3", "eval_interval=0", "sample_interval=0"]
    run_train(tmp_path / "eager", run)
    counters.clear()
    run_train(tmp_path / "compiled", [*run, "compile=default"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-4)


@pytest.mark.slow
def test_every_choice_on_under_two_process_ddp_equals_one_process_with_double_accumulation(tmp_path):
    # every parameter gets a gradient every step (value-embed tables serve two layers each), so DDP needs no
    # find_unused_parameters; the ranks' parity with one process shows the gradients were all-reduced
    from gpt2x.launch import launch
    from gpt2x.train import train

    common = [*TINY, *ALL_CHOICES, "data=text", f"data.path={tiny_corpus()}", "precision=fp32",
              "data.total_batch_size=256", "eval_interval=0", "sample_interval=0"]  # fmt: skip
    for name, parallel in [("single", ["parallel=single"]), ("ddp", ["parallel=ddp", "parallel.nproc_per_node=2"])]:
        (tmp_path / name).mkdir()
        launch(train, compose(common + parallel), tmp_path / name)
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(got) == 3 and got == pytest.approx(ref, abs=1e-5), f"ddp {got} vs single {ref}"
    assert ref[-1] < ref[0]
