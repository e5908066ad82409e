"""Autoregressive text generation from a GPT."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SAMPLE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=50, generator=None, autocast=contextlib.nullcontext):
    """Extend idx (B, T) int64 by max_new_tokens sampled tokens and return the (B, T + max_new_tokens) result.

    Each step feeds the last block_size tokens, keeps the top_k logits (None or 0: all), divides by temperature and
    samples with `generator` (a torch.Generator on idx's device, for reproducible samples). temperature=0 is greedy
    argmax. Each forward pass runs inside `autocast()` (the run's precision: a flash kernel has no fp32 on CUDA). The
    model runs in eval mode and is put back in the train/eval mode it had. Works on a plain GPT, a torch.compile'd
    one or a DDP/FSDP wrapper (the config is found on `.module`).
    """
    block_size = _unwrap(model).config.block_size
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            with autocast():
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


def sample_texts(
    model,
    prompt: str,
    num_samples: int,
    max_tokens: int,
    top_k: int = 50,
    temperature: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast=contextlib.nullcontext,
) -> list[str]:
    """`num_samples` continuations of `prompt` as text, reproducible for a seed (a generator of their own); each forward
    pass inside `autocast()`."""
    from gpt2x.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    idx = torch.tensor(enc.encode(prompt), dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_tokens, temperature=temperature, top_k=top_k, generator=gen, autocast=autocast)
    return [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in out]  # padding ids have no text


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to sample in: `auto` is bfloat16 on a GPU with bfloat16 units, else float32."""
    if name not in SAMPLE_DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; valid: {', '.join(SAMPLE_DTYPES)}")
    if name == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float32
    return getattr(torch, name)


def sampling_attention(trained: str, device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str:
    """The trained attention kernel if it runs on (device, dtype), else sdpa (PyTorch picks a backend that does).

    The kernel is not part of the weights: a model trained with attention=flash under bf16 samples just as well with
    sdpa in fp32, where flash has no CUDA kernel.
    """
    from gpt2x.attention import check_attention

    try:
        check_attention(trained, device, dtype, head_dim)
        return trained
    except ValueError as e:
        log.info("sampling with attention=sdpa instead of the trained %s: %s", trained, e)
        return "sdpa"


def load_model(checkpoint_path: str | None, pretrained: str | None, device: str = "cpu", dtype=torch.float32):
    """A GPT from a gpt2x training checkpoint or from transformers GPT-2 weights (hub name or local dir), with an
    attention kernel that runs on `device` in `dtype`."""
    from gpt2x import checkpoint
    from gpt2x.model import GPT, GPTConfig

    if bool(checkpoint_path) == bool(pretrained):
        raise ValueError("give exactly one of --checkpoint PATH or --pretrained NAME_OR_DIR")
    device = torch.device(device)
    if pretrained:
        model = GPT.from_pretrained(pretrained)  # attention=sdpa: runs everywhere
    else:
        state = checkpoint.load(checkpoint_path)
        m = state["config"]["model"]
        model = GPT(
            GPTConfig(
                block_size=m["block_size"],
                vocab_size=m["vocab_size"],
                n_layer=m["n_layer"],
                n_head=m["n_head"],
                n_embd=m["n_embd"],
                attention=sampling_attention(
                    state["config"]["attention"]["name"], device, dtype, m["n_embd"] // m["n_head"]
                ),
            )
        )
        model.load_state_dict(state["model"])
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> list[str]:
    """gpt2x-sample: print continuations of a prompt from a checkpoint or pretrained GPT-2 weights."""
    import argparse

    p = argparse.ArgumentParser(prog="gpt2x-sample", description=main.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gpt2x checkpoint (<run_dir>/checkpoints/step_NNNNNN.pt)")
    src.add_argument("--pretrained", help="transformers GPT-2: hub name (gpt2, gpt2-medium, ...) or local directory")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per sample")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    dtype_help = "autocast dtype of the forward passes; auto = bfloat16 on a GPU that has it, else float32"
    p.add_argument("--dtype", default="auto", choices=SAMPLE_DTYPES, help=dtype_help)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = sampling_dtype(args.dtype, device)
    model = load_model(args.checkpoint, args.pretrained, device, dtype)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    texts = sample_texts(model, args.prompt, args.num_samples, args.max_tokens, args.top_k, args.temperature,
                         args.seed, device, autocast)  # fmt: skip
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}", flush=True)
    return texts


def cli() -> None:
    """The gpt2x-sample command: exit status 0 on success (a console script would print main's list and exit 1)."""
    main()


if __name__ == "__main__":
    main()
