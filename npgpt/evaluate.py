"""Evaluation: perplexity with a sliding window (as the GPT-2 paper and transformers' docs evaluate).

Windows of the full context slide over the tokens `stride` at a time; each token is scored once, by
the window in which it is new, so with a stride shorter than the context every scored token (after the
first window) sees at least block_size - stride tokens of context.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import NpgptError
from .model import GPT


def sliding_windows(n_tokens: int, block: int, stride: int):
    """Yield (begin, end, first_scored): the window ids[begin:end] scores targets ids[j] for
    first_scored <= j < end (each j >= 1 exactly once over all windows)."""
    prev_end, begin = 0, 0
    while True:
        end = min(begin + block, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        if end == n_tokens:
            return
        prev_end, begin = end, begin + stride


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows with target >= 0 of -log softmax(logits)[target]; logits [N, V], targets [N]."""
    keep = targets >= 0
    z = logits[keep].astype(np.float64)
    mx = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - mx).sum(-1)) + mx[:, 0]
    return float((lse - z[np.arange(len(z)), targets[keep]]).sum())


def perplexity(model: GPT, text: str | None = None, ids=None, stride: int | None = None) -> dict:
    """Perplexity of `text` (or token `ids`) under `model`.

    Returns {"perplexity", "nll" (mean, nats per token), "bits_per_byte" (when text is given), "tokens"
    (number scored), "bytes", "stride", "context"}.
    """
    block = model.config.block_size
    stride = stride or block
    if not 0 < stride <= block:
        raise NpgptError(f"stride must be in 1..{block}, got {stride}")
    if ids is None:
        if model.tokenizer is None:
            raise NpgptError("this model has no tokenizer; pass token ids")
        ids = model.tokenizer.encode(text)
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2:
        raise NpgptError("need at least 2 tokens to measure perplexity")
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), block, stride):
        x = ids[begin:end - 1]
        targets = ids[begin + 1:end].copy()
        targets[: first - (begin + 1)] = -1  # already scored by an earlier window
        n = int((targets >= 0).sum())
        total += nll_sum(model.forward(x[None])[0], targets)
        count += n
    nll = total / count
    out = {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "stride": stride, "context": block}
    if text is not None:
        nbytes = len(text.encode("utf-8"))
        out.update(bytes=nbytes, bits_per_byte=total / math.log(2) / nbytes)
    return out
