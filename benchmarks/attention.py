"""Causal attention forward + backward at long contexts: time and peak extra memory, npgpt vs PyTorch's
scaled_dot_product_attention (is_causal=True), one GPT-2-sized layer (12 heads of 64), batch 1. Then
GPT-3's locally banded attention at T = 2048 (windows 256 and 128) against npgpt's dense attention
and against SDPA given the band as a boolean mask (what a PyTorch user writes).

    python benchmarks/attention.py [--threads N]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

import npgpt
from npgpt import layers as L


def npgpt_fwd_bwd(q, k, v, dy, window=0):
    y, cache = L.attention_forward(q, k, v, window=window)
    return L.attention_backward(dy, q, k, v, cache)


def measure(f, *args, repeat=3):
    f(*args)  # warm up (and compile)
    tracemalloc.start()
    f(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    return min(times), peak


def torch_fwd_bwd(q, k, v, dy, mask=None):
    import torch
    import torch.nn.functional as F
    qt, kt, vt = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    if mask is None:
        y = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    y.backward(torch.from_numpy(dy))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    npgpt.set_threads(args.threads)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    H, D = 12, 64
    for T in (256, 1024, 2048):
        rng = np.random.default_rng(T)
        q, k, v, dy = (rng.standard_normal((1, H, T, D), dtype=np.float32) for _ in range(4))
        t, peak = measure(npgpt_fwd_bwd, q, k, v, dy)
        tt = measure(torch_fwd_bwd, q, k, v, dy)[0] if torch else None
        ratio = f"{tt / t:.2f}x" if tt else "n/a"
        path = "tiled" if T > L.ATTN_TILE or H * T * T * 4 > L.ATTN_MATERIALIZE_BYTES else "materialised"
        print(f"attention fwd+bwd T={T:<5} npgpt {t * 1e3:8.1f} ms ({path}, peak extra {peak / 2**20:6.1f} MiB) | "
              f"torch sdpa {tt * 1e3 if tt else 0:8.1f} ms | ratio {ratio}", flush=True)
    T = 2048
    rng = np.random.default_rng(T)
    q, k, v, dy = (rng.standard_normal((1, H, T, D), dtype=np.float32) for _ in range(4))
    dense, dense_peak = measure(npgpt_fwd_bwd, q, k, v, dy)
    for w in (256, 128):
        t, peak = measure(npgpt_fwd_bwd, q, k, v, dy, w)
        tt = None
        if torch:
            i = torch.arange(T)
            band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - w + 1)
            tt = measure(torch_fwd_bwd, q, k, v, dy, band)[0]
        vs_torch = f"{tt / t:.2f}x" if tt else "n/a"
        print(f"banded attention T={T} w={w:<4} npgpt {t * 1e3:8.1f} ms (peak extra {peak / 2**20:5.1f} MiB; dense "
              f"{dense * 1e3:.1f} ms, {dense_peak / 2**20:.1f} MiB) | {dense / t:.2f}x npgpt dense | torch sdpa "
              f"+ band mask {tt * 1e3 if tt else 0:8.1f} ms | ratio {vs_torch}", flush=True)


if __name__ == "__main__":
    main()
