"""Autoregressive text generation from a GPT."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

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
    from gpt2x.speed.parallel import unwrap

    block_size = unwrap(model).config.block_size
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
    """`num_samples` continuations of `prompt` as text, reproducible for a seed (a generator of their own); each
    forward pass inside `autocast()`.

    An empty prompt samples unconditionally: generation starts from <|endoftext|>, as GPT-2's own unconditional
    samples were made, and that start token is not part of the returned text. A prompt may contain <|endoftext|>
    (a document boundary), which is encoded as the special token.
    """
    from gpt2x.data.tokenizer import EOT, gpt2_encoding

    enc = gpt2_encoding()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT]  # the model needs at least one token
    idx = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, idx, max_tokens, temperature=temperature, top_k=top_k, generator=gen, autocast=autocast)
    start = 0 if prompt else 1  # the EOT an empty prompt starts from was not written by the user
    return [enc.decode([t for t in row[start:].tolist() if t < enc.n_vocab]) for row in out]  # padding has no text


def sampling_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to sample in: `auto` is bfloat16 on a GPU with bfloat16 units, else float32."""
    if name not in SAMPLE_DTYPES:
        raise ValueError(f"--dtype {name!r} is not supported; valid: {', '.join(SAMPLE_DTYPES)}")
    if name == "auto":
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float32
    return getattr(torch, name)


def sampling_attention(trained: str, device: torch.device, dtype: torch.dtype, head_dim: int = 64, window=None) -> str:
    """The trained attention kernel if it runs on (device, dtype), else sdpa (PyTorch picks a backend that does).

    The kernel is not part of the weights: a model trained with attention=flash under bf16 samples just as well with
    sdpa in fp32, where flash has no CUDA kernel, and one trained with attention=flex on a GPU samples on a CPU with
    sdpa's band mask (`window`: the model's smallest sliding window, None for none).
    """
    from gpt2x.model.attention import check_attention

    try:
        check_attention(trained, device, dtype, head_dim, window)
        return trained
    except ValueError as e:
        log.info("sampling with attention=sdpa instead of the trained %s: %s", trained, e)
        return "sdpa"


def load_model(checkpoint_path: str | None, pretrained: str | None, device: str = "cpu", dtype=torch.float32):
    """A GPT from a gpt2x training checkpoint or from transformers GPT-2 weights (hub name or local dir), with an
    attention kernel that runs on `device` in `dtype`."""
    from gpt2x.config import ModelConfig
    from gpt2x.model.components import smallest_window
    from gpt2x.model.gpt import GPT
    from gpt2x.model.hf import from_pretrained
    from gpt2x.run import checkpoint

    if bool(checkpoint_path) == bool(pretrained):
        raise ValueError("give exactly one of --checkpoint PATH or --pretrained NAME_OR_DIR")
    device = torch.device(device)
    if pretrained:
        model = from_pretrained(pretrained)  # attention=sdpa: runs everywhere
    else:
        state = checkpoint.load(checkpoint_path)
        m = {k: v for k, v in state["config"]["model"].items() if k != "fused_ce"}  # older checkpoints had fused_ce
        trained = state["config"]["attention"]["name"]
        config = ModelConfig(**m)
        attention = sampling_attention(trained, device, dtype, m["n_embd"] // m["n_head"], smallest_window(config))
        model = GPT(config, attention)
        model.load_state_dict(state["model"])
    return model.to(device).eval()


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns a ValueError into "invalid _positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


_positive_int.__name__ = "int"  # argparse names the type in its "invalid int value" message


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {value}")
    return value


_non_negative_float.__name__ = "float"


def device_problem(name: str) -> str | None:
    """Why `--device name` cannot run here, or None if it can."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{name!r} is not a device; use cpu, cuda, cuda:N or mps"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name}: CUDA is not available here; use --device cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return f"{name}: MPS is not available here; use --device cpu"
    elif device.type not in ("cpu", "cuda", "mps"):
        return f"{name}: gpt2x-sample runs on cpu, cuda or mps"
    return None


def checkpoint_problem(path: str) -> str | None:
    """Why `--checkpoint path` is not a checkpoint file, or None if it is one (its content is checked on load)."""
    from gpt2x.run import checkpoint

    p = Path(path)
    if p.is_dir():
        found = checkpoint.list_checkpoints(p) or checkpoint.list_checkpoints(p / "checkpoints")
        hint = f", e.g. {found[-1][1]} (the newest there)" if found else " (<run_dir>/checkpoints/step_NNNNNN.pt)"
        return f"{path} is a directory; give a checkpoint file{hint}"
    if not p.exists():
        return f"{path} does not exist; give a checkpoint file (<run_dir>/checkpoints/step_NNNNNN.pt)"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of gpt2x-sample."""
    p = argparse.ArgumentParser(prog="gpt2x-sample", description=main.__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a gpt2x checkpoint (<run_dir>/checkpoints/step_NNNNNN.pt)")
    src.add_argument("--pretrained", help="transformers GPT-2: hub name (gpt2, gpt2-medium, ...) or local directory")
    p.add_argument("--prompt", default="Hello, I'm a language model,",
                   help="text to continue; '' samples unconditionally from <|endoftext|>")  # fmt: skip
    p.add_argument("--num-samples", type=_positive_int, default=4)
    p.add_argument("--max-tokens", type=_positive_int, default=32, help="new tokens per sample")
    p.add_argument("--top-k", type=_positive_int, default=50, help="sample from the k likeliest tokens")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    dtype_help = "autocast dtype of the forward passes; auto = bfloat16 on a GPU that has it, else float32"
    p.add_argument("--dtype", default="auto", choices=SAMPLE_DTYPES, help=dtype_help)
    return p


def main(argv: list[str] | None = None) -> int:
    """gpt2x-sample: print continuations of a prompt from a checkpoint or pretrained GPT-2 weights."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Checked before the model is loaded, so a typo costs nothing; argparse's error format and exit status 2.
    if problem := device_problem(args.device):
        parser.error(f"argument --device: {problem}")
    if args.checkpoint and (problem := checkpoint_problem(args.checkpoint)):
        parser.error(f"argument --checkpoint: {problem}")

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
