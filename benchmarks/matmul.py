"""A tiled, parallel Numba matmul against NumPy's BLAS (sgemm/sgemv) on every GEMM shape the model
runs in training (baby, small) and decoding (GPT-2 124M). Prints GFLOP/s of both and the winner.

The kernel lives here, not in npgpt/: BLAS wins every shape measured (see benchmarks/README.md), and
a slower kernel is not kept in the hot path for its own sake.

    python benchmarks/matmul.py [--threads N]
"""
from __future__ import annotations

import argparse
import time

import numba as nb
import numpy as np

import npgpt

TILE_M, TILE_N, TILE_K = 64, 256, 128


@nb.njit(cache=True, parallel=True, error_model="numpy", fastmath={"reassoc", "contract"})
def numba_matmul(a, b, out):
    """out [M, N] = a [M, K] @ b [K, N]: tiles of out in parallel; inside a tile, rank-1 updates over
    K-blocks so that b's rows stream contiguously and the accumulator row stays in cache."""
    M, K = a.shape
    N = b.shape[1]
    n_mt = (M + TILE_M - 1) // TILE_M
    n_nt = (N + TILE_N - 1) // TILE_N
    for t in nb.prange(n_mt * n_nt):
        m0 = (t // n_nt) * TILE_M
        n0 = (t % n_nt) * TILE_N
        m1 = min(M, m0 + TILE_M)
        n1 = min(N, n0 + TILE_N)
        acc = np.zeros((m1 - m0, n1 - n0), np.float32)
        for k0 in range(0, K, TILE_K):
            k1 = min(K, k0 + TILE_K)
            for i in range(m1 - m0):
                row = acc[i]
                for k in range(k0, k1):
                    aik = a[m0 + i, k]
                    brow = b[k, n0:n1]
                    for j in range(n1 - n0):
                        row[j] += aik * brow[j]
        out[m0:m1, n0:n1] = acc


def shapes():
    """(label, M, K, N) of every product: forward x @ W, backward dX = dY @ W^T and dW = X^T @ dY."""
    out = []
    for name, C, T, B, V in (("baby", 128, 64, 12, 65), ("small", 384, 256, 8, 65)):
        N = B * T
        for w, (i, o) in (("c_attn", (C, 3 * C)), ("attn.c_proj", (C, C)), ("c_fc", (C, 4 * C)),
                          ("mlp.c_proj", (4 * C, C)), ("head", (C, V))):
            out += [(f"{name} {w} fwd", N, i, o), (f"{name} {w} dX", N, o, i), (f"{name} {w} dW", i, N, o)]
    for w, (i, o) in (("c_attn", (768, 2304)), ("attn.c_proj", (768, 768)), ("c_fc", (768, 3072)),
                      ("mlp.c_proj", (3072, 768)), ("head", (768, 50257))):
        out.append((f"decode 124M {w}", 1, i, o))
        out.append((f"prefill 512 124M {w}", 512, i, o))
    return out


def gflops(f, flops, min_time=0.2):
    f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        f()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    npgpt.set_threads(args.threads)
    nb.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'shape':<30} {'M x K x N':>20} {'BLAS GF/s':>10} {'Numba GF/s':>11}  faster")
    for label, M, K, N in shapes():
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        blas = gflops(lambda: np.matmul(a, b, out=out), 2 * M * K * N)
        nmb = gflops(lambda: numba_matmul(a, b, out), 2 * M * K * N)
        print(f"{label:<30} {f'{M}x{K}x{N}':>20} {blas:10.1f} {nmb:11.1f}  {'BLAS' if blas >= nmb else 'Numba'}")


if __name__ == "__main__":
    main()
