"""The training loss without the (B, T, vocab) logits: output layer and cross-entropy fused, a chunk of tokens at once.

At GPT-2 sizes the output layer is the largest matmul, and its logits the largest activation: B*T*50304 floats (3.3 GB
in fp32 for B=16, T=1024), written by the forward, kept for the backward and re-read by it. `linear_cross_entropy`
computes, chunk by chunk, the logits, the loss and the loss's gradients with respect to the hidden states and the
output weight, and keeps only those gradients (the size of the inputs), so no more than one chunk of logits ever
exists. Same arithmetic as `F.cross_entropy(x @ W.T, y)` (the softmax in fp32), one softmax pass instead of two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets equal to this are skipped, as in F.cross_entropy


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE(x @ weight.T, targets), gradients computed in the forward pass one chunk of tokens at a time.

    Written without in-place ops so that torch.compile can fuse each chunk's softmax, loss and gradient of the logits
    into a few passes; the matmuls run in whatever dtype autocast gives them, the softmax always in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, n_valid: int, chunk_size: int, softcap: float | None = None):
        # x (N, C) hidden states, weight (V, C) output layer, targets (N,); columns >= n_valid are vocab padding;
        # softcap c: the logits are c * tanh(logits / c) (model.logit_softcap)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        cols = torch.arange(weight.size(0), device=x.device)  # (V,)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x, grad_w = [], None
        for start in range(0, x.size(0), chunk_size):
            xc, tc = x[start : start + chunk_size], targets[start : start + chunk_size]
            logits = xc @ weight.t()  # (n, V): the only logits that exist at any time
            mm_dtype = logits.dtype  # what autocast runs the matmuls in
            logits = logits.float()
            if softcap is not None:
                capped = torch.tanh(logits / softcap)  # (n, V), finite even in the padding columns
                logits = softcap * capped
            logits = logits.masked_fill(cols >= n_valid, float("-inf"))  # padding rows are never predicted
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
            valid = (tc != IGNORE_INDEX).unsqueeze(1)  # (n, 1)
            target = cols == tc.unsqueeze(1)  # (n, V) one-hot, as a comparison the compiler can fuse
            total = total + torch.where(valid & target, lse - logits, 0.0).sum()
            if need_grad:
                # d(sum of CE)/d logits = softmax - one_hot(target), zero for ignored tokens
                grad_logits = torch.where(valid, torch.exp(logits - lse) - target.float(), 0.0)  # (n, V) fp32
                if softcap is not None:
                    grad_logits = grad_logits * (1.0 - capped * capped)  # chain rule: d(c tanh(z/c))/dz = 1 - tanh^2
                gx, gw = _logit_grad_matmuls(grad_logits, weight, xc, mm_dtype)
                grad_x.append(gx.to(x.dtype))  # (n, C)
                grad_w = gw if grad_w is None else grad_w + gw  # (V, C), summed over chunks in fp32
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        if need_grad:
            ctx.save_for_backward(torch.cat(grad_x) / count, (grad_w / count).to(weight.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None


def _logit_grad_matmuls(grad_logits, weight, xc, mm_dtype):
    """(grad_logits @ weight, grad_logits.T @ xc in fp32): the gradients of the hidden states and the output weight.

    Under bf16 the matmuls run in bf16 like the forward's. Under fp16 they run in fp32: these gradients are computed
    here, before GradScaler's scale reaches them (it arrives in backward, as grad_loss), and fp16's narrow range
    would flush the small softmax probabilities of most of the vocabulary (< 6e-8) to zero.
    """
    if mm_dtype != torch.float16:
        grad_logits = grad_logits.to(mm_dtype)
        return grad_logits @ weight, (grad_logits.t() @ xc).float()
    with torch.autocast(device_type=grad_logits.device.type, enabled=False):
        return grad_logits @ weight.float(), grad_logits.t() @ xc.float()


def linear_cross_entropy(x, weight, targets, n_valid: int | None = None, chunk_size: int = 4096, softcap=None):
    """Mean cross-entropy of the logits x @ weight.T against targets, never holding more than chunk_size rows of them.

    x (B, T, C) or (N, C), weight (V, C), targets with x's leading shape; logits of columns >= n_valid (vocab padding)
    are -inf, and targets equal to -100 are ignored. With softcap c the logits are first capped to c * tanh(logits / c).
    """
    x2 = x.reshape(-1, x.size(-1))
    n_valid = weight.size(0) if n_valid is None else n_valid
    return LinearCrossEntropy.apply(x2, weight, targets.reshape(-1), n_valid, chunk_size, softcap)


def plain_loss(model, x, targets, return_logits: bool):
    """The lecture's loss: logits from the output layer, then cross-entropy over them."""
    logits = model.logits(x)  # (B, T, vocab_size)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    return (logits if return_logits else None), loss


def fused_loss(model, x, targets, return_logits: bool):
    """Output layer and loss fused, a chunk of tokens at a time: no logits exist, so none are returned."""
    softcap = model.config.logit_softcap
    return None, linear_cross_entropy(x, model.lm_head.weight, targets, model.real_vocab_size, softcap=softcap)


# loss.name -> function(model, hidden states, targets, return_logits) -> (logits or None, loss)
LOSSES = {"plain": plain_loss, "fused": fused_loss}
