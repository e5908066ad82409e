"""torch.compile (inductor kernel fusion) as a transform of a built model."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from gpt2x.config import CompileConfig

log = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes that also capture CUDA graphs on CUDA


def check_compile(cfg: CompileConfig, device: torch.device | None = None) -> None:
    """Fail before training on a mode torch.compile does not know, or a device whose code generator is missing.

    Inductor writes C++/OpenMP kernels on CPU (it needs a C++ compiler) and Triton kernels on CUDA (it needs triton);
    without them the first step would fail minutes into a run, after data preparation and model build.
    """
    if cfg.name == "none":
        return
    if cfg.mode not in COMPILE_MODES:
        raise ValueError(f"compile.mode={cfg.mode!r} is not a torch.compile mode; valid: {', '.join(COMPILE_MODES)}")
    if device is None:
        return
    if device.type == "cpu":
        candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
        if not any(shutil.which(c) for c in candidates):
            raise ValueError(
                f"compile={cfg.name} on cpu: inductor needs a C++ compiler for its CPU kernels and none of "
                f"{', '.join(candidates)} is on PATH; install g++ (or set CXX) or use compile=none"
            )
    elif device.type == "cuda":
        if cfg.mode in CUDA_GRAPH_MODES:
            log.warning(
                "compile=%s (mode=%s) captures CUDA graphs: under gradient accumulation and DDP's hooks they re-record "
                "or fail, so the timing may not be what it seems; use compile=max-autotune-no-cudagraphs for training",
                cfg.name, cfg.mode,
            )  # fmt: skip
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(
                f"compile={cfg.name} on cuda: inductor needs triton for its GPU kernels and it is not installed; "
                "pip install triton (it ships with the CUDA wheels of torch) or use compile=none"
            )


def _prepare_compile(cfg: CompileConfig) -> None:
    # A cache of our own: a warm cache turns 20-30 s of CPU compile time into a few seconds on the next run.
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
    # Runs of one Hydra multirun share this process, and dynamo's recompile budget is per code object (GPT.forward),
    # not per model: without a reset, after a few compiled runs (train + eval graph each) dynamo reaches
    # torch._dynamo.config.recompile_limit, falls back to eager with only a warning, and the run times the wrong thing.
    torch._dynamo.reset()


def apply_compile(model, cfg: CompileConfig):
    """Return the whole model (or a function) compiled as configured (or unchanged for compile=none).

    The caller keeps the eager module for sampling: generation grows the sequence one token at a time, and every new
    length would be a recompile. Training and validation share the compiled module (eval mode is one extra graph).
    """
    if cfg.name == "none":
        return model
    _prepare_compile(cfg)
    return torch.compile(model, mode=cfg.mode, fullgraph=cfg.fullgraph)


def compile_blocks(blocks: nn.ModuleList, cfg: CompileConfig) -> None:
    """Compile each transformer block in place (torchtitan's per-block compile, the form FSDP2 needs).

    All blocks have the same code and shapes, so dynamo compiles one graph and reuses it for every block.
    """
    if cfg.name == "none":
        return
    _prepare_compile(cfg)
    for block in blocks:
        block.compile(mode=cfg.mode, fullgraph=cfg.fullgraph)
