"""Where the shipped assets live: the `weights/` folder, installed as the package `npgpt_weights`."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "shakespeare-char"


def weights_dir() -> Path:
    try:
        import npgpt_weights
        return Path(npgpt_weights.__file__).resolve().parent
    except ImportError:  # running from a source checkout without installing
        return Path(__file__).resolve().parent.parent / "weights"


def default_model_dir() -> Path:
    """The small Shakespeare model that `npgpt generate` uses when --model is omitted."""
    return weights_dir() / DEFAULT_MODEL
