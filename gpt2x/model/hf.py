"""GPT-2 weights in and out of `transformers`: the official checkpoints load by copy and transpose.

transformers' GPT-2 stores its linear layers as Conv1D, i.e. weights of shape (in, out); nn.Linear wants (out, in).
"""

import dataclasses
import math

import torch

from gpt2x.config import ModelConfig
from gpt2x.model.gpt import GPT

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# the model.<field> choices whose non-default values GPT-2's format (GPT2LMHeadModel) has no place for; model.init is
# not one (it only says how random weights start), nor rope_base, short_window, window_pattern (they act only through
# position=rope or a window, which are)
_ARCHITECTURE_CHOICES = ("position", "norm", "norm_gain", "qk_norm", "activation", "tie_embeddings", "logit_softcap",
                         "window", "value_embeds")  # fmt: skip
_SIZES = {"n_layer", "n_head", "n_embd", "block_size", "vocab_size"}
_CHOICES = {f.name for f in dataclasses.fields(ModelConfig)} - _SIZES - {"name", "init_from"}


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_gpt2_format(config, what: str) -> None:
    """Raise ValueError, naming `what` and each model.<field>=<value>, if `config` sets an architecture choice that
    GPT-2's format cannot hold (rope, rmsnorm, qk_norm, relu2, untied embeddings, softcap, window, value embeddings):
    loading or writing its weights as GPT-2 would silently make a different model."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    bad = [k for k in _ARCHITECTURE_CHOICES if getattr(config, k) != defaults[k]]
    if bad:
        got = ", ".join(f"model.{k}={_yaml(getattr(config, k))}" for k in bad)
        keep = ", ".join(f"model.{k}={_yaml(defaults[k])}" for k in bad)
        raise ValueError(
            f"{what}, whose format (transformers GPT2LMHeadModel) cannot hold {got}; use GPT-2's {keep}, or train "
            "from scratch and keep the gpt2x checkpoint"
        )


def from_pretrained(name_or_dir, attention: str = "sdpa", loss: str = "plain", **overrides) -> GPT:
    """Load GPT-2 weights from a Hugging Face hub name ("gpt2", "gpt2-medium", ...) or a save_pretrained directory.

    `attention` and `loss` pick kernels; `overrides` change model settings that do not alter the checkpoint's weights:
    vocab_size (padding rows are added, zero-initialized and masked out of the logits), block_size (<= the
    checkpoint's, position embeddings are cropped). Architecture fields (n_layer, n_head, n_embd) may be passed only
    if they equal the checkpoint's, and the architecture choices (position, norm, ...) only at GPT-2's values.
    """
    from gpt2x.extras import import_extra

    transformers = import_extra("transformers", "hf", "model.init_from / gpt2x-sample --pretrained")
    AutoConfig, GPT2LMHeadModel = transformers.AutoConfig, transformers.GPT2LMHeadModel

    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.init_from={name_or_dir} could not be loaded: {e}. Give a directory written by "
            f"save_pretrained / export_hf, or a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) that is already "
            f"in the Hugging Face cache when HF_HUB_OFFLINE=1"
        ) from e
    _check_is_gpt2(name_or_dir, hf_config)

    fields = _SIZES | _CHOICES
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; valid: {sorted(fields)}")
    check_gpt2_format(ModelConfig(**overrides), f"model.init_from={name_or_dir} loads GPT-2 weights")
    ckpt = dict(n_layer=hf_config.n_layer, n_head=hf_config.n_head, n_embd=hf_config.n_embd)
    for key, value in ckpt.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                f"model.{key}={overrides[key]} does not match the checkpoint {name_or_dir} ({key}={value}); "
                f"remove it or set it to {value}"
            )
    block_size = overrides.get("block_size", hf_config.n_positions)
    if block_size > hf_config.n_positions:
        raise ValueError(
            f"model.block_size={block_size} exceeds the checkpoint's {hf_config.n_positions} position embeddings; "
            f"set model.block_size <= {hf_config.n_positions}"
        )
    settings = dict(ckpt, block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size)
    settings.update(overrides)
    config = ModelConfig(name=str(name_or_dir), init_from=str(name_or_dir), **settings)

    hf = GPT2LMHeadModel.from_pretrained(name_or_dir, dtype=torch.float32)
    sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = GPT(config, attention, loss, real_vocab_size=hf_config.vocab_size)
    sd = model.state_dict()
    if set(sd_hf) != set(sd):
        raise ValueError(
            f"model.init_from={name_or_dir}: parameter names differ from GPT-2's "
            f"(missing {sorted(set(sd) - set(sd_hf))[:5]}, unexpected {sorted(set(sd_hf) - set(sd))[:5]})"
        )
    with torch.no_grad():
        for k, src in sd_hf.items():
            if k.endswith(_CONV1D_WEIGHTS):
                src = src.t()
            dst = sd[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                dst[: src.size(0)].copy_(src)
                dst[src.size(0) :].zero_()  # padding rows: masked out of the logits, never looked up
            elif k == "transformer.wpe.weight":
                dst.copy_(src[: config.block_size])
            else:
                dst.copy_(src)
    return model


def export_hf(model: GPT, out_dir):
    """Write a transformers GPT2LMHeadModel directory (config.json + safetensors) holding `model`'s weights,
    with padding rows dropped so vocab_size is the real one. Load it back with GPT2LMHeadModel.from_pretrained."""
    from gpt2x.extras import import_extra

    transformers = import_extra("transformers", "hf", "export_hf")
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

    c = model.config
    check_gpt2_format(c, f"export_hf writes GPT-2 weights to {out_dir}")
    hf_config = GPT2Config(
        vocab_size=model.real_vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        # this model trains without dropout; say so rather than inherit GPT-2's 0.1
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    hf = GPT2LMHeadModel(hf_config)
    sd_hf = hf.state_dict()
    sd = model.state_dict()
    with torch.no_grad():
        for k, dst in sd_hf.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            src = sd[k].detach().to(device="cpu", dtype=dst.dtype)
            if k.endswith(_CONV1D_WEIGHTS):
                src = src.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                src = src[: model.real_vocab_size]
            dst.copy_(src)
    hf.save_pretrained(out_dir)
    return out_dir


def _check_is_gpt2(name_or_dir, hf_config):
    """Raise ValueError unless the transformers config describes an architecture this GPT reproduces exactly."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "gpt2":
        raise ValueError(f"model.init_from={name_or_dir} is a {model_type!r} checkpoint, not GPT-2 (model_type 'gpt2')")
    n_inner = getattr(hf_config, "n_inner", None)
    mismatches = {
        "activation_function": (hf_config.activation_function in ("gelu_new", "gelu_pytorch_tanh"), "gelu_new"),
        "n_inner": (n_inner in (None, 4 * hf_config.n_embd), "None (4 * n_embd)"),
        "layer_norm_epsilon": (math.isclose(hf_config.layer_norm_epsilon, 1e-5), "1e-5"),
        "scale_attn_weights": (hf_config.scale_attn_weights, "True"),
        "scale_attn_by_inverse_layer_idx": (not hf_config.scale_attn_by_inverse_layer_idx, "False"),
        "add_cross_attention": (not getattr(hf_config, "add_cross_attention", False), "False"),
        "tie_word_embeddings": (getattr(hf_config, "tie_word_embeddings", True), "True"),
    }
    bad = [f"{k}={getattr(hf_config, k, None)} (need {need})" for k, (ok, need) in mismatches.items() if not ok]
    if bad:
        raise ValueError(f"model.init_from={name_or_dir} is a GPT-2 variant this model does not implement: {bad}")
