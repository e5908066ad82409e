"""Autoregressive text generation from a GPT."""

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None):
    """Extend idx (B, T) int64 by max_new_tokens sampled tokens and return the (B, T + max_new_tokens) result.

    Each step feeds the last block_size tokens, keeps the top_k logits (None or 0: all), divides by temperature and
    samples with `generator` (a torch.Generator on idx's device, for reproducible samples). temperature=0 is greedy
    argmax. The model runs in eval mode and is put back in the train/eval mode it had. Works on a plain GPT, a
    torch.compile'd one or a DDP/FSDP wrapper (the config is found on `.module`).
    """
    block_size = _unwrap(model).config.block_size
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            logits, _ = model(idx_cond)
            logits = logits[:, -1, :].float()  # (B, vocab_size)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = float("-inf")
                probs = F.softmax(logits, dim=-1)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
    finally:
        model.train(was_training)
    return idx


def _unwrap(model):
    # torch.compile's wrapper forwards attribute access; DDP/FSDP wrappers keep the model in .module
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model
