"""Shared test set-up: offline libraries, a per-session cache, and fixtures (the helpers are in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers/wandb/datasets are imported anywhere: a hub miss otherwise retries for ~23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One CPU thread per process (this one, and the trainers and workers it starts) unless the shell says otherwise: the
# tiny ops here run faster on one, and on a machine shared with other jobs two spinning OpenMP threads per process
# made a 60-step training test 4x slower (12 s vs 3 s) and greedy generation 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def gpt2x_cache(tmp_path_factory) -> Path:
    """One cache (tokenized corpora, inductor kernels, CPU peak probe) for the session, never the user's."""
    cache = tmp_path_factory.mktemp("gpt2x-cache")
    os.environ["GPT2X_CACHE_DIR"] = str(cache)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache / "tiktoken")
    return cache


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random transformers GPT-2 (real 50257-token vocabulary) saved with save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        # move every parameter off its init (biases 0, LayerNorm 1) so a wrongly copied or untransposed one shows up
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return path



def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: where torch sees none they are skipped, and the skip says why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; torch {torch.__version__} sees none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
