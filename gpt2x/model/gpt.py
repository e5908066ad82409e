"""GPT-2 as in nanoGPT / build-nanogpt, with GPT-2's own module names so official weights load by copy and transpose.

The architecture choices of the model group (position, norm, activation, ...; gpt2x/model/components.py) default to
GPT-2; with all of them at their defaults this is exactly GPT-2, parameter for parameter and op for op.
"""

import torch
import torch.nn as nn

from gpt2x.config import ModelConfig
from gpt2x.data.tokenizer import N_VOCAB
from gpt2x.model.attention import ATTENTION_KERNELS
from gpt2x.model.components import (
    ACTIVATIONS,
    INITS,
    NORMS,
    POSITIONS,
    apply_rotary,
    layer_windows,
    value_embed_table,
)
from gpt2x.model.loss import LOSSES


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention: str, layer: int = 0):
        super().__init__()
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_OUTPUT = 1  # output of a residual branch: see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_fn = ATTENTION_KERNELS[attention]
        self.window = layer_windows(config)[layer]  # None: full causal
        hs = config.n_embd // config.n_head
        # QK-norm (the speedrun, after Dehghani et al. 2023): unit-scale q and k keep the attention logits bounded
        self.q_norm = NORMS[config.norm](hs, config.norm_gain) if config.qk_norm else None
        self.k_norm = NORMS[config.norm](hs, config.norm_gain) if config.qk_norm else None
        # value embeddings: v = lambdas[0] * v + lambdas[1] * ve, both 0.5 at init as in modded-nanogpt
        has_ve = value_embed_table(config, layer) is not None
        self.ve_lambdas = nn.Parameter(torch.tensor([0.5, 0.5])) if has_ve else None

    def forward(self, x, rope=None, ve=None):
        """x (B, T, C); rope: rotary (cos, sin) or None; ve (B, T, C): this layer's value embedding, or None."""
        B, T, C = x.size()  # batch, sequence length, n_embd
        qkv = self.c_attn(x)
        q, k, v = qkv.split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        # the choices below compute in fp32 where their inputs are (norms on CUDA under autocast, the fp32 rotary
        # angles and value embeddings); the kernel needs q, k, v in one dtype, the one autocast gave the projection
        if ve is not None:
            ve = ve.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
            v = (self.ve_lambdas[0] * v + self.ve_lambdas[1] * ve).to(qkv.dtype)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(qkv.dtype), self.k_norm(k).to(qkv.dtype)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = self.attn_fn(q, k, v, self.window)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.act = ACTIVATIONS[config.activation]()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_OUTPUT = 1

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: str, layer: int = 0):
        super().__init__()
        self.ln_1 = NORMS[config.norm](config.n_embd, config.norm_gain)
        self.attn = CausalSelfAttention(config, attention, layer)
        self.ln_2 = NORMS[config.norm](config.n_embd, config.norm_gain)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, ve=None):
        # pre-LN: the residual stream itself is never normalized, only what each branch reads from it
        x = x + self.attn(self.ln_1(x), rope, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2. `config` is the model group's schema; `attention` and `loss` pick kernels (conf/attention, conf/loss).

    Rows of wte/lm_head from `real_vocab_size` on (model.vocab_size=50304 pads GPT-2's 50257) are padding: never a
    target, never predicted. The settings are checked once, by gpt2x.validate, before a model is built.
    """

    def __init__(self, config: ModelConfig, attention: str = "sdpa", loss: str = "plain", real_vocab_size=N_VOCAB):
        super().__init__()
        self.config = config
        self.attention, self.loss_name = attention, loss
        self.real_vocab_size = min(real_vocab_size, config.vocab_size)
        self.loss_fn = LOSSES[loss]
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            # GPT-2's learned position table, or rotary positions (no parameters): .embed() and .rotation()
            wpe=POSITIONS[config.position](config),
        )
        if config.value_embeds:
            # outside transformer.h: each table serves two blocks (value_embed_table), looked up once per forward
            tables = [nn.Embedding(config.vocab_size, config.n_embd) for _ in range(config.value_embeds)]
            modules["ve"] = nn.ModuleList(tables)
        modules["h"] = nn.ModuleList([Block(config, attention, layer) for layer in range(config.n_layer)])
        modules["ln_f"] = NORMS[config.norm](config.n_embd, config.norm_gain)
        self.transformer = nn.ModuleDict(modules)
        self.ve_tables = [value_embed_table(config, layer) for layer in range(config.n_layer)]  # table of each layer
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying as in GPT-2: the input embedding is the output classifier (saves 38M params at 124M)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for table in self.transformer.ve if config.value_embeds else []:
            # N(0, 1), PyTorch's default and the speedrun's: mixed into v unnormalized, a 0.02 table would start ~25x
            # smaller than v and take most of a short run to matter
            torch.nn.init.normal_(table.weight, mean=0.0, std=1.0)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            if hasattr(module, "RESIDUAL_OUTPUT"):
                INITS[self.config.init](module.weight, self.config.n_layer)  # model.init: scaled (GPT-2) or zeros
            else:
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Number of parameters (tied wte/lm_head counted once). With non_embedding, the tables that are only looked
        up are subtracted: the position embeddings, the value embeddings, and wte when untied; tied, the token
        embeddings stay counted because they are also the output layer (as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            lookups = [self.transformer.wpe] + list(self.transformer.ve if self.config.value_embeds else [])
            if not self.config.tie_embeddings:
                lookups.append(self.transformer.wte)
            n -= sum(p.numel() for table in lookups for p in table.parameters())
        return n

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) int64 token ids -> (logits (B, T, vocab_size), loss or None).

        Logits of padding tokens (>= real_vocab_size) are -inf, so they take no probability mass in the loss or in
        sampling. loss is the mean cross entropy against targets (B, T); targets equal to -100 are ignored. With
        return_logits=False (the training loop, which needs only the loss) or the fused loss and targets, logits is
        None: a compiled model then never writes the (B, T, vocab_size) logits out (~20% of a small model's step).
        """
        B, T = idx.size()
        x = self.transformer.wpe.embed(self.transformer.wte(idx))  # (B, T, C): + learned positions, or unchanged
        rope = self.transformer.wpe.rotation(T, idx.device)  # None, or rotary (cos, sin) for every layer
        ves = self.value_embeddings(idx)
        for block, ve in zip(self.transformer.h, ves, strict=True):
            x = block(x, rope, ve)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.logits(x), None
        return self.loss_fn(self, x, targets, return_logits)

    def value_embeddings(self, idx):
        """Each layer's value embedding (B, T, C) of the tokens idx, or None for layers without one."""
        if not self.config.value_embeds:
            return [None] * self.config.n_layer
        tables = [table(idx) for table in self.transformer.ve]  # each looked up once, used by two layers
        return [None if i is None else tables[i] for i in self.ve_tables]

    def logits(self, x):
        """The output layer: (B, T, C) hidden states -> (B, T, vocab_size) logits, padding columns at -inf."""
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:
            # tanh softcapping (Gemma 2, the speedrun): logits stay in (-c, c); in fp32, where the loss computes anyway
            c = self.config.logit_softcap
            logits = c * torch.tanh(logits.float() / c)
        if self.config.vocab_size > self.real_vocab_size:
            # In place on the few padding columns, and hidden from autograd: recorded, the write would cost the
            # backward a copy of the whole (B, T, V) gradient to zero those columns, which cross-entropy already leaves
            # at zero (softmax of -inf). Allowed because neither the matmul's backward nor the softcap's scaling by c
            # needs its output.
            with torch.no_grad():
                logits[..., self.real_vocab_size :] = float("-inf")
        return logits
