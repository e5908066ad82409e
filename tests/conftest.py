"""Shared test set-up: offline libraries, a per-session cache, and helpers to compose and run the real config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before transformers/wandb/datasets are imported anywhere: a hub miss otherwise retries for ~23 s.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Small and quick: a 2-layer model, short sequences, few steps, no periodic evals or samples until the end.
TINY = [
    "model=tiny",
    "data.batch_size=2",
    "data.seq_len=32",
    "optim.max_steps=3",
    "optim.warmup_steps=1",
    "eval_steps=1",
    "sample_max_tokens=4",
    "sample_count=1",
    "timing_warmup_steps=1",
]


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


@pytest.fixture
def tiny_shakespeare() -> Path:
    if not TINY_SHAKESPEARE.exists():
        pytest.skip(f"needs Tiny Shakespeare at {TINY_SHAKESPEARE} (the shared/ folder beside the clone)")
    return TINY_SHAKESPEARE


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The real composed config (conf/config.yaml) with command-line style overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gpt2x.config  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def run_train(run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Train in this process on the composed config and return the summary."""
    from gpt2x.train import train

    cfg = compose(TINY + (overrides or []))
    run_dir.mkdir(parents=True, exist_ok=True)
    return train(cfg, run_dir)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: where torch sees none they are skipped, and the skip says why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; torch {torch.__version__} sees none here")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
