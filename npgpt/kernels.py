"""Numba kernels behind the layers in layers.py.

Each kernel does what BLAS cannot: fused row-wise reductions (layernorm, causal softmax),
elementwise maps (GELU), scatter-adds (embedding backward) and the AdamW update. Matrix products stay
in BLAS (NumPy's matmul), which is 8-9x faster than a hand-written Numba GEMM here.

Kernels are dtype-generic: float32 in the model, float64 in the finite-difference tests. They write
into output arrays passed by the caller. `error_model="numpy"` drops the per-division zero check that
blocks vectorisation; fast-math is limited to reordering sums (see _rjit) so the gradient checks hold.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic, overload

from .threads import current

if current() is not None:  # the policy was set before Numba started: its pool follows it
    nb.set_num_threads(min(current(), nb.config.NUMBA_NUM_THREADS))

_jit = dict(cache=True, nogil=True, error_model="numpy")
# Row reductions (sums over C or V) are a serial chain of dependent adds unless LLVM may reorder them:
# "reassoc" lets it keep several partial sums in vector lanes (4-8x here), "contract" fuses multiply-adds.
# No other fast-math flag: the kernels rely on -inf and exact zeros, and reordering a sum changes it by
# rounding only (the float64 gradient checks still hold to 1e-6).
_rjit = dict(_jit, fastmath={"reassoc", "contract"})

GELU_C = math.sqrt(2.0 / math.pi)


@intrinsic
def _bits_as_float32(typingctx, v):
    """Reinterpret an int32's bits as a float32 (an LLVM bitcast, which Numba cannot spell)."""
    if v != nb.types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(nb.types.float32))
    return nb.types.float32(nb.types.int32), codegen


@nb.njit(**_rjit)
def layernorm_fwd(x, w, b, eps, out, mean, rstd):
    """x [N, C] -> out [N, C]; saves mean [N] and rstd [N] for the backward. b may be empty (no bias)."""
    N, C = x.shape
    has_b = b.shape[0] > 0
    for i in range(N):
        m = 0.0
        for j in range(C):
            m += x[i, j]
        m /= C
        v = 0.0
        for j in range(C):
            d = x[i, j] - m
            v += d * d
        v /= C
        r = 1.0 / math.sqrt(v + eps)
        mean[i] = m
        rstd[i] = r
        for j in range(C):
            y = (x[i, j] - m) * r * w[j]
            out[i, j] = y + b[j] if has_b else y


@nb.njit(**_rjit)
def layernorm_bwd(dout, x, w, mean, rstd, dx, dw, db):
    """dx = d(layernorm)/dx^T dout (written); dw, db accumulated. db may be empty."""
    N, C = x.shape
    has_b = db.shape[0] > 0
    for i in range(N):
        m = mean[i]
        r = rstd[i]
        # mean of dnorm and of dnorm * xhat over the row, where dnorm = dout * w
        s1 = 0.0
        s2 = 0.0
        for j in range(C):
            xhat = (x[i, j] - m) * r
            dn = dout[i, j] * w[j]
            s1 += dn
            s2 += dn * xhat
        s1 /= C
        s2 /= C
        for j in range(C):
            xhat = (x[i, j] - m) * r
            dn = dout[i, j] * w[j]
            dx[i, j] = (dn - s1 - xhat * s2) * r
            dw[j] += dout[i, j] * xhat
            if has_b:
                db[j] += dout[i, j]


# GELU constants are float32 literals so that float32 inputs stay in float32 arithmetic (which LLVM
# vectorises, 5x faster than the float64 libm tanh); float64 inputs promote them and stay float64.
_F = np.float32


@nb.njit(**_jit)
def _tanh(u):
    """tanh through one exp, clamped where float32 tanh is already +-1 (keeps exp finite)."""
    u = min(max(u, _F(-9.0)), _F(9.0))
    e = math.exp(_F(2.0) * u)
    return (e - _F(1.0)) / (e + _F(1.0))


@nb.njit(**_jit)
def gelu_fwd(x, out):
    """tanh GELU (GPT-2's): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), over flat arrays."""
    for i in range(x.size):
        v = x[i]
        t = _tanh(_F(GELU_C) * (v + _F(0.044715) * v * v * v))
        out[i] = _F(0.5) * v * (_F(1.0) + t)


@nb.njit(**_jit)
def gelu_bwd(dout, x, dx):
    """dx = gelu'(x) * dout, over flat arrays."""
    for i in range(x.size):
        v = x[i]
        t = _tanh(_F(GELU_C) * (v + _F(0.044715) * v * v * v))
        dinner = _F(GELU_C) * (_F(1.0) + _F(3.0 * 0.044715) * v * v)
        dx[i] = dout[i] * (_F(0.5) * (_F(1.0) + t) + _F(0.5) * v * (_F(1.0) - t * t) * dinner)


# float32 tanh as a rational function, x P(x^2) / Q(x^2) on [-9, 9] (tanh is +-1 in float32 beyond):
# pure multiply-adds and one division, which LLVM vectorises (16 lanes with AVX-512), where the exp above
# is a scalar libm call per element. Coefficients fitted for this project by iteratively reweighted least
# squares; max error 3.5e-7 over the line (float32 rounding of tanh itself is 6e-8), so GELU's
# derivative is within 5e-6 of float64 everywhere (3e-6 for |x| < 4). Training only: the
# float64 gradient checks use the exact kernels above.
_TP = (np.float32(9.9999982e-01), np.float32(1.2915818e-01), np.float32(2.9172308e-03), np.float32(9.2376340e-06),
       np.float32(-1.2700102e-08), np.float32(1.8072238e-11))
_TQ = (np.float32(1.0), np.float32(4.6249083e-01), np.float32(2.3748361e-02), np.float32(2.2762881e-04))


@nb.njit(**_jit)
def _tanh_f32(u):
    c = min(max(u, _F(-9.0)), _F(9.0))
    u2 = c * c
    p = ((((_TP[5] * u2 + _TP[4]) * u2 + _TP[3]) * u2 + _TP[2]) * u2 + _TP[1]) * u2 + _TP[0]
    q = ((_TQ[3] * u2 + _TQ[2]) * u2 + _TQ[1]) * u2 + _TQ[0]
    # exactly +-1 beyond 9, as float32 tanh is: GELU's derivative has an x^3 factor there, so a residual
    # 1e-7 in 1 - t^2 would grow with |x|
    return _F(1.0) if u >= _F(9.0) else (_F(-1.0) if u <= _F(-9.0) else c * p / q)


@nb.njit(**_jit)
def gelu_fwd_f32(x, out):
    """gelu_fwd for float32 with the vectorisable tanh."""
    for i in range(x.size):
        v = x[i]
        t = _tanh_f32(_F(GELU_C) * (v + _F(0.044715) * v * v * v))
        out[i] = _F(0.5) * v * (_F(1.0) + t)


@nb.njit(**_jit)
def gelu_bwd_f32(dout, x, dx):
    """gelu_bwd for float32 with the vectorisable tanh."""
    for i in range(x.size):
        v = x[i]
        t = _tanh_f32(_F(GELU_C) * (v + _F(0.044715) * v * v * v))
        dinner = _F(GELU_C) * (_F(1.0) + _F(3.0 * 0.044715) * v * v)
        dx[i] = dout[i] * (_F(0.5) * (_F(1.0) + t) + _F(0.5) * v * (_F(1.0) - t * t) * dinner)


# float32 exp for softmax as 2^n (1 + r + r^2 P(r)), r = x - n ln2 in [-ln2/2, ln2/2] (ln2 split in two,
# Cody and Waite's way, so n ln2 is exact): multiply-adds, a floor and a bitcast, which LLVM vectorises
# (16 lanes), where math.exp is a scalar libm call (~5 ns) per score. P fitted for this project
# (reweighted least squares toward minimax); max relative error 1.2e-7 over [-87, 0], float32's own
# rounding being 6e-8. Only for x <= 0 (shifted scores): below -87 it gives ~2^-125, not 0.
_EP = (np.float32(5.0000000e-01), np.float32(1.66666642e-01), np.float32(4.16664034e-02),
       np.float32(8.33382923e-03), np.float32(1.39380642e-03), np.float32(1.96050387e-04))


@nb.njit(**_rjit)
def _exp_nonpos_f32(x):
    x = max(x, _F(-87.0))
    n = np.floor(x * _F(1.44269504) + _F(0.5))
    r = (x - n * _F(0.693359375)) - n * _F(-2.12194440e-4)
    p = ((((_EP[5] * r + _EP[4]) * r + _EP[3]) * r + _EP[2]) * r + _EP[1]) * r + _EP[0]
    two_n = _bits_as_float32(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return (_F(1.0) + r + r * r * p) * two_n


def _softmax_exp(x):
    return math.exp(x)


@overload(_softmax_exp)
def _softmax_exp_typed(x):
    """The vectorisable exp for float32; libm's for float64 (the gradient checks)."""
    if x == nb.types.float32:
        return lambda x: _exp_nonpos_f32(x)
    return lambda x: math.exp(x)


def _row_max(row):
    return row.max()


@overload(_row_max)
def _row_max_typed(row):
    """max of a float row. LLVM does not vectorise a float max reduction here (NaN rules), but an int32
    one it does (4x faster): float32 bits flipped to an order-preserving int32 key (negative floats'
    magnitude bits inverted), the max key flipped back."""
    if row.dtype == nb.types.float32:
        def impl(row):
            bits = row.view(np.int32)
            top = np.int32(-2147483648)
            for j in range(bits.size):
                v = bits[j]
                top = max(top, v ^ ((v >> np.int32(31)) & np.int32(0x7FFFFFFF)))
            return _bits_as_float32(np.int32(top ^ ((top >> np.int32(31)) & np.int32(0x7FFFFFFF))))
        return impl
    return lambda row: row.max()


def _as_dtype_of(a, v):
    return a.dtype.type(v)


@overload(_as_dtype_of)
def _as_dtype_of_typed(a, v):
    """v (a Python float) as a scalar of a's dtype: float32 rows stay in float32 arithmetic."""
    dt = a.dtype
    return lambda a, v: dt(v)


@nb.njit(**_rjit)
def _softmax_row(row, lo, hi, scale):
    """In place: row[lo:hi] -> softmax(scale * row[lo:hi]); the rest of the row exactly 0 (masked keys are
    skipped, never given a finite penalty); an empty range leaves an all-zero row. Loops run over a view
    that starts at 0: LLVM then knows the indices are >= 0 and vectorises them (6x over row[j], j >= lo)."""
    if hi > lo:
        seen = row[lo:hi]
        top = _row_max(seen)
        total = top - top  # zero of the row's dtype
        for j in range(seen.size):
            e = _softmax_exp((seen[j] - top) * scale)
            seen[j] = e
            total += e
        inv = (total - total + 1) / total
        for j in range(seen.size):
            seen[j] *= inv
    row[:lo] = 0
    row[max(lo, hi):] = 0


@nb.njit(**_rjit)
def causal_softmax_fwd(att, scale, q_offset, kstart, window=0):
    """In place over scores att [B, H, Tq, Tk]: row i of batch b keeps keys j0 <= j <= q_offset + i, where
    j0 = kstart[b], or max(kstart[b], q_offset + i - window + 1) for a banded layer (window > 0), and
    becomes softmax(scale * s) over them. Masked entries become exactly 0; kstart > 0 marks left padding;
    a row with no key left is all zeros. The scores must be finite."""
    B, H, Tq, Tk = att.shape
    sc = _as_dtype_of(att, scale)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                j0 = kstart[b] if window <= 0 else max(kstart[b], q_offset + i - window + 1)
                _softmax_row(att[b, h, i], min(j0, Tk), min(q_offset + i + 1, Tk), sc)


@nb.njit(**_rjit)
def causal_softmax_bwd(datt, att, scale, q_offset, kstart, window=0):
    """In place: datt (grad wrt probabilities) becomes the grad wrt the raw scores s (before scale):
    p * (dp - sum(p dp)) * scale over each row's keys, 0 elsewhere."""
    B, H, Tq, Tk = att.shape
    sc = _as_dtype_of(att, scale)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                j0 = kstart[b] if window <= 0 else max(kstart[b], q_offset + i - window + 1)
                lo, hi = min(j0, Tk), min(q_offset + i + 1, Tk)
                d = datt[b, h, i]
                if hi > lo:
                    p, dp = att[b, h, i, lo:hi], d[lo:hi]  # views from 0: see _softmax_row
                    dot = sc - sc
                    for j in range(p.size):
                        dot += p[j] * dp[j]
                    for j in range(p.size):
                        dp[j] = p[j] * (dp[j] - dot) * sc
                d[:lo] = 0
                d[max(lo, hi):] = 0


@nb.njit(**_jit)
def embedding_bwd(dout, idx, pos0, dwte, dwpe):
    """Scatter-add dout [B, T, C] into the rows of dwte picked by idx [B, T] and into dwpe[pos0 + t]."""
    B, T, C = dout.shape
    for b in range(B):
        for t in range(T):
            r = idx[b, t]
            for c in range(C):
                g = dout[b, t, c]
                dwte[r, c] += g
                dwpe[pos0 + t, c] += g


@nb.njit(**_jit)
def adamw_step(p, g, m, v, decay, lr, beta1, beta2, eps, weight_decay, gscale, bc1, bc2):
    """One AdamW update over flat buffers. g is multiplied by gscale (global-norm clipping) on the fly;
    weight decay is decoupled and applied where decay[i] == 1."""
    for i in range(p.size):
        gi = g[i] * gscale
        mi = beta1 * m[i] + (1.0 - beta1) * gi
        vi = beta2 * v[i] + (1.0 - beta2) * gi * gi
        m[i] = mi
        v[i] = vi
        upd = (mi / bc1) / (math.sqrt(vi / bc2) + eps)
        if decay[i]:
            upd += weight_decay * p[i]
        p[i] -= lr * upd


# ---------------------------------------------------------------- int8 weight-only matmuls (inference)
# Decode is bound by memory bandwidth: these read int8 weights (a quarter of float32's bytes) and scale
# the accumulated sums once per output channel. parallel=True: they are the only Numba kernels that use
# threads, and they run while BLAS is idle, so the two pools never compete. Their only fast-math flags
# let LLVM reorder and fuse the float sums (without "reassoc" the head's dot products stay scalar:
# 1.2 vs 23 GB/s); the rounding this changes is far below the int8 quantization error.
_pjit = dict(cache=True, nogil=True, error_model="numpy", parallel=True, fastmath={"reassoc", "contract"})


@nb.njit(**_pjit)
def int8_matmul_cols(x, q, s, out, T):
    """out [N, O] = (x [N, I] @ q [I, O]) * s [O]. The rows of q are split among T threads; each thread
    streams its rows once and keeps partial sums, which are added at the end."""
    N, I = x.shape
    O = q.shape[1]
    chunk = (I + T - 1) // T
    part = np.zeros((T, N, O), np.float32)
    for t in nb.prange(T):
        for i in range(t * chunk, min(I, (t + 1) * chunk)):
            for n in range(N):
                xi = x[n, i]
                for o in range(O):
                    part[t, n, o] += xi * np.float32(q[i, o])
    for n in range(N):
        for o in range(O):
            acc = np.float32(0.0)
            for t in range(T):
                acc += part[t, n, o]
            out[n, o] = acc * s[o]


@nb.njit(**_pjit)
def int8_matmul_rows(x, q, s, out):
    """out [N, V] = (x [N, C] @ q [V, C]^T) * s [V]: one dot product per row of q (the tied head, and the
    linears of the int8-rows layout). With several rows of x, each row of q is widened to float32 once
    and dotted with four rows of x per pass (widening it for every row of x cost more than the dots)."""
    N, C = x.shape
    V = q.shape[0]
    if N == 1:
        for v in nb.prange(V):
            acc = np.float32(0.0)
            for c in range(C):
                acc += x[0, c] * np.float32(q[v, c])
            out[0, v] = acc * s[v]
        return
    B = 64  # rows of q per task: one float32 buffer each
    for blk in nb.prange((V + B - 1) // B):
        w = np.empty(C, np.float32)
        for v in range(blk * B, min(V, blk * B + B)):
            for c in range(C):
                w[c] = np.float32(q[v, c])
            n = 0
            while n + 4 <= N:
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for c in range(C):
                    a0 += x[n, c] * w[c]
                    a1 += x[n + 1, c] * w[c]
                    a2 += x[n + 2, c] * w[c]
                    a3 += x[n + 3, c] * w[c]
                out[n, v] = a0 * s[v]
                out[n + 1, v] = a1 * s[v]
                out[n + 2, v] = a2 * s[v]
                out[n + 3, v] = a3 * s[v]
                n += 4
            for n in range(n, N):
                acc = np.float32(0.0)
                for c in range(C):
                    acc += x[n, c] * w[c]
                out[n, v] = acc * s[v]


# ---------------------------------------------------------------- decoding one token per row (pre-LN)
# A decode step of a small model is ~40 NumPy calls per layer whose overhead outweighs their arithmetic
# (0.6 ms per token for the shipped 4-layer model). One serial kernel per layer removes it; large models
# keep BLAS (model.FUSED_DECODE_MAX), whose two threads then win.
@nb.njit(**_rjit)
def _dot(a, b):
    s = a.dtype.type(0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@nb.njit(**_rjit)
def _linear_rows(x, W, b, out):
    """out [N, O] = x [N, I] @ W [I, O] + b [O], four rows of W at a time: each pass over out then
    carries four weight rows (with one, loading and storing out costs more than reading W)."""
    N, I = x.shape
    for n in range(N):
        out[n] = b
    i = 0
    while i + 4 <= I:
        r0, r1, r2, r3 = W[i], W[i + 1], W[i + 2], W[i + 3]
        for n in range(N):
            a0, a1, a2, a3 = x[n, i], x[n, i + 1], x[n, i + 2], x[n, i + 3]
            acc = out[n]
            for o in range(r0.shape[0]):
                acc[o] += a0 * r0[o] + a1 * r1[o] + a2 * r2[o] + a3 * r3[o]
        i += 4
    for i in range(i, I):
        row = W[i]
        for n in range(N):
            xi = x[n, i]
            acc = out[n]
            for o in range(row.shape[0]):
                acc[o] += xi * row[o]


@nb.njit(**_rjit)
def _layernorm_rows(x, w, b, eps, out):
    """out [N, C] = layernorm of each row of x [N, C]: layernorm_fwd, without saving for a backward."""
    N = x.shape[0]
    layernorm_fwd(x, w, b, eps, out, np.empty(N, x.dtype), np.empty(N, x.dtype))


@nb.njit(**_rjit)
def _attend_one(qkv, K, V, t, kstart, n_head, window, y):
    """The new token of each row: store its key and value for position t in the cache K, V [B, H, R, D],
    then y [B, C] = softmax(q k^T / sqrt(D)) v over the keys kstart[b] .. t (and t - window + 1 .. t when
    window > 0). Position j lives in slot j % R: a dense cache (R > t) as is, a banded layer's ring
    (R = window) wrapped."""
    B, C = y.shape
    D = C // n_head
    R = K.shape[2]
    scale = y.dtype.type(1.0 / math.sqrt(D))
    s = np.empty(t + 1, y.dtype)  # the model's dtype throughout, as the layer-by-layer path
    acc = np.empty(D, y.dtype)
    for b in range(B):
        j0 = kstart[b] if window <= 0 else max(kstart[b], t - window + 1)
        for h in range(n_head):
            q = qkv[b, h * D:(h + 1) * D]
            K[b, h, t % R] = qkv[b, C + h * D:C + (h + 1) * D]
            V[b, h, t % R] = qkv[b, 2 * C + h * D:2 * C + (h + 1) * D]
            top = -np.inf
            for j in range(j0, t + 1):
                s[j] = _dot(q, K[b, h, j % R]) * scale
                top = max(top, s[j])
            total = 0.0
            acc[:] = 0.0
            for j in range(j0, t + 1):
                p = math.exp(s[j] - top)
                total += p
                v = V[b, h, j % R]
                for d in range(D):
                    acc[d] += p * v[d]
            for d in range(D):
                y[b, h * D + d] = acc[d] / total


# A block's matrices reach the fused decode as tuples in one of three forms, told apart when it compiles:
# (W,) float [in, out] (a small float model, HF's layout; one thread, _linear_rows), (q, s) int8
# [out, in] with a float32 scale per output, or (h,) float16 bits [out, in] (npgpt quantize): the
# quantized forms stream their rows on the parallel kernels below.
def _linear_into(x, w, b, out):
    """out [N, O] = x [N, I] @ w + b [O] for a weight form above (compiled only: see the overload)."""
    raise NotImplementedError


@overload(_linear_into)
def _linear_into_typed(x, w, b, out):
    if len(w.types) == 2:
        def int8_rows(x, w, b, out):
            int8_matmul_rows(x, w[0], w[1], out)
            out += b
        return int8_rows
    if w.types[0].dtype == nb.types.uint16:
        def half_rows(x, w, b, out):
            half_matmul_rows(x, w[0], out)
            out += b
        return half_rows
    return lambda x, w, b, out: _linear_rows(x, w[0], b, out)


def _out_features(w):
    raise NotImplementedError


@overload(_out_features)
def _out_features_typed(w):
    if len(w.types) == 2 or w.types[0].dtype == nb.types.uint16:
        return lambda w: w[0].shape[0]
    return lambda w: w[0].shape[1]


def _gelu_inplace(f):
    raise NotImplementedError


@overload(_gelu_inplace)
def _gelu_inplace_typed(f):
    """tanh GELU over f [N, O] in place: the vectorised float32 kernel (libm's scalar tanh cost GPT-2 0.3 ms
    a token), or libm's in float64 (the tests hold the fused decode to 1e-12 there)."""
    if f.dtype == nb.types.float32:
        return lambda f: gelu_fwd_f32(f.reshape(-1), f.reshape(-1))

    def exact(f):
        for n in range(f.shape[0]):
            for i in range(f.shape[1]):
                u = f[n, i]
                f[n, i] = 0.5 * u * (1.0 + math.tanh(GELU_C * (u + 0.044715 * u * u * u)))
    return exact


@nb.njit(**_rjit)
def decode_layer(x, ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, fcp_w, fcp_b,
                 K, V, t, kstart, eps, n_head, window):
    """One pre-LN block for one new token per row, in place: x [B, C] += attn(ln_1(x)), then
    x += mlp(ln_2(x)); matrices in a weight form above. The token's key and value go to position t of
    the layer's cache K, V [B, H, room, D]; row b attends to positions kstart[b] .. t, the last `window`
    of them in a banded layer."""
    B, C = x.shape
    h = np.empty_like(x)
    qkv = np.empty((B, 3 * C), x.dtype)
    y = np.empty_like(x)
    o = np.empty_like(x)
    f = np.empty((B, _out_features(fc_w)), x.dtype)
    _layernorm_rows(x, ln1_w, ln1_b, eps, h)
    _linear_into(h, attn_w, attn_b, qkv)
    _attend_one(qkv, K, V, t, kstart, n_head, window, y)
    _linear_into(y, proj_w, proj_b, o)
    x += o
    _layernorm_rows(x, ln2_w, ln2_b, eps, h)
    _linear_into(h, fc_w, fc_b, f)
    _gelu_inplace(f)
    _linear_into(f, fcp_w, fcp_b, o)
    x += o


def _head_into(x, wte, out):
    raise NotImplementedError


@overload(_head_into)
def _head_into_typed(x, wte, out):
    """out [N, V] = x [N, C] @ wte^T for wte [V, C] in a weight form above (the tied head)."""
    if len(wte.types) == 2:
        return lambda x, wte, out: int8_matmul_rows(x, wte[0], wte[1], out)
    if wte.types[0].dtype == nb.types.uint16:
        return lambda x, wte, out: half_matmul_rows(x, wte[0], out)

    def dots(x, wte, out):
        w = wte[0]
        for v in range(w.shape[0]):
            for n in range(x.shape[0]):
                out[n, v] = _dot(x[n], w[v])
    return dots


@nb.njit(**_rjit)
def decode_head(x, w, b, eps, wte, out):
    """out [N, V] = layernorm(x [N, C]) @ wte [V, C]^T: ln_f and the tied LM head of a decode step
    (x is overwritten with its layernorm; wte in a weight form above)."""
    _layernorm_rows(x, w, b, eps, x)
    _head_into(x, wte, out)


# ---------------------------------------------------------------- float16 weights (npgpt quantize --format fp16)
# Numba has no float16 type: the kernels read the weights as uint16 bits, and _half_to_float32 hands
# LLVM a bitcast to its half type and a widening to float, which it compiles to the CPU's conversion
# instruction (vcvtph2ps, 16 at a time with AVX-512; F16C on every x86-64 since 2012). Matrices are
# stored (out, in), so each output is one dot product over a contiguous row: the streaming pattern of
# the tied head, measured 2x faster than splitting an (in, out) matrix's rows.
@intrinsic
def _half_to_float32(typingctx, u):
    """float16 bits (a uint16) -> the float32 of the same value, exactly."""
    if u != nb.types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return nb.types.float32(nb.types.uint16), codegen


@nb.njit(**_rjit)
def _half_dots(x, h, v0, v1, out):
    """out[:, v] = x [N, C] @ float32(h[v]) for v0 <= v < v1."""
    for v in range(v0, v1):
        row = h[v]
        for n in range(x.shape[0]):
            xn = x[n]
            s = np.float32(0.0)
            for c in range(row.shape[0]):
                s += xn[c] * _half_to_float32(row[c])
            out[n, v] = s


@nb.njit(**_pjit)
def half_matmul_rows(x, h, out):
    """out [N, V] = x [N, C] @ float32(h [V, C])^T (h: float16 bits as uint16), h's rows in 32 parts
    shared among the threads."""
    V, T = h.shape[0], 32  # parts, not threads: nb.get_num_threads() in compiled code blocks caching
    chunk = (V + T - 1) // T
    for t in nb.prange(T):
        _half_dots(x, h, t * chunk, min(V, (t + 1) * chunk), out)
