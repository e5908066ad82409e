"""Optional dependencies (pyproject's extras: hf, prepare, wandb), imported where a feature needs them."""

from __future__ import annotations

import importlib
from types import ModuleType


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, or fail naming the feature that needs it and the gpt2x extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the `{module}` package, which is optional: pip install 'gpt2x[{extra}]' "
            f"(in a clone: pip install -e '.[{extra}]')"
        ) from e
