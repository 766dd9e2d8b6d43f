"""Every layer's backward against central finite differences in float64, and its forward against a
plain NumPy reference (picoGPT-style one-liners)."""
import math

import numpy as np
import pytest

from npgpt import layers as L

from conftest import numeric_grad

RTOL = 1e-6


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_layernorm_forward_matches_reference(rng):
    x = rng.standard_normal((3, 5, 7))
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    out, _ = L.layernorm_forward(x, w, b, 1e-5)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)  # biased variance, as GPT-2
    np.testing.assert_allclose(out, (x - mu) / np.sqrt(var + 1e-5) * w + b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_backward(rng, bias):
    x = rng.standard_normal((2, 3, 6))
    w = rng.standard_normal(6)
    b = rng.standard_normal(6) if bias else None
    up = rng.standard_normal((2, 3, 6))
    f = lambda: float((L.layernorm_forward(x, w, b, 1e-5)[0] * up).sum())  # noqa: E731
    out, cache = L.layernorm_forward(x, w, b, 1e-5)
    dw, db = np.zeros(6), (np.zeros(6) if bias else None)
    dx = L.layernorm_backward(up, cache, w, dw, db)
    assert rel_err(dx, numeric_grad(f, x)) < RTOL
    assert rel_err(dw, numeric_grad(f, w)) < RTOL
    if bias:
        assert rel_err(db, numeric_grad(f, b)) < RTOL


def test_linear_backward_accumulates(rng):
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    up = rng.standard_normal((2, 3, 5))
    f = lambda: float((L.linear_forward(x, w, b) * up).sum())  # noqa: E731
    np.testing.assert_allclose(L.linear_forward(x, w, b), x @ w + b)
    dw, db = np.ones((4, 5)), np.ones(5)  # pre-filled: backward must add, not overwrite
    dx = L.linear_backward(up, x, w, dw, db)
    assert rel_err(dx, numeric_grad(f, x)) < RTOL
    assert rel_err(dw - 1, numeric_grad(f, w)) < RTOL
    assert rel_err(db - 1, numeric_grad(f, b)) < RTOL


def test_gelu_forward_is_tanh_gelu_and_backward(rng):
    x = rng.standard_normal((4, 9)) * 3
    ref = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert rel_err(L.gelu_forward(x), ref) < 1e-6  # constants are float32-rounded literals
    up = rng.standard_normal(x.shape)
    f = lambda: float((L.gelu_forward(x) * up).sum())  # noqa: E731
    assert rel_err(L.gelu_backward(up, x), numeric_grad(f, x)) < RTOL


def test_gelu_float32_stays_float32(rng):
    x = rng.standard_normal(100).astype(np.float32)
    assert L.gelu_forward(x).dtype == np.float32
    assert L.gelu_backward(x, x).dtype == np.float32


def test_gelu_float32_rational_tanh_is_accurate():
    """The float32 kernels' rational tanh, over the whole line: GELU and its derivative against float64."""
    x64 = np.linspace(-12, 12, 200_001)
    x = x64.astype(np.float32)
    xr = x.astype(np.float64)
    u = math.sqrt(2 / math.pi) * (xr + 0.044715 * xr ** 3)
    t = np.tanh(u)
    ref = 0.5 * xr * (1 + t)
    dref = 0.5 * (1 + t) + 0.5 * xr * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * xr ** 2)
    out = L.gelu_forward(x).astype(np.float64)
    d = L.gelu_backward(np.ones_like(x), x).astype(np.float64)
    assert np.all(np.abs(out - ref) <= 1e-6 * np.maximum(1.0, np.abs(ref)))
    assert np.abs(d - dref).max() < 1e-5
    small = np.abs(x) < 4
    assert np.abs(d - dref)[small].max() < 3e-6
    big = np.array([-1e4, -50.0, 50.0, 1e4], np.float32)  # saturated: exactly 0 and 1, as float32 tanh gives
    np.testing.assert_array_equal(L.gelu_backward(np.ones_like(big), big), [0, 0, 1, 1])


def test_float32_softmax_exp_and_row_max():
    """The float32 softmax kernels' vectorisable pieces: the polynomial exp against float64 exp over
    [-87, 0], and the row max through order-preserving int32 keys against NumPy's (signs, -0.0, ties)."""
    import numba as nb
    from npgpt import kernels as K
    x = np.concatenate([np.linspace(-87, 0, 20_001), [-0.0, -1e-30, -1e-7, -0.5 * math.log(2), -86.99]])
    got = np.array([K._exp_nonpos_f32(np.float32(v)) for v in x], np.float64)
    ref = np.exp(x.astype(np.float32).astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 2.5e-7
    row_max = nb.njit(lambda r: K._row_max(r))
    rng = np.random.default_rng(1)
    for row in ([-3.5, -0.0, -7.25], [-0.0, 0.0], [-1e-30, -2.0], [5.0], [2.0, 7.0, 7.0, -7.0],
                rng.standard_normal(1_001) * 1e3, -np.abs(rng.standard_normal(77))):
        r = np.asarray(row, np.float32)
        assert row_max(r) == r.max()


def test_embedding_backward(rng):
    idx = rng.integers(0, 5, (2, 4))
    wte, wpe = rng.standard_normal((5, 3)), rng.standard_normal((6, 3))
    up = rng.standard_normal((2, 4, 3))
    for pos0 in (0, 2):
        f = lambda: float((L.embedding_forward(idx, wte, wpe, pos0) * up).sum())  # noqa: E731
        dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
        L.embedding_backward(up, idx, dwte, dwpe, pos0)
        assert rel_err(dwte, numeric_grad(f, wte)) < RTOL
        assert rel_err(dwpe, numeric_grad(f, wpe)) < RTOL


def naive_attention(q, k, v, q_offset=0):
    """Reference: scores masked with -inf above the causal diagonal, softmax, weighted sum."""
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    s = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    mask = np.arange(Tk)[None, :] > (q_offset + np.arange(Tq))[:, None]
    s = np.where(mask, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("q_offset", [0, 3])
def test_attention_forward_and_backward(rng, q_offset):
    B, H, Tq, D = 2, 2, 4, 3
    Tk = q_offset + Tq
    q, k, v = rng.standard_normal((B, H, Tq, D)), rng.standard_normal((B, H, Tk, D)), rng.standard_normal((B, H, Tk, D))
    y, cache = L.attention_forward(q, k, v, q_offset)
    assert rel_err(y, naive_attention(q, k, v, q_offset)) < 1e-12
    up = rng.standard_normal(y.shape)
    f = lambda: float((L.attention_forward(q, k, v, q_offset)[0] * up).sum())  # noqa: E731
    dq, dk, dv = L.attention_backward(up, q, k, v, cache)
    assert rel_err(dq, numeric_grad(f, q)) < RTOL
    assert rel_err(dk, numeric_grad(f, k)) < RTOL
    assert rel_err(dv, numeric_grad(f, v)) < RTOL


def test_attention_masked_probabilities_are_exactly_zero(rng):
    q = rng.standard_normal((1, 1, 5, 4)) * 100  # huge scores: a finite -1e4 penalty would leak
    y, (att, *_ ) = L.attention_forward(q, q.copy(), q.copy())
    assert np.all(att[0, 0][np.triu_indices(5, 1)] == 0.0)


def test_attention_dropout_backward(rng):
    B, H, T, D = 1, 2, 5, 3
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    seed = 7
    y, cache = L.attention_forward(q, k, v, 0, 0.3, np.random.default_rng(seed))
    up = rng.standard_normal(y.shape)
    # the same dropout mask for every evaluation: reseed the generator each time
    f = lambda: float((L.attention_forward(q, k, v, 0, 0.3, np.random.default_rng(seed))[0] * up).sum())  # noqa
    dq, dk, dv = L.attention_backward(up, q, k, v, cache)
    assert cache[1] is not None and (cache[1] == 0).any()
    assert rel_err(dq, numeric_grad(f, q)) < RTOL
    assert rel_err(dv, numeric_grad(f, v)) < RTOL


def test_cross_entropy_with_ignore_index(rng):
    logits = rng.standard_normal((6, 7)) * 3
    targets = np.array([1, -1, 6, 0, -1, 3])
    keep = targets >= 0
    lse = np.log(np.exp(logits).sum(-1))
    ref = float(np.mean(lse[keep] - logits[keep, targets[keep]]))
    assert abs(L.cross_entropy_forward(logits, targets) - ref) < 1e-12
    f = lambda: L.cross_entropy_forward(logits, targets)  # noqa: E731
    d = L.cross_entropy_backward(logits, targets)
    assert rel_err(d, numeric_grad(f, logits)) < RTOL
    assert np.all(d[~keep] == 0)


def test_cross_entropy_float32_over_a_large_vocabulary_in_chunks(rng):
    """Rows are processed in ~1 MB chunks: several chunks, an ignored row in one, per-row scales."""
    N, V = 40, 20000
    logits = rng.standard_normal((N, V)) * 4
    targets = rng.integers(0, V, N)
    targets[17] = -1
    assert L._xent_rows(logits.astype(np.float32)) < N  # really more than one chunk
    lse = np.log(np.exp(logits).sum(-1))
    nll = np.where(targets >= 0, lse - logits[np.arange(N), np.maximum(targets, 0)], 0.0)
    scale = rng.uniform(0.5, 2.0, N)
    soft = np.exp(logits - lse[:, None])
    soft[np.arange(N), np.maximum(targets, 0)] -= 1.0
    ref = np.where((targets >= 0)[:, None], soft * scale[:, None], 0.0)
    x32 = logits.astype(np.float32)
    got = L.token_nll(x32, targets)
    assert got.dtype == np.float32 and rel_err(got, nll) < 1e-6
    d = L.cross_entropy_backward(x32, targets, row_scale=scale)
    assert d.dtype == np.float32 and np.abs(d - ref).max() < 1e-6 and np.all(d[17] == 0)


def test_dropout_forward_backward(rng):
    x = rng.standard_normal((50, 40))
    out, mask = L.dropout_forward(x, 0.25, np.random.default_rng(1))
    kept = mask != 0
    assert 0.65 < kept.mean() < 0.85
    np.testing.assert_allclose(out[kept], x[kept] / 0.75)
    np.testing.assert_allclose(L.dropout_backward(np.ones_like(x), mask), mask)
    out, mask = L.dropout_forward(x, 0.25, None)  # evaluation: identity
    assert mask is None and out is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_inference_path_matches_numba_training_path(rng, dtype):
    """The forwards run on NumPy for inference (save=False) and on Numba kernels for training."""
    tol = 1e-5 if dtype == np.float32 else 1e-12
    x = rng.standard_normal((2, 5, 8)).astype(dtype)
    w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
    for bias in (b, None):
        a, _ = L.layernorm_forward(x, w, bias, 1e-5, save=True)
        c, _ = L.layernorm_forward(x, w, bias, 1e-5, save=False)
        assert c.dtype == dtype and rel_err(c, a) < tol
    # the kernel's constants are float32 literals (see kernels.py), hence 1e-7 even in float64
    assert rel_err(L.gelu_forward(x * 4, save=False), L.gelu_forward(x * 4, save=True)) < max(tol, 1e-7)
    assert L.gelu_forward(x, save=False).dtype == dtype
    q, k, v = (rng.standard_normal((3, 2, 6, 4)).astype(dtype) for _ in range(3))
    pad = np.array([0, 2, 5])
    for off, pd in ((0, None), (0, pad), (2, pad)):
        qq = q[:, :, off:]
        a, _ = L.attention_forward(qq, k, v, off, pad=pd, save=True)
        c, _ = L.attention_forward(qq, k, v, off, pad=pd, save=False)
        assert c.dtype == dtype and rel_err(c, a) < tol and np.isfinite(c).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inference_over_many_rows_runs_the_kernels_and_keeps_nothing(rng, monkeypatch, dtype):
    """From KERNEL_ROWS rows on (a long prompt), inference takes the kernels: same outputs, no cache."""
    tol = 1e-5 if dtype == np.float32 else 1e-12
    x = rng.standard_normal((2, 5, 8)).astype(dtype)
    w, b = rng.standard_normal(8).astype(dtype), rng.standard_normal(8).astype(dtype)
    q, k, v = (rng.standard_normal((3, 2, 6, 4)).astype(dtype) for _ in range(3))
    pad = np.array([0, 2, 5])
    small = (L.layernorm_forward(x, w, b, 1e-5, save=False), L.gelu_forward(x * 4, save=False),
             L.attention_forward(q, k, v, pad=pad, save=False))
    monkeypatch.setattr(L, "KERNEL_ROWS", 4)  # now 10 rows of x and 18 of q are "many"
    kernel, calls = L.K.causal_softmax_fwd, []
    monkeypatch.setattr(L.K, "causal_softmax_fwd", lambda *a: calls.append(a) or kernel(*a))
    big = (L.layernorm_forward(x, w, b, 1e-5, save=False), L.gelu_forward(x * 4, save=False),
           L.attention_forward(q, k, v, pad=pad, save=False))
    assert calls, "the attention softmax did not run the kernel"
    for (s, s_cache), (g, g_cache) in ((small[0], big[0]), (small[2], big[2])):
        assert s_cache is None and g_cache is None and g.dtype == dtype and rel_err(g, s) < tol
    assert rel_err(big[1], small[1]) < max(tol, 1e-7)


@pytest.mark.parametrize("save", [True, False])
def test_tiled_attention_matches_materialised(rng, monkeypatch, save):
    """Long contexts run in tiles (memory linear in T); the result and gradients must not change."""
    B, H, T, D = 2, 2, 70, 4
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    up = rng.standard_normal((B, H, T, D))
    pad = np.array([0, 9])
    y_ref, cache_ref = L.attention_forward(q, k, v, pad=pad)
    assert cache_ref[0] is not None  # T = 70 is one tile of 128: the materialised path
    grads_ref = L.attention_backward(up, q, k, v, cache_ref)
    monkeypatch.setattr(L, "ATTN_TILE", 16)
    y, cache = L.attention_forward(q, k, v, pad=pad, save=save)
    assert rel_err(y, y_ref) < 1e-12
    if save:
        assert cache[0] is None  # nothing quadratic kept
        for g, g_ref in zip(L.attention_backward(up, q, k, v, cache), grads_ref):
            assert rel_err(g, g_ref) < 1e-12
    # a KV-cache continuation (q_offset > 0) through the tiles as well
    y2, _ = L.attention_forward(q[:, :, 50:], k, v, q_offset=50, pad=pad, save=save)
    assert rel_err(y2, y_ref[:, :, 50:]) < 1e-12
    # float32, as training runs it (NumPy's exp on unpadded tiles, the kernel's on padded ones)
    f = [a.astype(np.float32) for a in (q, k, v, up)]
    y32, cache32 = L.attention_forward(*f[:3], pad=pad, save=save)
    assert y32.dtype == np.float32 and rel_err(y32, y_ref) < 1e-5
    if save:
        for g, g_ref in zip(L.attention_backward(f[3], *f[:3], cache32), grads_ref):
            assert g.dtype == np.float32 and rel_err(g, g_ref) < 1e-5
