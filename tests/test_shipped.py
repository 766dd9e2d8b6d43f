"""The default model shipped in weights/: loads by memory map, is small, and meets its val loss."""
import numpy as np

import npgpt
from npgpt.assets import default_model_dir
from npgpt.evaluate import perplexity

from conftest import CORPUS, run_cli


def test_shipped_model_size_and_val_loss():
    d = default_model_dir()
    assert (d / "model.safetensors").stat().st_size <= 20 * 2**20
    model = npgpt.load(d)
    assert isinstance(model.flat, np.memmap)
    text = CORPUS.read_text()
    val = text[int(len(text) * 0.9):]  # the held-out 10% (the model never trained on it)
    r = perplexity(model, val[:20_000], stride=model.config.block_size)
    assert r["nll"] <= 1.70, r  # weights/shakespeare-char/README.md: 1.530 on the whole split


def test_generate_without_model_uses_shipped_default():
    r = run_cli("generate", "ROMEO:", "-n", "40", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > 40
