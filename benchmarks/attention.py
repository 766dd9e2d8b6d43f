"""Causal attention forward + backward at long contexts: time and peak extra memory, npgpt vs PyTorch's
scaled_dot_product_attention (is_causal=True), one GPT-2-sized layer (12 heads of 64), batch 1. Then
GPT-3's locally banded attention at T = 2048 (windows 256 and 128) against npgpt's dense attention
and against SDPA given the band as a boolean mask (what a PyTorch user writes).

Every figure is the median over rounds; in each round each side runs in a fresh process, one after the
other (in one process, OpenBLAS's and PyTorch's thread pools spin against each other on 2 cores, which
slowed both sides 3-10x when tried).

    python benchmarks/attention.py [--threads N] [--rounds R]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tracemalloc

import numpy as np

import npgpt
from npgpt.threads import thread_info
from npgpt import layers as L


def npgpt_fwd_bwd(q, k, v, dy, window=0):
    y, cache = L.attention_forward(q, k, v, window=window)
    return L.attention_backward(dy, q, k, v, cache)


def peak_extra(f, *args):
    """Peak memory NumPy allocates during one call (after a warm-up call, which also compiles)."""
    f(*args)
    tracemalloc.start()
    f(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def one_side(side: str, T: int, window: int, threads: int, reps: int = 3) -> dict:
    """In this process: {"seconds": median of reps fwd+bwd calls after a warm-up, "peak": extra bytes}."""
    rng = np.random.default_rng(T)
    q, k, v, dy = (rng.standard_normal((1, 12, T, 64), dtype=np.float32) for _ in range(4))
    if side == "npgpt":
        npgpt.set_threads(threads)
        f = lambda: npgpt_fwd_bwd(q, k, v, dy, window)  # noqa: E731
        peak = peak_extra(npgpt_fwd_bwd, q, k, v, dy, window)
    else:
        import torch
        torch.set_num_threads(threads)
        mask = None
        if window:
            i = torch.arange(T)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window + 1)
        f = lambda: torch_fwd_bwd(q, k, v, dy, mask)  # noqa: E731
        f()
        peak = 0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return {"seconds": float(np.median(times)), "peak": peak}


def fresh(side: str, T: int, window: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--T", str(T), "--window", str(window),
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--rounds", type=int, default=3, help="alternating fresh-process rounds (medians)")
    ap.add_argument("--side", choices=["npgpt", "torch"], help=argparse.SUPPRESS)  # one measurement, as JSON
    ap.add_argument("--T", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(one_side(args.side, args.T, args.window, args.threads)))
        return
    try:
        import torch
        sides = ["npgpt", "torch"]
        note = f"torch {torch.__version__}"
    except ImportError:
        sides, note = ["npgpt"], "torch not installed: no ratio"
    print(f"threads {args.threads} each side (set after every import); a fresh process per side, {args.rounds} "
          f"alternating rounds, medians; OpenBLAS {thread_info()['blas_kernels']} kernels; {note}",
          flush=True)
    figures = [(T, 0) for T in (256, 1024, 2048)] + [(2048, 256), (2048, 128)]
    got = {}
    for _ in range(args.rounds):
        for T, w in figures:
            for side in sides:
                got.setdefault((side, T, w), []).append(fresh(side, T, w, args.threads))
    med = {key: float(np.median([r["seconds"] for r in rs])) for key, rs in got.items()}
    peak = {key: rs[0]["peak"] for key, rs in got.items()}

    def vs_torch(T, w):
        return f"{med['torch', T, w] / med['npgpt', T, w]:.2f}x" if ("torch", T, w) in med else "n/a"

    for T in (256, 1024, 2048):
        t, tt = med["npgpt", T, 0], med.get(("torch", T, 0), 0.0)
        path = "tiled" if T > L.ATTN_TILE or 12 * T * T * 4 > L.ATTN_MATERIALIZE_BYTES else "materialised"
        print(f"attention fwd+bwd T={T:<5} npgpt {t * 1e3:8.1f} ms ({path}, peak extra "
              f"{peak['npgpt', T, 0] / 2**20:6.1f} MiB) | torch sdpa {tt * 1e3:8.1f} ms | ratio {vs_torch(T, 0)}")
    dense = med["npgpt", 2048, 0]
    for w in (256, 128):
        t, tt = med["npgpt", 2048, w], med.get(("torch", 2048, w), 0.0)
        print(f"banded attention T=2048 w={w:<4} npgpt {t * 1e3:8.1f} ms (peak extra {peak['npgpt', 2048, w] / 2**20:5.1f}"
              f" MiB; dense {dense * 1e3:.1f} ms, {peak['npgpt', 2048, 0] / 2**20:.1f} MiB) | {dense / t:.2f}x npgpt "
              f"dense | torch sdpa + band mask {tt * 1e3:8.1f} ms | ratio {vs_torch(2048, w)}")


if __name__ == "__main__":
    main()
