"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seed, streaming.

With the cache each new token costs one position through the model, not the whole prefix. Once the
sequence fills the context, the window slides: the cache is rebuilt from the last block_size tokens, so
cached and uncached generation see exactly the same context and give the same tokens.
"""
from __future__ import annotations

import sys

import numpy as np

from .errors import NpgptError
from .model import GPT, KVCache


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """logits [B, V] -> next token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        # keep the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        cum = np.cumsum(sorted_p, axis=-1)
        drop_sorted = cum - sorted_p >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)


def generate(model: GPT, prompt, max_new_tokens: int = 100, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, num_samples: int = 1, use_cache: bool = True,
             on_token=None) -> np.ndarray:
    """Continue `prompt` (token ids [T] or [B, T], or a str if the model has a tokenizer).

    Returns ids [B, T' + max_new_tokens] (prompt included; a prompt longer than the context is cropped
    from the left to T' = block_size with a warning). `on_token(ids [B])` is called with every new token,
    for streaming. num_samples > 1 repeats a single prompt.
    """
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise NpgptError("this model has no tokenizer; pass token ids")
        prompt = model.tokenizer.encode(prompt)
    idx = np.asarray(prompt, dtype=np.int64)
    if idx.ndim == 1:
        idx = np.repeat(idx[None], num_samples, axis=0)
    if idx.shape[1] == 0:
        raise NpgptError("the prompt is empty; give at least one token")
    if temperature < 0:
        raise NpgptError(f"temperature must be >= 0, got {temperature}")
    block = model.config.block_size
    if idx.shape[1] > block:
        print(f"warning: prompt of {idx.shape[1]} tokens is longer than the context ({block}); "
              f"keeping the last {block}", file=sys.stderr)
        idx = idx[:, -block:]
    rng = np.random.default_rng(seed)
    B = idx.shape[0]
    out = np.empty((B, idx.shape[1] + max_new_tokens), np.int64)
    out[:, :idx.shape[1]] = idx
    n = idx.shape[1]
    cache = KVCache(model.config, B) if use_cache else None
    logits = _prefill(model, out[:, :n], cache)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, rng, temperature, top_k, top_p)
        out[:, n] = nxt
        n += 1
        if on_token is not None:
            on_token(nxt)
        if i == max_new_tokens - 1:
            break
        if cache is None or cache.length >= block:
            logits = _prefill(model, out[:, max(0, n - block):n], cache)  # slide the window
        else:
            logits = model.forward(out[:, n - 1:n], kv=cache)[:, -1]
    return out


def _prefill(model: GPT, idx, cache: KVCache | None):
    """Logits [B, V] of the last position of idx, (re)filling the cache from scratch."""
    if cache is not None:
        cache.length = 0
    return model.forward(idx, kv=cache, last_only=True)[:, -1]


def stream_text(model: GPT, out=None):
    """An on_token callback for `generate` that writes the decoded text of sample 0 to `out` (stdout) as
    it is produced, holding back while the tail is an incomplete multi-byte character."""
    out = out or sys.stdout
    tok = model.tokenizer
    seen: list[int] = []
    printed = [0]

    def on_token(nxt):
        seen.append(int(nxt[0]))
        text = tok.decode(seen)
        if text.endswith("\ufffd"):
            return
        out.write(text[printed[0]:])
        out.flush()
        printed[0] = len(text)

    return on_token
