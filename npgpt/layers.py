"""Forward/backward pairs for every layer of a GPT, side by side.

Conventions (as llm.c):
- a forward returns its output plus whatever its backward needs beyond its input (a "cache"; linear,
  GELU and embedding need only their input, which the model keeps), nothing more;
- a backward takes the upstream gradient and returns the gradient of the layer input, and *adds into*
  the parameter-gradient buffers it is given, so weight tying and gradient accumulation need no extra code;
- shapes: B batch, T time, C channels, H heads, D = C / H head size, V vocabulary, N = B * T rows.
All functions follow the dtype of their inputs (float32 in the model, float64 in gradient checks).

Forwards called with save=False (inference) on fewer than KERNEL_ROWS rows take a NumPy path,
picoGPT-style one-liners: they never import Numba, so decoding and short prompts cost neither Numba's
import time nor its ~65 MB of resident memory. With save=True (training) the Numba kernels compute the
output and keep what the backward needs; a long prompt runs them too (prefill of 512 tokens of GPT-2
1.3x faster). The two paths are tested against each other.
"""
from __future__ import annotations

import math

import numpy as np



class _LazyKernels:
    """npgpt.kernels (and with it Numba), imported on first use."""

    def __getattr__(self, name):
        from . import kernels
        return getattr(kernels, name)


K = _LazyKernels()

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def _empty(dtype):
    return _EMPTY[np.dtype(dtype)]


# ---------------------------------------------------------------- token + position embedding
def embedding_forward(idx, wte, wpe, pos0=0, pad=None):
    """idx [B, T] int, wte [V, C], wpe [block, C] -> x [B, T, C] = wte[idx] + wpe[pos0 : pos0 + T].
    With left padding, pad [B] counts each row's pad columns and row b's positions start at -pad[b]
    (pad columns get position 0; attention never reads them)."""
    T = idx.shape[1]
    if pad is None or not pad.any():
        return wte[idx] + wpe[pos0:pos0 + T]
    pos = np.maximum(pos0 + np.arange(T)[None, :] - pad[:, None], 0)
    return wte[idx] + wpe[pos]


def embedding_backward(dout, idx, dwte, dwpe, pos0=0, pad=None):
    """dout [B, T, C]: scatter-adds into dwte [V, C] and dwpe [block, C]. Token ids are the input: no dx.
    pad [B] must be what the forward was given: with it, row b's positions are shifted as there."""
    if pad is None or not pad.any():
        K.embedding_bwd(np.ascontiguousarray(dout), idx.astype(np.int64, copy=False), pos0, dwte, dwpe)
        return
    # left padding (no training path uses it: a plain scatter-add is enough): the positions of the forward
    pos = np.maximum(pos0 + np.arange(idx.shape[1])[None, :] - pad[:, None], 0)
    np.add.at(dwte, idx, dout)
    np.add.at(dwpe, pos, dout)


# ---------------------------------------------------------------- layernorm
# Inference from this many rows (tokens x batch) on runs the kernels: they beat NumPy's passes by ~1.3x on
# a prompt, which pays for importing Numba (~0.2 s with cached kernels) from a few hundred tokens on.
KERNEL_ROWS = 256


def _numpy_path(x, save):
    """Whether a forward over x [..., C] takes the NumPy path: inference over fewer than KERNEL_ROWS rows."""
    return not save and x.size < KERNEL_ROWS * x.shape[-1]


def layernorm_forward(x, w, b, eps, save=True):
    """x [..., C] -> (out [..., C], cache). Biased variance, as GPT-2. b may be None."""
    if _numpy_path(x, save):
        xc = x - x.mean(-1, keepdims=True)
        out = xc * (1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)) * w
        return (out if b is None else out + b), None
    shape = x.shape
    x2 = np.ascontiguousarray(x).reshape(-1, shape[-1])
    out = np.empty_like(x2)
    mean = np.empty(x2.shape[0], x.dtype)
    rstd = np.empty(x2.shape[0], x.dtype)
    K.layernorm_fwd(x2, w, b if b is not None else _empty(x.dtype), eps, out, mean, rstd)
    return out.reshape(shape), (x2, mean, rstd) if save else None


def layernorm_backward(dout, cache, w, dw, db):
    """dout [..., C] -> dx [..., C]; accumulates dw [C] and db [C] (db None when there is no bias)."""
    x2, mean, rstd = cache
    d2 = np.ascontiguousarray(dout).reshape(x2.shape)
    dx = np.empty_like(x2)
    K.layernorm_bwd(d2, x2, w, mean, rstd, dx, dw, db if db is not None else _empty(x2.dtype))
    return dx.reshape(dout.shape)


# ---------------------------------------------------------------- linear (HF Conv1D layout: w is [in, out])
def linear_forward(x, w, b):
    """x [..., in] @ w [in, out] + b [out] -> [..., out]. b may be None."""
    # one [N, in] @ [in, out] GEMM: NumPy's matmul on a [B, T, in] stack calls BLAS once per batch row
    out = x.reshape(-1, x.shape[-1]) @ w
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[1])


def linear_backward(dout, x, w, dw, db):
    """dout [..., out] -> dx [..., in]; accumulates dw += x^T dout and db += sum(dout)."""
    d2 = dout.reshape(-1, dout.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dw += x2.T @ d2
    if db is not None:
        db += d2.sum(axis=0)
    return (d2 @ w.T).reshape(*dout.shape[:-1], w.shape[0])


# ---------------------------------------------------------------- GELU (tanh approximation, as GPT-2)
GELU_C = math.sqrt(2.0 / math.pi)  # also in kernels.py, which only training imports (it loads Numba)


def gelu_forward(x, save=True):
    """x [...] -> gelu(x) [...]."""
    if _numpy_path(x, save):
        return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x * x * x)))
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    (K.gelu_fwd_f32 if x.dtype == np.float32 else K.gelu_fwd)(x.reshape(-1), out.reshape(-1))
    return out


def gelu_backward(dout, x):
    """dout [...] -> dx [...] (x is the forward's input)."""
    dout = np.ascontiguousarray(dout)
    dx = np.empty_like(x)
    (K.gelu_bwd_f32 if x.dtype == np.float32 else K.gelu_bwd)(dout.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# ---------------------------------------------------------------- dropout
def dropout_forward(x, p, rng):
    """Inverted dropout: keeps each element with probability 1 - p and scales it by 1 / (1 - p).
    Returns (out, mask); mask is None (identity) when p == 0 or rng is None (evaluation)."""
    if p == 0.0 or rng is None:
        return x, None
    mask = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    return x * mask, mask


def dropout_backward(dout, mask):
    return dout if mask is None else dout * mask


# ---------------------------------------------------------------- causal multi-head self-attention
def split_heads(qkv, n_head):
    """qkv [B, T, 3C] -> q, k, v each [B, H, T, D]."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    # one copy into [3, B, H, T, D]: contiguous heads make the attention matmuls 2x faster than views
    x = np.ascontiguousarray(qkv.reshape(B, T, 3, n_head, C // n_head).transpose(2, 0, 3, 1, 4))
    return x[0], x[1], x[2]


def split_heads_backward(dq, dk, dv):
    """d{q, k, v} [B, H, T, D] -> dqkv [B, T, 3C], written in one pass."""
    B, H, T, D = dq.shape
    dqkv = np.empty((B, T, 3, H, D), dq.dtype)
    for i, d in enumerate((dq, dk, dv)):
        dqkv[:, :, i] = d.transpose(0, 2, 1, 3)
    return dqkv.reshape(B, T, 3 * H * D)


def merge_heads(y):
    """y [B, H, T, D] -> [B, T, H * D]."""
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def merge_heads_backward(dout, n_head):
    """dout [B, T, C] -> [B, H, T, D] (a view)."""
    B, T, C = dout.shape
    return dout.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def attention_forward(q, k, v, q_offset=0, dropout=0.0, rng=None, pad=None, save=True, window=0):
    """Causal scaled dot-product attention, dense or locally banded.

    q [B, H, Tq, D] are columns q_offset .. q_offset + Tq - 1; k, v [B, H, Tk, D] are columns 0 .. Tk - 1
    (Tk = q_offset + Tq; q_offset > 0 when keys come from a KV cache). Query i sees keys j <= q_offset + i,
    and, with left padding pad [B], only keys j >= pad[b]; with window w > 0 (a banded layer, GPT-3's
    locally banded pattern), only keys j >= q_offset + i - w + 1: w keys including itself.
    Returns y [B, H, Tq, D] and the cache (att probabilities [B, H, Tq, Tk], dropout mask, ...).

    With more than ATTN_TILE queries, or when all heads' scores would take more than
    ATTN_MATERIALIZE_BYTES, or in a banded layer whose band is narrower than the keys, attention runs in
    tiles of ATTN_TILE query rows, one head at a time: memory grows linearly with T, a banded tile
    computes scores only for the keys of its band, and the backward recomputes each tile's
    probabilities instead of keeping them (measured faster from T = 256 on, and 8x less memory at
    T = 1024). Attention dropout needs the kept probabilities, so it takes the materialised path.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])  # a Python float: keeps float32 arrays float32
    kstart = np.zeros(q.shape[0], np.int64) if pad is None else pad.astype(np.int64)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    window = window if 0 < window < Tk else 0  # a band as wide as the keys is dense, bit for bit
    numpy_path = not save and B * Tq < KERNEL_ROWS
    big = Tq > ATTN_TILE or B * H * Tq * Tk * q.itemsize > ATTN_MATERIALIZE_BYTES or window
    if big and (dropout == 0.0 or rng is None):
        y = np.empty_like(q)
        for b, h, t0, t1, lo, p in _attention_tiles(q, k, kstart, scale, q_offset, not numpy_path, window):
            y[b, h, t0:t1] = p @ v[b, h, lo:q_offset + t1]
        return y, (None, None, scale, q_offset, kstart, window) if save else None
    if numpy_path and Tq == 1 and not kstart.any():  # decoding one token: every cached key is visible
        s = q @ k.swapaxes(-1, -2)
        s *= scale
        return _softmax_inplace(s) @ v, None
    if numpy_path:
        return causal_softmax(q @ k.swapaxes(-1, -2) * scale, q_offset, kstart, window) @ v, None
    att = np.ascontiguousarray(q @ k.swapaxes(-1, -2))
    K.causal_softmax_fwd(att, scale, q_offset, kstart, window)
    att_d, mask = dropout_forward(att, dropout, rng)
    return att_d @ v, (att, mask, scale, q_offset, kstart, window) if save else None


def attention_backward(dy, q, k, v, cache):
    """dy [B, H, Tq, D] -> dq [B, H, Tq, D], dk, dv [B, H, Tk, D]."""
    att, mask, scale, q_offset, kstart, window = cache
    if att is None:  # tiled forward: recompute each tile's probabilities
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        for b, h, t0, t1, lo, p in _attention_tiles(q, k, kstart, scale, q_offset, True, window):
            n = q_offset + t1
            dv[b, h, lo:n] += p.T @ dy[b, h, t0:t1]
            ds = np.ascontiguousarray(dy[b, h, t0:t1] @ v[b, h, lo:n].T)[None, None]
            K.causal_softmax_bwd(ds, p[None, None], scale, q_offset + t0 - lo, np.maximum(kstart[b:b + 1] - lo, 0),
                                 window)
            dq[b, h, t0:t1] = ds[0, 0] @ k[b, h, lo:n]
            dk[b, h, lo:n] += ds[0, 0].T @ q[b, h, t0:t1]
        return dq, dk, dv
    att_d = att if mask is None else att * mask
    dv = att_d.swapaxes(-1, -2) @ dy
    datt = np.ascontiguousarray(dropout_backward(dy @ v.swapaxes(-1, -2), mask))
    K.causal_softmax_bwd(datt, att, scale, q_offset, kstart, window)  # datt is now d(loss)/d(q k^T)
    dq = datt @ k
    dk = datt.swapaxes(-1, -2) @ q
    return dq, dk, dv


# the attention's tiles and softmax, used by the pair above
ATTN_TILE = 128
ATTN_MATERIALIZE_BYTES = 64 << 20
# A banded tile of r rows reads r + w - 1 keys, of which r x w scores are in its band: smaller tiles
# waste less. 64 rows measured best at T = 2048 for w = 256 (96 -> 83 ms fwd+bwd) and w = 128; at 32
# the per-tile Python overhead wins.
BAND_TILE = 64


def _attention_tiles(q, k, kstart, scale, q_offset, kernel, window=0):
    """Yield (b, h, t0, t1, lo, p): p [t1 - t0, q_offset + t1 - lo] are the attention probabilities of
    query rows t0..t1 of head h over keys lo .. q_offset + t1 - 1, the keys they may see (a banded tile
    starts at its first row's band; Numba kernel if `kernel`, else NumPy)."""
    B, H, Tq, _ = q.shape
    rows = min(ATTN_TILE, BAND_TILE) if window else ATTN_TILE
    for b in range(B):
        for h in range(H):
            for t0 in range(0, Tq, rows):
                t1 = min(Tq, t0 + rows)
                lo = max(0, q_offset + t0 - window + 1) if window else 0
                s = q[b, h, t0:t1] @ k[b, h, lo:q_offset + t1].T
                ks = np.maximum(kstart[b:b + 1] - lo, 0)  # padding, in the tile's key columns
                if kernel:
                    s = s[None, None]
                    K.causal_softmax_fwd(s, scale, q_offset + t0 - lo, ks, window)
                else:
                    s = causal_softmax(s[None, None] * scale, q_offset + t0 - lo, ks, window)
                yield b, h, t0, t1, lo, s[0, 0]


def _softmax_inplace(s):
    """Softmax over the last axis of s, in place (NumPy's SIMD exp); -inf entries become exactly 0."""
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    return s


def causal_softmax(s, q_offset, kstart, window=0):
    """NumPy path: s [B, H, Tq, Tk] scores -> probabilities over keys kstart[b] <= j <= q_offset + i (and
    j >= q_offset + i - window + 1 when window > 0); masked entries are exactly 0 and a row with no key
    left is all zeros (never NaN)."""
    Tq, Tk = s.shape[-2:]
    j = np.arange(Tk)
    i = q_offset + np.arange(Tq)[None, :, None]
    keep = (j[None, None, :] <= i) & (j[None, None, :] >= kstart[:, None, None])
    if window:
        keep &= j[None, None, :] >= i - window + 1
    s = np.where(keep[:, None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(mx), mx, 0))
    tot = e.sum(-1, keepdims=True)
    return e / np.where(tot > 0, tot, 1)


# ---------------------------------------------------------------- softmax cross-entropy
def cross_entropy_forward(logits, targets):
    """logits [N, V], targets [N] int (< 0 = ignore) -> mean loss over kept rows (a Python float)."""
    n = int((targets >= 0).sum())
    return float(token_nll(logits, targets).sum(dtype=np.float64) / max(n, 1))


def token_nll(logits, targets):
    """logits [N, V], targets [N] -> -log softmax(logits)[target] per row [N] (0 where target < 0)."""
    N, V = logits.shape
    losses = np.empty(N, logits.dtype)
    t = np.maximum(targets, 0)
    buf = np.empty((min(N, _xent_rows(logits)), V), logits.dtype)
    for r0, r1 in _row_chunks(logits):
        x, e = logits[r0:r1], buf[:r1 - r0]
        m = x.max(1)
        np.subtract(x, m[:, None], out=e)
        np.exp(e, out=e)
        losses[r0:r1] = np.log(e.sum(1)) + m - x[np.arange(r1 - r0), t[r0:r1]]  # logsumexp - target logit
    losses[targets < 0] = 0.0
    return losses


def cross_entropy_backward(logits, targets, dloss=1.0, row_scale=None):
    """-> dlogits [N, V] = dloss * (softmax(logits) - onehot(targets)) / n_kept; ignored rows are 0.
    row_scale [N], when given, replaces dloss / n_kept per row: the gradient of sum_i row_scale[i] * nll_i
    (an objective weighting each token's log-likelihood, as policy gradients do)."""
    logits = np.ascontiguousarray(logits)
    targets = targets.astype(np.int64, copy=False)
    if row_scale is None:
        n = int((targets >= 0).sum())
        row_scale = np.full(len(targets), dloss / max(n, 1), logits.dtype)
    row_scale = np.asarray(row_scale, logits.dtype)
    dlogits = np.empty_like(logits)
    for r0, r1 in _row_chunks(logits):
        d = dlogits[r0:r1]
        np.subtract(logits[r0:r1], logits[r0:r1].max(1)[:, None], out=d)
        np.exp(d, out=d)
        d *= (row_scale[r0:r1] / d.sum(1))[:, None]
    kept = np.flatnonzero(targets >= 0)
    dlogits[kept, targets[kept]] -= row_scale[kept]
    dlogits[targets < 0] = 0.0
    return dlogits


def _xent_rows(logits):
    """Rows per chunk of the cross-entropy passes: ~1 MB, so max, exp, sum and scale reuse the cache."""
    return max(1, (1 << 20) // (logits.shape[1] * logits.itemsize))


def _row_chunks(logits):
    """(r0, r1) row ranges of _xent_rows rows. The softmax runs through NumPy's SIMD exp, 5x faster
    than a compiled loop's scalar one (measured over GPT-2's 50,257-token vocabulary)."""
    n = _xent_rows(logits)
    return ((r0, min(len(logits), r0 + n)) for r0 in range(0, len(logits), n))
