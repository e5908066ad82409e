"""GPT-2 as in nanoGPT / build-nanogpt, with GPT-2's own module names so official weights load by copy and transpose."""

import torch
import torch.nn as nn

from gpt2x.config import ModelConfig
from gpt2x.data.tokenizer import N_VOCAB
from gpt2x.model.attention import ATTENTION_KERNELS
from gpt2x.model.loss import LOSSES


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, attention: str):
        super().__init__()
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1  # output of a residual branch: see GPT._init_weights
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_fn = ATTENTION_KERNELS[attention]

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
    def __init__(self, config: ModelConfig, attention: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-LN: the residual stream itself is never normalized, only what each branch reads from it
        x = x + self.attn(self.ln_1(x))
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
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)]),
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
        return_logits=False (the training loop, which needs only the loss) or the fused loss and targets, logits is
        None: a compiled model then never writes the (B, T, vocab_size) logits out (~20% of a small model's step).
        """
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.logits(x), None
        return self.loss_fn(self, x, targets, return_logits)

    def logits(self, x):
        """The output layer: (B, T, C) hidden states -> (B, T, vocab_size) logits, padding columns at -inf."""
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if self.config.vocab_size > self.real_vocab_size:
            # In place on the few padding columns, and hidden from autograd: recorded, the write would cost the
            # backward a copy of the whole (B, T, V) gradient to zero those columns, which cross-entropy already leaves
            # at zero (softmax of -inf). Allowed because the matmul's backward does not need its output.
            with torch.no_grad():
                logits[..., self.real_vocab_size :] = float("-inf")
        return logits
