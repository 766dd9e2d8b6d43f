"""GPT-3's alternating dense and banded layers ("BD", window 256) against all-dense ("D"), same weights:
training tokens/s at T = 2048 (the `small` shapes), and decoding at position ~2,000 (GPT-3 125M shapes,
random weights): tokens/s and the KV-cache bytes a token reads (a banded layer reads its window only).

    python benchmarks/banded.py [--threads 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

import npgpt
from npgpt.config import GPTConfig, preset
from npgpt.model import GPT, KVCache
from npgpt.optim import AdamW
from npgpt.params import decay_mask


def train_tok_s(cfg: GPTConfig, flat: np.ndarray, steps: int) -> float:
    m = GPT(cfg, flat.copy())
    opt = AdamW(m.flat, decay_mask(cfg))
    rng = np.random.default_rng(0)
    T = cfg.block_size
    x = rng.integers(0, cfg.vocab_size, (1, T + 1))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        m.zero_grad()
        m.loss(x[:, :-1], x[:, 1:], train=True, rng=rng)
        m.backward()
        opt.step(m.grad, 1e-4, 1.0)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return T / float(np.median(times))


def decode(cfg: GPTConfig, flat: np.ndarray, start: int, n: int) -> tuple[float, int]:
    """(tok/s decoding n tokens after a `start`-token prompt, KV bytes read per token at that position)."""
    m = GPT(cfg, flat)
    kv = KVCache(cfg, 1, length=start + n)
    m.forward(np.arange(start)[None] % cfg.vocab_size, kv=kv, last_only=True)
    t0 = time.perf_counter()
    for i in range(n):
        m.forward(np.array([[i]]), kv=kv, last_only=True)
    dt = time.perf_counter() - t0
    per_pos = 2 * cfg.n_head * cfg.head_dim * np.dtype(np.float32).itemsize  # a key and a value
    read = sum(min(start + n // 2, kv.windows[l] or start + n // 2) for l in range(cfg.n_layer)) * per_pos
    return n / dt, read


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--position", type=int, default=2000)
    args = ap.parse_args()
    npgpt.set_threads(args.threads)
    small = dataclasses.replace(preset("small"), block_size=2048, vocab_size=65, dropout=0.0)
    flat = GPT(small, seed=0).flat
    dense = train_tok_s(small, flat, args.steps)
    banded = train_tok_s(dataclasses.replace(small, attn_window=256, attn_pattern="BD"), flat, args.steps)
    print(f"train small T=2048 B=1, {args.threads} threads: BD w=256 {banded:8.0f} tok/s | D {dense:8.0f} tok/s | "
          f"ratio {banded / dense:.2f}x (goal >= 1.25x)", flush=True)
    g = preset("gpt3-125m")
    flat = GPT(dataclasses.replace(g, attn_pattern="D"), seed=0).flat
    d_tok, d_read = decode(dataclasses.replace(g, attn_pattern="D"), flat, args.position, 16)
    b_tok, b_read = decode(g, flat, args.position, 16)
    T, w = args.position + 8, g.attn_window
    print(f"decode GPT-3 125M shapes at position {args.position}: BD w={w} {b_tok:6.1f} tok/s, KV read "
          f"{b_read / 1e6:5.1f} MB/token | D {d_tok:6.1f} tok/s, {d_read / 1e6:5.1f} MB/token | KV read ratio "
          f"{b_read / d_read:.3f} (expected (T + w) / 2T = {(T + w) / (2 * T):.3f})", flush=True)


if __name__ == "__main__":
    main()
