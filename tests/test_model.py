"""The whole model: parameter gradient vs finite differences, causality, gradient accumulation, KV cache,
dtypes."""
import numpy as np
import pytest

from npgpt.config import GPTConfig, preset
from npgpt.errors import NpgptError
from npgpt.model import GPT, KVCache
from npgpt.params import num_params, param_shapes
from npgpt.sampling import generate

from conftest import numeric_grad


def tiny(ln="pre", **kw):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11, ln=ln), **kw})


@pytest.mark.parametrize("ln,bias", [("pre", True), ("post", True), ("pre", False)])
def test_model_gradient_matches_finite_differences(ln, bias):
    m = GPT(tiny(ln, bias=bias), dtype=np.float64, seed=1)
    m.flat[:] = np.random.default_rng(0).standard_normal(m.flat.size) * 0.3  # move away from the init
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    tgt[0, 2] = -1
    m.zero_grad()
    m.loss(idx, tgt)
    m.backward()
    num = numeric_grad(lambda: m.loss(idx, tgt), m.flat)
    err = np.abs(m.grad - num).max() / np.abs(num).max()
    assert err < 1e-6, err
    # and every tensor individually gets gradient (ln_f only exists in pre-LN)
    for name, g in m.grads.items():
        assert np.abs(g).max() > 0, name


def test_nano_preset_gradient_check_float64():
    cfg = preset("nano")
    m = GPT(cfg, dtype=np.float64, seed=3)
    rng = np.random.default_rng(2)
    idx, tgt = rng.integers(0, cfg.vocab_size, (2, 5)), rng.integers(0, cfg.vocab_size, (2, 5))
    m.zero_grad()
    m.loss(idx, tgt)
    m.backward()
    # spot-check 200 random coordinates of the full gradient
    coords = rng.choice(m.flat.size, 200, replace=False)
    num = numeric_grad(lambda: m.loss(idx, tgt), m.flat, coords)
    assert np.abs(num - m.grad[coords]).max() < 1e-6 * max(1.0, np.abs(m.grad).max())


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_causality(ln):
    cfg = tiny(ln, block_size=10, vocab_size=13)
    m = GPT(cfg, seed=4)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 13, (1, 10))
    base = m.forward(idx)
    for t in range(9):
        changed = idx.copy()
        changed[0, t + 1:] = (changed[0, t + 1:] + 1 + rng.integers(0, 12, 9 - t)) % 13
        out = m.forward(changed)
        np.testing.assert_array_equal(out[0, :t + 1], base[0, :t + 1])
        assert not np.allclose(out[0, t + 1:], base[0, t + 1:])


def test_gradient_accumulation_equals_big_batch():
    cfg = tiny(block_size=8, vocab_size=17)
    rng = np.random.default_rng(5)
    idx, tgt = rng.integers(0, 17, (6, 8)), rng.integers(0, 17, (6, 8))
    big = GPT(cfg, dtype=np.float64, seed=9)
    big.zero_grad()
    big.loss(idx, tgt)
    big.backward()
    acc = GPT(cfg, dtype=np.float64, seed=9)
    acc.zero_grad()
    k = 3
    for i in range(k):
        acc.loss(idx[2 * i:2 * i + 2], tgt[2 * i:2 * i + 2])
        acc.backward(1.0 / k)
    np.testing.assert_allclose(acc.grad, big.grad, rtol=1e-10, atol=1e-13)


def test_float32_stays_float32():
    cfg = tiny()
    m = GPT(cfg, seed=0)
    assert m.flat.dtype == np.float32
    idx = np.zeros((2, 8), np.int64)
    assert m.forward(idx).dtype == np.float32
    m.zero_grad()
    m.loss(idx, idx)
    m.backward()
    assert m.grad.dtype == np.float32
    cache = KVCache(cfg, 2)
    assert m.forward(idx[:, :3], kv=cache).dtype == np.float32


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_kv_cache_logits_equal_full_forward(ln):
    cfg = tiny(ln, block_size=12, vocab_size=19)
    m = GPT(cfg, seed=6)
    idx = np.random.default_rng(7).integers(0, 19, (3, 12))
    full = m.forward(idx)
    cache = KVCache(cfg, 3)
    parts = [m.forward(idx[:, :5], kv=cache)]
    for t in range(5, 12):
        parts.append(m.forward(idx[:, t:t + 1], kv=cache))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_decode_step_equals_the_layer_by_layer_forward(bias):
    """One new token per row of a small model goes through kernels.decode_layer (a whole block in one
    kernel) and decode_head; in float64 it must equal the uncached forward to rounding, with left
    padding and without biases. A large model keeps the layer-by-layer path."""
    cfg = tiny("pre", block_size=12, vocab_size=19, bias=bias)
    m = GPT(cfg, seed=6, dtype=np.float64)
    assert m.fused_decode
    m.flat[:] += np.random.default_rng(0).standard_normal(m.flat.size) * 0.1  # non-trivial LN weights, biases
    idx = np.random.default_rng(7).integers(0, 19, (3, 12))
    pad = np.array([0, 3, 5])
    full = m.forward(idx, pad=pad)
    cache = KVCache(cfg, 3)
    cache.pad = pad
    parts = [m.forward(idx[:, :6], kv=cache)] + [m.forward(idx[:, t:t + 1], kv=cache) for t in range(6, 12)]
    got = np.concatenate(parts, axis=1)
    for b in range(3):
        np.testing.assert_allclose(got[b, pad[b]:], full[b, pad[b]:], rtol=1e-12, atol=1e-12)
    assert not GPT(tiny("pre", n_embd=512, n_head=8), seed=0).fused_decode
    assert not GPT(tiny("post"), seed=0).fused_decode


def test_cached_and_uncached_greedy_generation_identical():
    cfg = tiny(block_size=16, vocab_size=23, n_embd=16)
    m = GPT(cfg, seed=8)
    prompt = [1, 2, 3, 4]
    a = generate(m, prompt, 30, temperature=0, use_cache=True)  # runs past the context: window slides
    b = generate(m, prompt, 30, temperature=0, use_cache=False)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 1 and a[0].shape == (34,)


def test_dropout_only_in_training():
    cfg = tiny(dropout=0.5)
    m = GPT(cfg, seed=0)
    idx = np.random.default_rng(0).integers(0, 11, (2, 8))
    assert m.loss(idx, idx) == m.loss(idx, idx)
    a = m.loss(idx, idx, train=True, rng=np.random.default_rng(1))
    b = m.loss(idx, idx, train=True, rng=np.random.default_rng(2))
    assert a != b


def test_param_count_gpt2_124m_and_hf_names():
    assert num_params(preset("gpt2-124m")) == 124_439_808
    names = [n for n, _ in param_shapes(preset("nano"))]
    assert names[:4] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"]
    assert "h.1.mlp.c_proj.weight" in names and names[-1] == "ln_f.bias"
    assert "ln_f.weight" not in [n for n, _ in param_shapes(preset("gpt1"))]


def test_init_statistics():
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=100)
    m = GPT(cfg, seed=0)
    assert abs(m.params["h.0.mlp.c_fc.weight"].std() - 0.02) < 0.002
    assert abs(m.params["h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(8)) < 0.001
    assert np.all(m.params["h.0.ln_1.weight"] == 1) and np.all(m.params["h.0.attn.c_attn.bias"] == 0)


def test_bad_token_ids_and_too_long_input():
    m = GPT(tiny(), seed=0)
    with pytest.raises(NpgptError, match="out of range"):
        m.forward([[0, 11]])
    with pytest.raises(NpgptError, match="exceeds the context"):
        m.forward(np.zeros((1, 9), np.int64))


def test_logprobs_objective_gradient_matches_finite_differences():
    """backward(dlogp=w) is the gradient of sum(w * logprobs): what SFT masks, DPO and PPO build on."""
    m = GPT(tiny(), dtype=np.float64, seed=2)
    m.flat[:] = np.random.default_rng(3).standard_normal(m.flat.size) * 0.3
    rng = np.random.default_rng(4)
    idx, tgt = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    tgt[1, :2] = -1
    w = rng.standard_normal((2, 6))  # weights of either sign, as advantages are
    lp = m.logprobs(idx, tgt)
    assert np.all(lp[1, :2] == 0) and np.all(lp[tgt >= 0] < 0)
    # the same numbers as the mean loss
    assert abs(-lp.sum() / (tgt >= 0).sum() - m.loss(idx, tgt)) < 1e-12
    m.zero_grad()
    m.logprobs(idx, tgt)
    m.backward(dlogp=w)
    num = numeric_grad(lambda: float((w * m.logprobs(idx, tgt)).sum()), m.flat)
    assert np.abs(m.grad - num).max() / np.abs(num).max() < 1e-6


def test_features_gradient_matches_finite_differences():
    """features() + backward(dhidden=...) trains scalar heads without the LM head."""
    m = GPT(tiny(ln="post"), dtype=np.float64, seed=5)
    rng = np.random.default_rng(6)
    idx = rng.integers(0, 11, (2, 5))
    u = rng.standard_normal((2, 5, 8))
    m.zero_grad()
    h = m.features(idx)
    m.backward(dhidden=u)
    num = numeric_grad(lambda: float((u * m.features(idx)).sum()), m.flat)
    assert h.shape == (2, 5, 8)
    assert np.abs(m.grad - num).max() / np.abs(num).max() < 1e-6
    assert np.all(m.grads["wte.weight"][idx.max() + 1:] == 0)  # only the embedding rows used
