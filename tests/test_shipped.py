"""The models shipped in weights/: load by memory map, are small, and meet their val loss."""
from pathlib import Path

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


IMDB = Path(__file__).resolve().parent.parent / "weights" / "imdb-reviews"
# written for this test: the shipped LM never saw it
REVIEW = ("I watched this movie last night with my brother. The acting was terrible and the plot made no sense, "
          "but the music was great and the ending surprised me. I would not recommend it to anyone who wants a "
          "good story. 4/10")


def test_shipped_review_lm_knows_reviews():
    """weights/imdb-reviews (GPT-1's starting point): memory-mapped, within 40 MB, and a review it never
    saw scores far below a uniform guess (log 8192 = 9.0 nats per token)."""
    assert (IMDB / "model.safetensors").stat().st_size <= 40 * 2**20
    model = npgpt.load(IMDB)
    assert isinstance(model.flat, np.memmap)
    r = perplexity(model, REVIEW)
    assert r["nll"] <= 3.0, r  # 2.48 shipped (3.01 at step 2,000 of 6,000); common words in a jumble: 6.7
