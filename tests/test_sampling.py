"""Sampling: batched prompts of different lengths, repetition penalty, stop strings, top-k / top-p."""
import io

import numpy as np
import pytest

from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.model import GPT, KVCache
from npgpt.sampling import TextStream, cut_at_stop, generate, sample_next
from npgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=30)
    m = GPT(cfg, seed=3)
    m.flat[:] *= 10  # sharper distributions than the init, so greedy choices are well separated
    m.tokenizer = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz .,\n"])
    return m


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_lengths_equals_one_by_one(model, use_cache):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    batch = generate(model, prompts, 30, temperature=0, use_cache=use_cache)  # runs past the context too
    for p, got in zip(prompts, batch):
        alone = generate(model, p, 30, temperature=0)[0]
        np.testing.assert_array_equal(got, alone)
        assert len(got) == len(p) + 30


def test_past_the_context_a_full_window_keeps_its_newest_half(model):
    """The definition: token n is predicted from out[start:n], where start moves to n - block // 2
    whenever the window would exceed the context (block 24: windows of 12..24 tokens)."""
    block, keep = model.config.block_size, model.config.block_size // 2
    prompt = [3, 1, 4, 1, 5]
    got = generate(model, prompt, 60, temperature=0)[0]
    start, windows = 0, set()
    for n in range(len(prompt), len(got)):
        if n - start > block:
            start = n - keep
        windows.add(n - start)
        assert model.forward(got[None, start:n])[0, -1].argmax() == got[n], n
    assert keep in windows and max(windows) == block  # shifted at least once
    np.testing.assert_array_equal(generate(model, prompt, 60, temperature=0, use_cache=False)[0], got)


def test_padding_is_invisible_to_logits(model):
    a = model.forward([[5, 6, 7]])
    b = model.forward([[0, 0, 5, 6, 7]], pad=np.array([2]))
    np.testing.assert_allclose(b[:, 2:], a, rtol=1e-5, atol=1e-5)


def test_repetition_penalty():
    rng = np.random.default_rng(0)
    logits = np.array([[2.0, 1.9, -1.0], [-0.1, -0.2, -5.0]])
    seen = np.array([[True, False, False], [True, False, False]])
    assert sample_next(logits, rng, 0).tolist() == [0, 0]
    assert sample_next(logits, rng, 0, seen=seen, repetition_penalty=2.5).tolist() == [1, 1]
    assert sample_next(logits, rng, 0, seen=seen, repetition_penalty=1.0).tolist() == [0, 0]


def test_repetition_penalty_in_generation_avoids_repeats(model):
    plain = generate(model, [1], 20, temperature=0)[0][1:]
    penal = generate(model, [1], 20, temperature=0, repetition_penalty=50.0)[0][1:]
    assert len(set(penal.tolist())) > len(set(plain.tolist()))


def test_top_k_and_top_p_restrict_support():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_next(logits, rng, 1.0, top_k=2)[0]) for _ in range(300)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, rng, 1.0, top_p=0.85)[0]) for _ in range(300)}
    assert draws == {0, 1, 2}
    assert {int(sample_next(logits, rng, 1.0, top_p=0.4)[0]) for _ in range(50)} == {0}


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, "abc", 15, temperature=1.0, seed=5)
    b = generate(model, "abc", 15, temperature=1.0, seed=5)
    c = generate(model, "abc", 15, temperature=1.0, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_stop_strings_end_rows_early(model):
    full = model.tokenizer.decode(generate(model, "ab", 20, temperature=0)[0][2:])
    stop = full[5:7]
    out = generate(model, "ab", 20, temperature=0, stop=[stop])[0]
    text = model.tokenizer.decode(out[2:])
    assert text.endswith(stop) and stop not in text[:-1] and len(out) < 22
    assert cut_at_stop(text, [stop]) == full[:full.find(stop)]


def test_text_stream_holds_back_partial_stop(model):
    buf = io.StringIO()
    stream = TextStream(model, out=buf, stop=["xyz"])
    for ch in "abxyc d xyzef":
        stream(np.array([model.tokenizer.encode(ch)[0]]))
    stream.close()
    assert buf.getvalue() == "abxyc d "


def test_eos_stops_a_row(model):
    first = generate(model, [1, 2], 10, temperature=0)[0]
    eos = int(first[4])
    out = generate(model, [[1, 2], [3]], 10, temperature=0, eos_id=eos)
    assert out[0].tolist() == first[:5].tolist()


# ---------------------------------------------------------------- bad settings (A7, C)
BAD_SETTINGS = [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
]


@pytest.mark.parametrize("kw,match", BAD_SETTINGS)
def test_non_finite_and_out_of_range_settings_are_refused(model, kw, match):
    with pytest.raises(NpgptError, match=match):
        sample_next(np.zeros((1, 4)), np.random.default_rng(0), **{"temperature": 1.0, **kw})
    calls = []
    with pytest.raises(NpgptError, match=match):
        generate(model, [1, 2], 3, on_token=calls.append, **kw)
    assert calls == []  # refused before any token is made


@pytest.mark.parametrize("kw,match", [(dict(stop=[""]), "stop"), (dict(stop=["a", ""]), "stop"),
                                      (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
                                      (dict(max_new_tokens=-1), "max_new_tokens")])
def test_empty_stop_and_negative_seed_are_refused(model, kw, match):
    with pytest.raises(NpgptError, match=match):
        generate(model, "ab", **{"max_new_tokens": 5, **kw})


def test_top_p_one_keeps_everything_and_draws_follow_the_distribution():
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    rng = np.random.default_rng(1)
    draws = np.array([int(sample_next(logits, rng, 1.0, top_p=1.0)[0]) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 2000, [0.7, 0.2, 0.1], atol=0.04)


def test_top_k_keeps_exactly_k_when_values_tie():
    # five tokens tie at the top: top_k=2 must keep two of them (the lower ids), not all five
    logits = np.array([[0.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0]])
    rng = np.random.default_rng(0)
    draws = {int(sample_next(logits, rng, 1.0, top_k=2)[0]) for _ in range(400)}
    assert draws == {1, 2}
    rows = np.array([[3.0, 3.0, 3.0], [1.0, 2.0, 2.0]])
    assert {tuple(sample_next(rows, rng, 1.0, top_k=1).tolist()) for _ in range(50)} == {(0, 1)}


def test_extreme_finite_settings_still_sample_valid_tokens():
    rng = np.random.default_rng(0)
    logits = np.array([[1.0, 3.0, -2.0, 2.5], [0.0, 5e10, -5e10, 0.0]])
    seen = np.ones_like(logits, bool)
    # a tiny temperature is greedy (was inf - inf = NaN -> token 0); a huge one is near-uniform
    assert sample_next(logits[:1], rng, 1e-320).tolist() == [1]
    assert {int(sample_next(logits[:1], rng, 1e300)[0]) for _ in range(200)} == {0, 1, 2, 3}
    # a huge penalty must not overflow the negative logits to -inf or NaN
    for pen in (1e-300, 1e300):  # 5e10 / 1e-300 and -5e10 * 1e300 overflow float64
        out = sample_next(logits, rng, 1.0, seen=seen, repetition_penalty=pen)
        assert out.shape == (2,) and np.all((0 <= out) & (out < 4))
    # masked tokens (-inf) are never drawn
    masked = np.array([[-np.inf, 0.0, -np.inf]])
    assert {int(sample_next(masked, rng, 1.0)[0]) for _ in range(50)} == {1}


def test_nan_logits_are_an_error_not_token_zero():
    with pytest.raises(NpgptError, match="NaN or infinite"):
        sample_next(np.array([[np.nan, 1.0]]), np.random.default_rng(0), 1.0)
    with pytest.raises(NpgptError, match="NaN or infinite"):
        sample_next(np.array([[-np.inf, -np.inf]]), np.random.default_rng(0), 1.0)


def test_kv_cache_follows_a_float64_model():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=19)
    m = GPT(cfg, seed=2, dtype=np.float64)
    idx = np.random.default_rng(3).integers(0, 19, (2, 12))
    cache = KVCache(cfg, 2)
    parts = [m.forward(idx[:, :5], kv=cache)] + [m.forward(idx[:, t:t + 1], kv=cache) for t in range(5, 12)]
    assert cache.dtype == np.float64 and parts[-1].dtype == np.float64
    # float64 end to end: equal to the uncached forward far below float32 resolution (was ~1e-7)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), m.forward(idx), rtol=1e-12, atol=1e-12)
    assert KVCache(cfg, 1, dtype=np.float32).dtype == np.float32
