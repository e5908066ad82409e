"""Causal self-attention kernels, one function per `attention=<name>` option.

Every kernel takes q, k, v of shape (B, nh, T, hs) and returns y of the same shape, with a causal mask (token t attends
to tokens <= t), or given `window` a sliding-window one (token t attends to t-window+1..t: model.window). The table
`ATTENTION_KERNELS` maps the config name to the function; a new kernel is one function, one entry here and one
`conf/attention/<name>.yaml`. `check_attention` tells before training whether a kernel can run on a given device and
dtype, so a restricted SDPA backend fails loudly at startup instead of mid-run (it never silently falls back).

What torch 2.13 (CPU build) actually supports, found by running each backend on CPU for float32/bfloat16/float16/float64
and head sizes 16, 64, 65, forward and backward:
- FLASH_ATTENTION runs on CPU (PyTorch ships a CPU flash-attention kernel) for all four dtypes, so attention=flash is
  allowed on CPU. On CUDA PyTorch's flash kernel (FlashAttention-2) needs float16/bfloat16 and a recent GPU (sm80+).
- EFFICIENT_ATTENTION (memory-efficient, xformers-style) is CUDA-only: on CPU SDPA raises "No viable backend".
- MATH runs everywhere; it is the reference composite implementation.
- FlexAttention (attention=flex) runs forward only on CPU ("FlexAttention does not support backward on CPU"), so it is
  a CUDA-only choice for training.

A sliding window is a band mask: SDPA takes it as attn_mask (math and efficient backends, and the CPU flash kernel; the
CUDA flash kernel takes no mask, so attention=flash refuses a window on CUDA rather than fall back to another
backend), manual applies it itself, flex skips the blocks outside the band.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def band_mask(T, window, device):
    """(T, T) bools, True where query i may attend to key j: j <= i and i - j < window (the last `window` tokens)."""
    pos = torch.arange(T, device=device)
    offset = pos[:, None] - pos[None, :]  # (T, T): query position minus key position
    return (offset >= 0) & (offset < window)


def manual_attention(q, k, v, window=None):
    """Textbook attention: softmax(q k^T / sqrt(hs) + causal mask) v, materializing the (T, T) matrix.

    The "before" of the optimization ladder. Under autocast the matmuls and the softmax run in whatever dtype autocast
    picks for them; nothing here upcasts on its own.
    """
    T, hs = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    # built per call (cheap, T*T bools) rather than a (block_size, block_size) buffer, so the kernel is a pure function
    if window is None:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = band_mask(T, window, q.device)
    att = att.masked_fill(~allowed, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v  # (B, nh, T, hs)


def _sdpa(q, k, v, window):
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(q.size(-2), window, q.device))


def sdpa_attention(q, k, v, window=None):
    """F.scaled_dot_product_attention with PyTorch choosing the fastest available backend (one that takes a mask when
    there is a window)."""
    return _sdpa(q, k, v, window)


def _restricted_sdpa(backend):
    """SDPA allowed to use only `backend`: if that backend cannot run the inputs, PyTorch raises instead of falling
    back, so a benchmark labelled attention=flash really measured flash."""

    def attention(q, k, v, window=None):
        with sdpa_kernel(backend):
            return _sdpa(q, k, v, window)

    return attention


flash_attention = _restricted_sdpa(SDPBackend.FLASH_ATTENTION)
flash_attention.__doc__ = "SDPA restricted to the FlashAttention backend (CUDA fp16/bf16 on sm80+, or the CPU kernel)."
efficient_attention = _restricted_sdpa(SDPBackend.EFFICIENT_ATTENTION)
efficient_attention.__doc__ = "SDPA restricted to the memory-efficient backend (CUDA only)."
math_attention = _restricted_sdpa(SDPBackend.MATH)
math_attention.__doc__ = "SDPA restricted to the MATH backend: PyTorch's composite reference implementation."


@functools.lru_cache(maxsize=32)  # one mask per (length, window, device): building it scans every block pair
def _flex_block_mask(T, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(causal if window is None else sliding, None, None, T, T, device=device)


@functools.cache
def _compiled_flex():
    # FlexAttention is fast only compiled (eager runs an unfused reference); inside a compiled model this inlines
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, window=None):
    """FlexAttention (torch.nn.attention.flex_attention) with a causal or sliding-window block mask: blocks of
    128 x 128 scores outside the band are skipped, not computed and masked, so a window saves work (the speedrun's
    kernel). CUDA only for training; on CPU it runs forward only, unfused."""
    block_mask = _flex_block_mask(q.size(-2), window, q.device)
    if q.device.type == "cpu" or not torch.is_grad_enabled():
        # unfused: on CPU (forward only), and without gradients, i.e. sampling, whose length grows every call and
        # would recompile the kernel each time (inside a compiled model, inductor fuses this call all the same)
        from torch.nn.attention.flex_attention import flex_attention as eager_flex

        return eager_flex(q, k, v, block_mask=block_mask)  # (B, nh, T, hs)
    return _compiled_flex()(q, k, v, block_mask=block_mask)  # (B, nh, T, hs)


ATTENTION_KERNELS = {
    "manual": manual_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "efficient": efficient_attention,
    "math": math_attention,
    "flex": flex_attention,
}

_DTYPE_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def get_attention(name):
    """Return the kernel called `name`, or raise ValueError listing the valid names."""
    if name not in ATTENTION_KERNELS:
        valid = ", ".join(ATTENTION_KERNELS)
        raise ValueError(f"attention={name} is not a known attention kernel; valid choices: {valid}")
    return ATTENTION_KERNELS[name]


def _as_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        resolved = _DTYPE_ALIASES.get(dtype, getattr(torch, dtype, None))
        if isinstance(resolved, torch.dtype):
            return resolved
    raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. float32, bfloat16, float16 (or fp32, bf16, fp16)")


def check_attention(name, device, dtype, head_dim=None, window=None):
    """Raise ValueError, naming `attention=<name>` and the reason, if that kernel cannot run on (device, dtype).

    `dtype` is the dtype q, k, v will have (the autocast dtype under mixed precision); `head_dim` defaults to 64
    (GPT-2's n_embd / n_head); `window` is the model's smallest sliding window (None: every layer full causal).
    Known limits get a hand-written message; anything else is found by running the kernel forward and backward on
    tiny tensors, which also catches limits of the particular GPU (flash on a pre-Ampere card).
    """
    kernel = get_attention(name)
    device = torch.device(device)
    dtype = _as_dtype(dtype)
    hs = 64 if head_dim is None else int(head_dim)
    alternatives = "use attention=sdpa (PyTorch picks a backend) or attention=manual"
    if name == "flash" and device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"attention=flash is not available on cuda with {dtype}: PyTorch's FlashAttention kernel needs float16 or "
            f"bfloat16 inputs; use precision=bf16 (or fp16), attention=sdpa (PyTorch picks a backend) or "
            f"attention=manual"
        )
    if name == "flash" and device.type == "cuda" and hs > 256:
        raise ValueError(f"attention=flash supports head_dim <= 256 (got {hs}); {alternatives}")
    if name == "efficient" and device.type != "cuda":
        raise ValueError(
            f"attention=efficient is not available on {device.type}: PyTorch's memory-efficient SDPA kernel is "
            f"CUDA-only; {alternatives}"
        )
    if name == "flash" and device.type == "cuda" and window is not None:
        raise ValueError(
            f"attention=flash cannot apply model.window={window} on cuda: SDPA's CUDA flash backend takes no attention "
            f"mask, only is_causal; use attention=flex (skips the blocks outside the window), or attention=sdpa, "
            f"efficient, math or manual (a band mask)"
        )
    if name == "flex" and device.type != "cuda":
        raise ValueError(
            f"attention=flex is CUDA-only for training: torch {torch.__version__.split('+')[0]}'s FlexAttention has "
            f"no backward on {device.type}; use attention=sdpa (with model.window it takes a band mask) or "
            f"attention=manual"
        )
    if device.type not in ("cpu", "cuda") and name in ("flash", "efficient"):
        raise ValueError(f"attention={name} is only implemented for cpu/cuda, not {device.type}; {alternatives}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} is not available (torch.cuda.is_available() is False); use device=cpu")

    # probe: run the real kernel once on tiny inputs; restricted SDPA backends raise rather than fall back
    try:
        with warnings.catch_warnings(record=True) as caught, torch.enable_grad():
            warnings.simplefilter("always")
            q, k, v = (torch.randn(1, 1, 8, hs, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            kernel(q, k, v, window).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure here means the kernel cannot run; report why
        reasons = "; ".join(str(w.message).strip() for w in caught)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"attention={name} is not available on {device} with {dtype} (head_dim={hs}"
            + (f", model.window={window}" if window is not None else "")
            + f"): {detail}"
            + (f" [{reasons}]" if reasons else "")
            + f"; {alternatives}"
        ) from e
