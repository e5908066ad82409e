"""gpt2x's Hydra configs, installed as the package `gpt2x.conf` (pyproject.toml maps it to this folder)."""
