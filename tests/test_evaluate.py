"""Zero-/few-shot evaluation: scoring math on a model whose probabilities are known, the KV-cache
prefix reuse, LAMBADA, exact match / F1, and bad data files."""
import json
import math

import numpy as np
import pytest

from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.evaluate import (choice_scores, continuation_logprobs, eval_choice, eval_generate, eval_lambada,
                            log_softmax, read_jsonl, token_f1)
from npgpt.model import GPT
from npgpt.tokenizer import Tokenizer

from conftest import run_cli

CHARS = " :abcdefghijklmnopqrstuvwxyzAQ\n."


def unigram_model(logits: dict[str, float]) -> GPT:
    """A GPT that ignores its context: blocks are identities (zero projections), ln_f outputs its bias,
    and wte is the identity, so every position's logits are exactly `logits` (others -10)."""
    tok = Tokenizer.train_char([CHARS])
    V = tok.vocab_size
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=V, block_size=64, vocab_size=V)
    m = GPT(cfg, seed=0, tokenizer=tok)
    m.flat[:] = 0
    m.params["wte.weight"][...] = np.eye(V)
    m.params["ln_f.bias"][...] = -10.0
    for ch, z in logits.items():
        m.params["ln_f.bias"][tok.encode(ch)[0]] = z
    return m


def lp_of(model, text):
    """The known log-probability of each character of text under a unigram model."""
    p = log_softmax(model.params["ln_f.bias"].astype(np.float64))
    return np.array([p[i] for i in model.tokenizer.encode(text)])


def test_unigram_model_is_what_we_think():
    m = unigram_model({"a": 2.0, "b": 1.0})
    lp = continuation_logprobs(m, m.tokenizer.encode("xyz"), [m.tokenizer.encode("ab")])[0]
    np.testing.assert_allclose(lp, lp_of(m, "ab"), atol=1e-5)


def test_choice_normalisations_by_hand():
    lps = [np.log([0.5, 0.5]), np.log([0.3])]  # "xx" = 0.25 total, "y" = 0.3 total
    s = choice_scores(lps, ["xx", "y"], uncond=[np.log([0.5, 0.5]), np.log([0.9])])
    assert int(np.argmax(s["sum"])) == 1              # 0.25 < 0.3
    assert int(np.argmax(s["per_token"])) == 0        # 0.5 per token > 0.3
    assert s["per_char"][0] == pytest.approx(math.log(0.25) / 2)
    assert s["unconditional"] == pytest.approx([0.0, math.log(0.3 / 0.9)])
    assert int(np.argmax(s["unconditional"])) == 0


def test_eval_choice_on_known_probabilities():
    m = unigram_model({"a": 3.0, "b": 2.0, "c": 0.0})
    items = [  # "aa" vs "b": sum prefers "b"? p(a)^2 vs p(b): decided by the numbers below
        {"context": "q:", "choices": ["aa", "b"], "label": 0},
        {"context": "q:", "choices": ["c", "bb"], "label": 1},
    ]
    la, lb, lc = (lp_of(m, ch)[0] for ch in "abc")
    want_sum = [float(2 * la > lb), float(2 * lb > lc)]
    want_tok = [float(la > lb), float(lb > lc)]
    r = eval_choice(m, items, unconditional=True)
    assert r["acc_sum"] == pytest.approx(np.mean(want_sum))
    assert r["acc_per_token"] == pytest.approx(np.mean(want_tok))
    assert r["n"] == 2 and r["shots"] == 0 and "acc_unconditional" in r
    # a unigram model's unconditional score is exactly 0 for every choice: argmax picks choice 0
    assert r["acc_unconditional"] == 0.5


def test_kv_cache_prefix_reuse_equals_full_forward():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=20)
    m = GPT(cfg, seed=1)
    m.flat[:] *= 20
    prefix, conts = [1, 2, 3, 4], [[5, 6, 7], [8], [9, 10]]
    got = continuation_logprobs(m, prefix, conts)
    for c, lp in zip(conts, got):
        full = log_softmax(m.forward(np.array([prefix + c]))[0])
        np.testing.assert_allclose(lp, full[np.arange(len(prefix) - 1, len(prefix) + len(c) - 1), c], atol=1e-4)


def test_few_shot_prompt_uses_seeded_demonstrations():
    m = unigram_model({"a": 1.0})
    items = [{"context": f"{c}:", "choices": ["a", "b"], "label": 0} for c in "defgh"]
    r1 = eval_choice(m, items, shots=2, seed=3)
    r2 = eval_choice(m, items, shots=2, seed=3)
    assert r1 == r2 and r1["shots"] == 2
    with pytest.raises(NpgptError, match="demonstrations"):
        eval_choice(m, items, shots=5)


def test_lambada_word_likelihood_and_greedy_match(monkeypatch):
    m = unigram_model({"a": 5.0, "b": 4.0, " ": 3.0})
    items = [{"text": "x y z aa"}, {"text": "x y z ab"}]
    r = eval_lambada(m, items)
    assert r["acc"] == 0.0  # the target is " aa" (lm-eval's protocol): greedy says "a" where the space is
    la, lb, ls = (lp_of(m, ch)[0] for ch in "ab ")
    want = math.exp(-np.mean([ls + 2 * la, ls + la + lb]))
    assert r["perplexity"] == pytest.approx(want, rel=1e-5)
    # a model that predicts exactly the target tokens scores a hit
    forced = iter([" aa", " ab"])

    def fake_forward(idx, **kw):
        word = m.tokenizer.encode(next(forced))
        logits = np.full((1, idx.shape[1], m.config.vocab_size), -5.0, np.float32)
        logits[0, np.arange(idx.shape[1] - len(word), idx.shape[1]), word] = 5.0
        return logits
    monkeypatch.setattr(m, "forward", fake_forward)
    assert eval_lambada(m, items)["acc"] == 1.0


def test_exact_match_and_f1():
    assert token_f1("The Eiffel tower", "eiffel tower") == 1.0
    assert token_f1("red car", "blue car") == pytest.approx(0.5)
    m = unigram_model({"a": 5.0, "\n": 4.9})
    r = eval_generate(m, [{"question": "q", "answers": ["aaaa", "zz"]}], max_new_tokens=4)
    assert r["exact_match"] == 1.0 and r["f1"] == 1.0  # greedy "aaaa" (newline never wins)


@pytest.mark.parametrize("content,match", [
    ('{"context": "x", "choices": ["a", "b"]}\n', r":1: missing field 'label'"),
    ('{"context": "x", "choices": ["a", "b"], "label": 0}\n{"context": "y", "choices": ["a", "b"], "label": 2}\n',
     "line 2: label 2 is out of range"),
    ("", "no records"),
    ('{"context": "x"\n', ":1: not valid JSON"),
])
def test_bad_data_files(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    m = unigram_model({"a": 1.0})
    with pytest.raises(NpgptError, match=match):
        eval_choice(m, read_jsonl(f, ("context", "choices", "label")))


def test_cli_eval_choice_json_and_bad_file(tmp_path):
    from npgpt.checkpoint import save_checkpoint
    m = unigram_model({"a": 3.0, "b": 2.0})
    save_checkpoint(tmp_path / "m", m)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"context": "q:", "choices": ["a", "b"], "label": i % 2}) for i in range(4)))
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m", "--json", "--shots", "1", "--seed", "2")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["acc_sum"] == 0.5 and d["shots"] == 1 and d["seed"] == 2 and "acc_sum_stderr" in d
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m")
    assert r.returncode == 0 and "protocol:" in r.stdout
    data.write_text('{"context": "q:", "choices": ["a"], "label": 0}\n')
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m")
    assert r.returncode != 0 and "line 1" in r.stderr and "Traceback" not in r.stderr
