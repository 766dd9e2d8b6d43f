"""Sampling: batched prompts of different lengths, repetition penalty, stop strings, top-k / top-p."""
import io

import numpy as np
import pytest

from npgpt.config import GPTConfig
from npgpt.model import GPT
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
