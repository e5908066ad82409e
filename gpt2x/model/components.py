"""The model's choices beyond GPT-2 (issue 12), as `model.<field>` settings: one name -> code table per choice.

The table keys are the values a user writes (`model.norm=rmsnorm`); the defaults are GPT-2 as published, and with
every choice at its default the model is exactly GPT-2 (same parameters, same ops). The alternatives are the ones the
modded-nanogpt speedrun (KellerJordan/modded-nanogpt) uses. `check_model` is the one home of the rules on these
settings; gpt2x.validate calls it before a model is built, and the modules here trust that it ran.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# model.norm -> a builder (dim, gain) -> the normalization module. gain=False (model.norm_gain=false): no learned
# parameters at all (for layernorm neither gain nor bias), as the speedrun's parameter-free F.rms_norm.
NORMS = {
    "layernorm": lambda dim, gain: nn.LayerNorm(dim, elementwise_affine=gain),  # GPT-2: eps 1e-5, gain and bias
    # eps as GPT-2's LayerNorm, fixed rather than torch's dtype-dependent default (bf16's is 8e-3)
    "rmsnorm": lambda dim, gain: nn.RMSNorm(dim, eps=1e-5, elementwise_affine=gain),
}


class ReLU2(nn.Module):
    """relu(x)^2 (Primer, So et al. 2021), the speedrun's MLP activation: as cheap as relu, trains faster than GELU."""

    def forward(self, x):
        return F.relu(x).square()


# model.activation -> the MLP's activation module (no parameters)
ACTIVATIONS = {
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # GPT-2 was trained with the tanh approximation ("gelu_new")
    "relu2": ReLU2,
}


def init_gpt2_residual(weight, n_layer):
    # each block adds two residual branches; scaling their init keeps the residual stream's variance from growing
    # with depth (GPT-2 paper, sec. 2.3)
    nn.init.normal_(weight, mean=0.0, std=0.02 * (2 * n_layer) ** -0.5)


def init_zero(weight, n_layer):
    # the speedrun's: every block starts as the identity, and the first steps grow each branch from nothing
    nn.init.zeros_(weight)


# model.init -> how the output projections of the residual branches (attn.c_proj, mlp.c_proj) start; every other
# weight starts as GPT-2's (normal, std 0.02; biases zero)
INITS = {"gpt2": init_gpt2_residual, "zero_proj": init_zero}


class LearnedPositions(nn.Embedding):
    """GPT-2's positions: a learned vector per position, added to the token embedding. It sits at transformer.wpe,
    GPT-2's own name, so official weights load into it."""

    def __init__(self, config):
        super().__init__(config.block_size, config.n_embd)

    def embed(self, tok):
        """tok (B, T, C) token embeddings -> the block input (B, T, C)."""
        pos = torch.arange(0, tok.size(1), dtype=torch.long, device=tok.device)  # (T,)
        return tok + self(pos)

    def rotation(self, T, device):
        return None  # nothing rotates q and k


class RotaryPositions(nn.Module):
    """Rotary position embedding (RoPE, Su et al. 2021): no parameters, no wpe; every layer rotates each (even, odd)
    pair of q's and k's coordinates by an angle proportional to the position, so q.k depends on the positions' offset
    only. Pairs are split in halves (coordinate i with i + hs/2), the GPT-NeoX / Llama / transformers convention,
    not interleaved (2i with 2i+1, the RoFormer paper's); the two are a fixed permutation of q and k's coordinates."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.base = config.rope_base

    def embed(self, tok):
        return tok

    def rotation(self, T, device):
        """(cos, sin), each (T, hs/2): the angles pos * base^(-2i/hs) of every position and pair, in fp32."""
        # computed per call (T * hs/2 values) rather than kept as a buffer: nothing to save, move or broadcast
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        # an outer product by broadcasting, not a matmul, which autocast would run in bf16
        angles = torch.arange(T, device=device).float()[:, None] * inv_freq[None, :]  # (T, hs/2)
        return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate x (B, nh, T, hs) by the angles of `cos`, `sin` (T, hs/2); the result is in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each: pair i is (x1[i], x2[i])
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


# model.position -> the module at transformer.wpe: .embed(tok) adds what goes into the input, .rotation(T, device) is
# what rotates q and k in every layer (None: nothing)
POSITIONS = {"learned": LearnedPositions, "rope": RotaryPositions}

WINDOW_KINDS = "LS"  # the letters of model.window_pattern: L = model.window, S = model.short_window


def layer_windows(config) -> list[int | None]:
    """The attention window of each layer (None: full causal): window_pattern cycled over the layers."""
    if config.window is None:
        return [None] * config.n_layer
    short = config.window // 2 if config.short_window is None else config.short_window
    pattern = config.window_pattern
    return [config.window if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]


def smallest_window(config) -> int | None:
    """The narrowest sliding window of any layer (what an attention kernel must be able to mask), None for none."""
    return min((w for w in layer_windows(config) if w is not None), default=None)


def value_embed_table(config, layer: int) -> int | None:
    """Which value-embedding table layer `layer` mixes into its values (None: none). Table i serves layer i and layer
    n_layer - N + i (modded-nanogpt: the first and the last N layers, in the same order, like a U-Net's skips)."""
    n, L = config.value_embeds, config.n_layer
    if layer < n:
        return layer
    if layer >= L - n:
        return layer - (L - n)
    return None


def check_model(config) -> None:
    """Raise ValueError, naming the model.<field> settings and what would be valid, for architecture choices that
    cannot be built: unknown names, or combinations that do not fit together (no device or kernel involved)."""
    m = config
    if m.n_embd % m.n_head:
        raise ValueError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    for field, table in (("position", POSITIONS), ("norm", NORMS), ("activation", ACTIVATIONS), ("init", INITS)):
        if getattr(m, field) not in table:
            raise ValueError(f"model.{field}={getattr(m, field)} is unknown; valid: {', '.join(table)}")
    head_dim = m.n_embd // m.n_head
    if m.position == "rope" and head_dim % 2:
        raise ValueError(
            f"model.position=rope rotates pairs of coordinates, so it needs an even head dim; model.n_embd={m.n_embd} "
            f"/ model.n_head={m.n_head} = {head_dim}; change n_embd or n_head, or use model.position=learned"
        )
    if m.position == "rope" and not m.rope_base > 0:
        raise ValueError(f"model.rope_base={m.rope_base} must be positive (10000 as RoFormer and Llama)")
    if m.logit_softcap is not None and not m.logit_softcap > 0:
        raise ValueError(f"model.logit_softcap={m.logit_softcap} must be positive (the speedrun uses 15 or 30) or null")
    _check_windows(m)
    if m.value_embeds < 0 or 2 * m.value_embeds > m.n_layer:
        raise ValueError(
            f"model.value_embeds={m.value_embeds}: each table serves one of the first and one of the last layers, so "
            f"it needs 0 <= 2 * value_embeds <= model.n_layer={m.n_layer}; use at most {m.n_layer // 2}"
        )


def _check_windows(m) -> None:
    pattern = m.window_pattern
    if not pattern or set(pattern) - set(WINDOW_KINDS):
        raise ValueError(
            f"model.window_pattern={pattern!r} must be a non-empty string of L (model.window) and S "
            f"(model.short_window) letters, cycled over the layers, e.g. L or SSSL"
        )
    if m.window is None:
        if "S" in pattern:
            raise ValueError(
                f"model.window_pattern={pattern} has S (short-window) layers, which need model.window; set "
                "model.window (tokens each query sees) or use model.window_pattern=L (null window: full causal)"
            )
        if m.short_window is not None:
            raise ValueError(f"model.short_window={m.short_window} needs model.window (null: full causal); set both")
        return
    if m.window < 1:
        raise ValueError(f"model.window={m.window} must be at least 1 (a token sees itself), or null for full causal")
    if m.short_window is not None and m.short_window < 1:
        raise ValueError(f"model.short_window={m.short_window} must be at least 1, or null for model.window // 2")
    if "S" in pattern and m.short_window is None and m.window // 2 < 1:
        raise ValueError(
            f"model.window={m.window} leaves the S layers of model.window_pattern={pattern} a window of "
            f"{m.window} // 2 = 0 (model.short_window=null); set model.short_window >= 1"
        )
