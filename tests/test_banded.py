"""GPT-3's locally banded attention: query i sees keys max(0, i - w + 1) .. i. Against a masked dense
reference (tiled and materialised paths, padding, a KV-cache offset), the off-by-one edges, float64
finite differences through a "BD" model, cached decode past the window, and an exact resume."""
import json

import numpy as np
import pytest

import npgpt
import npgpt.layers as L
from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.model import GPT, KVCache

from conftest import numeric_grad


def reference(q, k, v, q_offset, window, pad=None):
    """Dense attention with an explicit mask, in float64: the definition."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    s = np.einsum("bhid,bhjd->bhij", q, k).astype(np.float64) / np.sqrt(D)
    i = q_offset + np.arange(Tq)[:, None]
    j = np.arange(Tk)[None, :]
    keep = (j <= i) & ((j >= i - window + 1) if window else True)
    keep = keep[None, None] & (j >= (np.zeros(B, int) if pad is None else pad)[:, None, None, None])
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("T,window,q_offset,tile", [(10, 3, 0, 128), (10, 3, 0, 4), (13, 5, 4, 4), (12, 1, 0, 4),
                                                    (9, 4, 0, 3), (12, 12, 0, 4), (12, 30, 0, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_banded_attention_equals_the_masked_dense_reference(monkeypatch, T, window, q_offset, tile, padded):
    monkeypatch.setattr(L, "ATTN_TILE", tile)
    rng = np.random.default_rng(T * 100 + window)
    q = rng.standard_normal((2, 2, T - q_offset, 4))
    k, v = rng.standard_normal((2, 2, T, 4)), rng.standard_normal((2, 2, T, 4))
    pad = np.array([0, 2]) if padded else None
    with np.errstate(invalid="ignore"):
        want = reference(q, k, v, q_offset, window, pad)
    real = q_offset + np.arange(T - q_offset)[None, :] >= (pad if padded else np.zeros(2, int))[:, None]
    for save in (True, False):
        got, cache = L.attention_forward(q, k, v, q_offset, pad=pad, save=save, window=window)
        for b in range(2):  # a padding column's query has no key: its output is 0, the reference's NaN
            np.testing.assert_allclose(got[b][:, real[b]], want[b][:, real[b]], rtol=1e-12, atol=1e-12)
    # gradients of the tiled / materialised paths against finite differences of the forward
    up = rng.standard_normal(got.shape)
    got, cache = L.attention_forward(q, k, v, q_offset, pad=pad, window=window)
    grads = L.attention_backward(up, q, k, v, cache)
    for x, g in zip((q, k, v), grads):
        num = numeric_grad(lambda: float((L.attention_forward(q, k, v, q_offset, pad=pad, window=window)[0]
                                          * up).sum()), x)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7)


def test_the_band_edge_is_i_minus_w_plus_1_inclusive():
    """Query i sees key i - w + 1 and not key i - w: a value planted at one key moves exactly the
    outputs of the queries whose band holds it."""
    T, w, key = 12, 4, 5
    q = np.zeros((1, 1, T, 2))  # equal scores: each output is the mean of the visible values
    k = np.zeros((1, 1, T, 2))
    v = np.zeros((1, 1, T, 2))
    v[0, 0, key] = 1.0
    y, _ = L.attention_forward(q, k, v, window=w)
    moved = [i for i in range(T) if y[0, 0, i, 0] != 0]
    assert moved == list(range(key, key + w))  # i - w + 1 <= key <= i


def model(pattern="BD", window=3, T=10, dtype=np.float64, **kw):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=T, vocab_size=11, attn_window=window,
                    attn_pattern=pattern, **kw)
    m = GPT(cfg, seed=1, dtype=dtype)
    m.flat[:] += np.random.default_rng(0).standard_normal(m.flat.size).astype(dtype) * 0.1
    return m


@pytest.mark.parametrize("tile", [128, 4])
def test_bd_model_gradient_matches_finite_differences(monkeypatch, tile):
    monkeypatch.setattr(L, "ATTN_TILE", tile)
    m = model()
    assert [m.config.window(l) for l in range(2)] == [3, 0]
    x = np.random.default_rng(1).integers(0, 11, (2, 10))
    y = np.roll(x, -1, axis=1)
    m.zero_grad()
    m.loss(x, y)
    m.backward()
    coords = np.random.default_rng(2).choice(m.flat.size, 80, replace=False)
    num = numeric_grad(lambda: m.loss(x, y), m.flat, coords)
    np.testing.assert_allclose(m.grad[coords], num, rtol=1e-5, atol=1e-8)


def test_a_band_as_wide_as_the_context_is_dense_bit_for_bit():
    dense, banded = model("D", 0), model("B", 10)
    x = np.random.default_rng(3).integers(0, 11, (2, 10))
    np.testing.assert_array_equal(banded.forward(x), dense.forward(x))
    narrow = model("B", 3)
    assert not np.allclose(narrow.forward(x), dense.forward(x))  # and a narrower one is not


@pytest.mark.parametrize("n_embd", [8, 1024])  # fused decode kernels (small) and the layer-by-layer path
def test_cached_decode_past_the_window_equals_the_uncached_forward(n_embd):
    m = model("BD", 3, T=14) if n_embd == 8 else \
        GPT(GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=14, vocab_size=11, attn_window=3,
                      attn_pattern="BD"), seed=1, dtype=np.float64)
    assert m.fused_decode == (n_embd == 8)
    idx = np.random.default_rng(4).integers(0, 11, (2, 14))
    pad = np.array([0, 2])
    full = m.forward(idx, pad=pad)
    cache = KVCache(m.config, 2)
    cache.pad = pad
    parts = [m.forward(idx[:, :4], kv=cache)] + [m.forward(idx[:, t:t + 1], kv=cache) for t in range(4, 14)]
    got = np.concatenate(parts, axis=1)
    for b in range(2):
        np.testing.assert_allclose(got[b, pad[b]:], full[b, pad[b]:], rtol=1e-10, atol=1e-10)


def test_config_checks_and_presets():
    for bad in ({"attn_window": -1}, {"attn_pattern": ""}, {"attn_pattern": "BX"}):
        with pytest.raises(NpgptError, match="attn_"):
            GPTConfig(**bad).validate()
    g = npgpt.preset("gpt3-125m")
    assert (g.attn_window, g.attn_pattern) == (256, "BD") and [g.window(l) for l in range(4)] == [256, 0, 256, 0]
    assert npgpt.preset("gpt2-124m").window(0) == 0


def test_a_trained_bd_model_resumes_exactly(shakespeare_data, tmp_path):
    over = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, attn_window=5, attn_pattern="BD", batch_size=4,
                eval_iters=1, eval_interval=4, warmup_iters=2, learning_rate=3e-3, dropout=0.1,
                lr_decay_iters=8)  # the same schedule whether the run is told 4 or 8 steps
    npgpt.set_threads(1)
    ref = npgpt.train(shakespeare_data, tmp_path / "ref", overrides={**over, "max_iters": 8}, quiet=True)
    npgpt.train(shakespeare_data, tmp_path / "run", overrides={**over, "max_iters": 4}, quiet=True)
    got = npgpt.train(shakespeare_data, tmp_path / "run", overrides={**over, "max_iters": 8}, resume=True,
                      quiet=True)
    np.testing.assert_array_equal(got.flat, ref.flat)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["attn_window"] == 5 and saved["model"]["attn_pattern"] == "BD"


def test_a_banded_layer_caches_only_its_window_in_a_ring():
    m = model("BD", 3, T=14)
    ring = KVCache(m.config, 2)
    assert [k.shape[2] for k in ring.k] == [3, 14] and [v.shape[2] for v in ring.v] == [3, 14]
    assert [k.shape[2] for k in KVCache(m.config, 2, ring=False).k] == [14, 14]
    assert [k.shape[2] for k in KVCache(m.config, 2, length=3).k] == [3, 3]  # a band as wide as the room: dense


@pytest.mark.parametrize("chunks", [(5, 3, 1, 1, 4), (1,) * 14, (2, 7, 5)])
def test_ring_cache_chunked_forward_equals_the_full_forward(chunks):
    """Prefill and continue in chunks of several tokens: each chunk's queries need the ring's older keys
    in order, the chunk's own keys, and the ring rewritten with the newest w."""
    m = model("BD", 3, T=14)
    idx = np.random.default_rng(6).integers(0, 11, (2, 14))
    pad = np.array([0, 1])
    full = m.forward(idx, pad=pad)
    cache = KVCache(m.config, 2)
    cache.pad = pad
    parts, t = [], 0
    for n in chunks:
        parts.append(m.forward(idx[:, t:t + n], kv=cache))
        t += n
    got = np.concatenate(parts, axis=1)
    for b in range(2):
        np.testing.assert_allclose(got[b, pad[b]:], full[b, pad[b]:], rtol=1e-10, atol=1e-10)


def test_generation_and_scoring_of_a_banded_model_past_the_window():
    from npgpt.evaluate import continuation_logprobs, log_softmax
    from npgpt.sampling import generate
    m = model("BD", 3, T=24, dtype=np.float32)
    m.flat[:] *= 10
    a = generate(m, [[1, 2, 3], [4]], 18, temperature=0)
    b = generate(m, [[1, 2, 3], [4]], 18, temperature=0, use_cache=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    prefix, conts = [1, 2, 3, 4, 5, 6], [[5, 6, 7, 8], [8], [9, 10]]  # rewinds past a window of 3
    for c, lp in zip(conts, continuation_logprobs(m, prefix, conts)):
        full = log_softmax(m.forward(np.array([prefix + c]))[0])
        np.testing.assert_allclose(lp, full[np.arange(len(prefix) - 1, len(prefix) + len(c) - 1), c], atol=1e-4)


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_a_quantized_banded_model_decodes_past_the_window(tmp_path, fmt):
    from npgpt.checkpoint import save_checkpoint
    from npgpt.convert import quantize_model
    from npgpt.sampling import generate
    m = model("BD", 3, T=24, dtype=np.float32)
    save_checkpoint(tmp_path / "fp32", m)
    quantize_model(tmp_path / "fp32", tmp_path / fmt, format=fmt)
    q = npgpt.load(tmp_path / fmt)
    assert q.config.attn_pattern == "BD" and q.fused_decode  # the fused kernels, a banded layer's ring
    x = np.random.default_rng(5).integers(0, 11, (1, 20))
    cache = KVCache(q.config, 1)
    parts = [q.forward(x[:, :4], kv=cache)] + [q.forward(x[:, t:t + 1], kv=cache) for t in range(4, 20)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), q.forward(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q.forward(x), m.forward(x), atol=0.05 if fmt == "int8" else 2e-3)
    a = generate(q, [1, 2], 16, temperature=0)[0]
    assert len(a) == 18
