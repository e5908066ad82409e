"""GPT-2 as in nanoGPT / build-nanogpt, with GPT-2's own module names so official weights load by copy and transpose."""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2x.attention import get_attention
from gpt2x.loss import linear_cross_entropy

# transformers' GPT-2 stores these as Conv1D, i.e. (in, out); nn.Linear wants (out, in)
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    """Architecture of a GPT-2 model."""

    block_size: int = 1024  # max sequence length (number of learned position embeddings)
    vocab_size: int = 50257  # rows of wte / lm_head; may be padded (e.g. 50304, a multiple of 64) for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # residual stream width
    attention: str = "sdpa"  # key of gpt2x.attention.ATTENTION_KERNELS
    real_vocab_size: int = 50257  # tokens >= this are padding rows: never targets, never predicted
    fused_ce: bool = False  # training loss by gpt2x.loss.linear_cross_entropy: the (B, T, V) logits never exist

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.real_vocab_size > self.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({self.real_vocab_size}); set vocab_size >= {self.real_vocab_size} (e.g. 50304)"
            )
        get_attention(self.attention)  # fail at config time on an unknown kernel name


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1  # output of a residual branch: see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_fn = get_attention(config.attention)

    def forward(self, x):
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = self.attn_fn(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2 was trained with the tanh approximation ("gelu_new")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LN: the residual stream itself is never normalized, only what each branch reads from it
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying as in GPT-2: the input embedding is the output classifier (saves 38M params at 124M)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                # each block adds two residual branches; scaling their init keeps the residual stream's variance from
                # growing with depth (GPT-2 paper, sec. 2.3)
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Number of parameters (tied wte/lm_head counted once). With non_embedding, the position embeddings are
        subtracted; the token embeddings stay counted because, tied, they are also the output layer (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) int64 token ids -> (logits (B, T, vocab_size), loss or None).

        Logits of padding tokens (>= real_vocab_size) are -inf, so they take no probability mass in the loss or in
        sampling. loss is the mean cross entropy against targets (B, T); targets equal to -100 are ignored. With
        return_logits=False (the training loop, which needs only the loss) or config.fused_ce and targets, logits is
        None: a compiled model then never writes the (B, T, vocab_size) logits out (~20% of a small model's step).
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds model.block_size={self.config.block_size}; "
                f"set data.seq_len <= model.block_size"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.config.fused_ce:
            # output layer and loss fused, a chunk of tokens at a time; no logits are returned (gpt2x/loss.py)
            return None, linear_cross_entropy(x, self.lm_head.weight, targets, self.config.real_vocab_size)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.vocab_size > self.config.real_vocab_size:
            # in place on the few padding columns only: far cheaper than a (B, T, V) bias add, and autograd allows it
            # because the matmul's backward does not need its output
            logits[..., self.config.real_vocab_size :] = float("-inf")
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return (logits if return_logits else None), loss

    @classmethod
    def from_pretrained(cls, name_or_dir, **overrides):
        """Load GPT-2 weights from a Hugging Face hub name ("gpt2", "gpt2-medium", ...) or a save_pretrained directory.

        `overrides` change GPTConfig fields that do not alter the checkpoint's weights: attention, vocab_size (padding
        rows are added, zero-initialized and masked out of the logits), block_size (<= the checkpoint's, position
        embeddings are cropped). Architecture fields (n_layer, n_head, n_embd, real_vocab_size) may be passed only if
        they equal the checkpoint's.
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

        fields = {f.name for f in dataclasses.fields(GPTConfig)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown GPTConfig override(s) {sorted(unknown)}; valid: {sorted(fields)}")
        ckpt = dict(
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            real_vocab_size=hf_config.vocab_size,
        )
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
        config = GPTConfig(**settings)

        hf = GPT2LMHeadModel.from_pretrained(name_or_dir, dtype=torch.float32)
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        model = cls(config)
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

    def export_hf(self, out_dir):
        """Write a transformers GPT2LMHeadModel directory (config.json + safetensors) holding this model's weights,
        with padding rows dropped so vocab_size is the real one. Load it back with GPT2LMHeadModel.from_pretrained."""
        from gpt2x.extras import import_extra

        transformers = import_extra("transformers", "hf", "export_hf")
        GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

        c = self.config
        hf_config = GPT2Config(
            vocab_size=c.real_vocab_size,
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
        sd = self.state_dict()
        with torch.no_grad():
            for k, dst in sd_hf.items():
                if k.endswith((".attn.bias", ".attn.masked_bias")):
                    continue
                src = sd[k].detach().to(device="cpu", dtype=dst.dtype)
                if k.endswith(_CONV1D_WEIGHTS):
                    src = src.t()
                if k in ("transformer.wte.weight", "lm_head.weight"):
                    src = src[: c.real_vocab_size]
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
