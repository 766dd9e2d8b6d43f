"""Zero-/few-shot evaluation: scoring math on models whose probabilities are known, the KV-cache
prefix reuse, prompts longer than the context, LAMBADA, exact match / F1, and bad data files."""
import json
import math

import numpy as np
import pytest

import npgpt.evaluate as E
from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.evaluate import (_split_template, choice_scores, continuation_logprobs, decode_escapes, eval_choice,
                            eval_generate, eval_lambada, log_softmax, read_choice_items, read_generate_items,
                            read_jsonl, read_lambada_items, token_f1)
from npgpt.model import GPT
from npgpt.tokenizer import Tokenizer

from conftest import run_cli

CHARS = " :abcdefghijklmnopqrstuvwxyzAQ\n.é"


def unigram_model(logits: dict[str, float], repeat: float = 0.0, block: int = 64) -> GPT:
    """A GPT whose next-token logits are `logits` (others -10), plus `repeat` on the current token.

    Blocks are identities (zero projections), wpe is 0 and wte the identity, so the final hidden state is
    the one-hot e_x of the current token; ln_f maps it to g * (e_x - 1/V) / s + bias with s its standard
    deviation, and g = repeat * s makes that bias + repeat * e_x up to a constant."""
    tok = Tokenizer.train_char([CHARS])
    V = tok.vocab_size
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=V, block_size=block, vocab_size=V)
    m = GPT(cfg, seed=0, tokenizer=tok)
    m.flat[:] = 0
    m.params["wte.weight"][...] = np.eye(V)
    m.params["ln_f.bias"][...] = -10.0
    for ch, z in logits.items():
        m.params["ln_f.bias"][tok.encode(ch)[0]] = z
    m.params["ln_f.weight"][...] = repeat * math.sqrt((1 / V) * (1 - 1 / V) + cfg.layer_norm_eps)
    return m


def lp_of(model, text, prev=None, repeat=0.0):
    """The known log-probability of each character of text (after the character `prev`)."""
    bias = model.params["ln_f.bias"].astype(np.float64)
    ids = model.tokenizer.encode(text)
    prevs = ([model.tokenizer.encode(prev)[0]] if prev else [None]) + ids[:-1]
    out = []
    for p, i in zip(prevs, ids):
        z = bias.copy()
        if p is not None:
            z[p] += repeat
        out.append(log_softmax(z)[i])
    return np.array(out)


def random_char_model(block=32, seed=1):
    """A small GPT with random weights: its predictions depend on the whole context."""
    tok = Tokenizer.train_char([CHARS])
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block, vocab_size=tok.vocab_size), seed=seed,
            tokenizer=tok)
    m.flat[:] *= 20
    return m


def test_unigram_model_is_what_we_think():
    m = unigram_model({"a": 2.0, "b": 1.0})
    lp = continuation_logprobs(m, m.tokenizer.encode("xyz"), [m.tokenizer.encode("ab")])[0]
    np.testing.assert_allclose(lp, lp_of(m, "ab"), atol=1e-5)
    m = unigram_model({"a": 2.0, "b": 1.0}, repeat=3.0)
    lp = continuation_logprobs(m, m.tokenizer.encode("xyb"), [m.tokenizer.encode("bba")])[0]
    np.testing.assert_allclose(lp, lp_of(m, "bba", prev="b", repeat=3.0), atol=1e-5)


def test_choice_normalisations_by_hand():
    lps = [np.log([0.5, 0.5]), np.log([0.3])]  # "xx" = 0.25 total, "y" = 0.3 total
    s = choice_scores(lps, ["xx", "y"], uncond=[np.log([0.5, 0.5]), np.log([0.9])])
    assert int(np.argmax(s["sum"])) == 1              # 0.25 < 0.3
    assert int(np.argmax(s["per_token"])) == 0        # 0.5 per token > 0.3
    assert s["per_char"][0] == pytest.approx(math.log(0.25) / 2)
    assert s["unconditional"] == pytest.approx([0.0, math.log(0.3 / 0.9)])
    assert int(np.argmax(s["unconditional"])) == 0
    # per character means characters (lm-evaluation-harness's len(choice)), not UTF-8 bytes
    assert choice_scores([np.log([0.5])], ["é"])["per_char"] == pytest.approx([math.log(0.5)])


def test_eval_choice_on_known_probabilities():
    R = 2.0  # the current character's logit is raised by R: conditional and unconditional scores differ
    m = unigram_model({"a": 3.0, "b": 0.0, "c": 1.0}, repeat=R)
    items = [
        {"context": "q:b", "choices": ["a", "b"], "label": 1},
        {"context": "q:c", "choices": ["c", "bb"], "label": 1},
        {"context": "q:a", "choices": ["ab", "c"], "label": 0},
    ]
    want = {k: [] for k in ("sum", "per_token", "per_char", "unconditional")}
    for it in items:
        prev = it["context"][-1]
        cond = [lp_of(m, c, prev, R) for c in it["choices"]]
        unc = [lp_of(m, c, ":", R) for c in it["choices"]]  # after "Answer:"
        scores = {"sum": [c.sum() for c in cond], "per_token": [c.mean() for c in cond],
                  "per_char": [c.sum() / len(t) for c, t in zip(cond, it["choices"])],
                  "unconditional": [c.sum() - u.sum() for c, u in zip(cond, unc)]}
        for k, v in scores.items():
            want[k].append(float(np.argmax(v) == it["label"]))
    r = eval_choice(m, items, unconditional=True)
    for k, v in want.items():
        assert r[f"acc_{k}"] == pytest.approx(np.mean(v)), k
    # the first item by hand: p(a | b) > p(b | b) (3 > 0 + R), so the sum picks "a"; but "b" gains most
    # over its probability after "Answer:", so the unconditional normalisation picks "b" (the label)
    assert want["sum"][0] == 0.0 and want["unconditional"][0] == 1.0
    assert r["n"] == 3 and r["shots"] == 0 and r["cropped"] == 0


def test_per_char_counts_characters_of_the_scored_text():
    """per_char divides by the characters of what was scored: the choice and the template's suffix."""
    m = unigram_model({"é": 1.0, "a": 1.5, "b": 1.5, ".": 3.0})
    le, la, lb, ld = (lp_of(m, ch)[0] for ch in "éab.")
    items = [{"context": "q:", "choices": ["é", "ab"], "label": 1}]
    # "é" is 2 UTF-8 bytes but 1 character: per byte would pick "é", per character picks "ab"
    assert le / 2 > (la + lb) / 2 and le / 1 < (la + lb) / 2
    assert eval_choice(m, items, unconditional=False)["acc_per_char"] == 1.0
    # the template's suffix ".." is scored, so it is counted: per character of "a.." vs "bbbb.." picks
    # "a"; dividing by the choice alone would pick "bbbb"
    items = [{"context": "q:", "choices": ["a", "bbbb"], "label": 0}]
    tail = 2 * ld
    assert (la + tail) / 3 > (4 * lb + tail) / 6 and (la + tail) / 1 < (4 * lb + tail) / 4
    assert eval_choice(m, items, template="{context}{choice}..", unconditional=False)["acc_per_char"] == 1.0


def test_kv_cache_prefix_reuse_equals_full_forward():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=20)
    m = GPT(cfg, seed=1)
    m.flat[:] *= 20
    prefix, conts = [1, 2, 3, 4], [[5, 6, 7], [8], [9, 10]]
    got = continuation_logprobs(m, prefix, conts)
    for c, lp in zip(conts, got):
        full = log_softmax(m.forward(np.array([prefix + c]))[0])
        np.testing.assert_allclose(lp, full[np.arange(len(prefix) - 1, len(prefix) + len(c) - 1), c], atol=1e-4)


def test_continuation_as_long_as_the_context():
    """A continuation of C tokens leaves block - C prompt tokens; C >= block is a clear error (the old
    slice prefix[-0:] kept the whole prefix, and the KV cache then overflowed)."""
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    m = GPT(cfg, seed=2)
    m.flat[:] *= 20
    prefix = [1, 2, 3, 4, 5]
    for cont in ([6, 7, 8, 9, 10, 11, 12], [6, 7, 8]):
        keep = prefix[-(8 - len(cont)):]
        lp = continuation_logprobs(m, prefix, [cont])[0]
        full = log_softmax(m.forward(np.array([keep + cont[:-1]]))[0])
        np.testing.assert_allclose(lp, full[np.arange(len(keep) - 1, len(keep) + len(cont) - 1), cont], atol=1e-4)
    for n in (8, 9):
        with pytest.raises(NpgptError, match=f"a continuation of {n} tokens does not fit the context"):
            continuation_logprobs(m, prefix, [[6], list(range(1, n + 1))])
    with pytest.raises(NpgptError, match="empty continuation"):
        continuation_logprobs(m, prefix, [[6], []])


def test_few_shot_prompt_uses_seeded_demonstrations(monkeypatch):
    """The demonstrations are drawn from the seed: the same seed gives the same scores, another seed
    other scores (this model's scores depend on the demonstrations in its context)."""
    m = random_char_model(block=64)
    items = [{"context": f"{c}:", "choices": ["a", "b"], "label": 0} for c in "defgh"]
    seen = []
    real = E.choice_scores
    monkeypatch.setattr(E, "choice_scores", lambda lps, *a: (seen.append([x.tolist() for x in lps]), real(lps, *a))[1])

    def scores(seed):
        seen.clear()
        r = eval_choice(m, items, shots=2, seed=seed)
        assert r["shots"] == 2 and r["cropped"] == 0
        return r, list(seen)

    (r1, s1), (r2, s2), (_, s3) = scores(3), scores(3), scores(4)
    assert r1 == r2 and s1 == s2
    assert s1 != s3
    with pytest.raises(NpgptError, match="demonstrations"):
        eval_choice(m, items, shots=5)


def test_eval_choice_crops_long_prompts_with_a_warning(capsys):
    m = unigram_model({"a": 3.0, "b": 2.0}, block=16)
    items = [{"context": "q" * n + ":", "choices": ["a", "b"], "label": 0} for n in (3, 30, 40)]
    r = eval_choice(m, items)
    assert r["cropped"] == 2 and r["acc_sum"] == 1.0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "line ?" in err and "does not fit the context (16" in err


def test_demonstrations_are_dropped_before_the_question_is_cropped(capsys, monkeypatch):
    """A few-shot prompt too long for the context loses whole demonstrations, oldest first."""
    m = unigram_model({"a": 5.0, "\n": 4.9}, block=48)
    items = [{"question": f"{c * 10}", "answers": ["aaaa"]} for c in "defgh"]
    prompts = []
    import npgpt.evaluate as E
    real = E.generate
    monkeypatch.setattr(E, "generate", lambda model, ids, *a, **k: (prompts.append(list(ids)), real(model, ids, *a, **k))[1])
    r = eval_generate(m, items, shots=4, max_new_tokens=4)  # 4 shots of 23 tokens + 16 do not fit 44
    assert r["exact_match"] == 1.0 and r["cropped"] == 5
    for it, p in zip(items, prompts):
        text = m.tokenizer.decode(p)
        assert len(p) <= 44 and text.startswith("Q: ") and text.endswith(f"Q: {it['question']}\nA:")
        assert text.count("Q: ") == 2  # one whole demonstration kept
    assert capsys.readouterr().err.count("warning:") == 1


@pytest.mark.parametrize("n", [62, 100])  # prompt (n + 6 tokens) longer than the context, with or without
def test_eval_generate_prompt_longer_than_the_context(n):  # room for the answer in the old slicing
    m = unigram_model({"a": 5.0, "\n": 4.9}, block=64)
    r = eval_generate(m, [{"question": "q" * n, "answers": ["aaaa"]}], max_new_tokens=4)
    assert r["exact_match"] == 1.0 and r["f1"] == 1.0 and r["cropped"] == 1


def test_lambada_word_likelihood_and_greedy_match(monkeypatch):
    m = unigram_model({"a": 5.0, "b": 4.0, " ": 3.0})
    items = [{"text": "x y z aa"}, {"text": "x y z ab"}]
    r = eval_lambada(m, items)
    assert r["acc"] == 0.0  # the target is " aa" (lm-eval's protocol): greedy says "a" where the space is
    la, lb, ls = (lp_of(m, ch)[0] for ch in "ab ")
    want = math.exp(-np.mean([ls + 2 * la, ls + la + lb]))
    assert r["perplexity"] == pytest.approx(want, rel=1e-5)
    assert r["cropped"] == 0
    # a passage longer than the context keeps its end, and is counted
    assert eval_lambada(m, [{"text": "x " * 40 + "aa"}])["cropped"] == 1
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
    with pytest.raises(NpgptError, match="3 shots requested but only 1 demonstrations"):
        eval_generate(m, [{"question": "q", "answers": ["a"]}, {"question": "r", "answers": ["b"]}], shots=3)


def test_templates():
    assert _split_template("qa") == ("Q: {context}\nA:", "")
    before, after = _split_template("{{x}} {context}:{choice} {{y}} {context}")
    assert before.format(context="c") == "{x} c:" and after.format(context="c") == " {y} c"
    for bad in ("{context}{choice}{x}", "{context}{choice}{", "{context}{choice}}", "{}{choice}", "{choice}",
                "{context}", "{context}{choice}{choice}", "{context:>3}{choice}", "{context!r}{choice}"):
        with pytest.raises(NpgptError, match="bad template"):
            _split_template(bad)


def test_separator_escapes():
    assert decode_escapes("\\n\\n") == "\n\n"
    assert decode_escapes("é — \\t|\\x41\\u00e9\\U0001F600|\\\\n") == "é — \t|Aé\U0001F600|\\n"
    for bad in ("\\x", "\\x4", "\\xzz", "\\q", "end\\", "\\ud800", "\\U00110000"):
        with pytest.raises(NpgptError, match="--separator"):
            decode_escapes(bad)


CHOICE = {"context": "x", "choices": ["a", "b"], "label": 0}


@pytest.mark.parametrize("content,match", [
    ('{"context": "x", "choices": ["a", "b"]}\n', r":1: missing field 'label'"),
    (json.dumps(CHOICE) + '\n{"context": "y", "choices": ["a", "b"], "label": 2}\n', r":2: label 2 is out of range"),
    ("", "no records"),
    ('{"context": "x"\n', ":1: not valid JSON"),
    ('{"context": "x", "choices": ["a", ""], "label": 0}\n', ":1: choice 1 is empty"),
    ('{"context": "x", "choices": [1, 2], "label": 0}\n', ":1: 'choices' must be a list of 2 or more strings"),
    ('{"context": "x", "choices": ["a", "b"], "label": true}\n', ":1: label must be an integer index"),
    ('{"context": 5, "choices": ["a", "b"], "label": 0}\n', ":1: 'context' must be a string"),
    ('{"context": "x", "choices": ["a", "b"], "label": 0, "demos": [{"context": "y", "choices": ["a", "b"], '
     '"label": 5}]}\n', ":1: demo 0: label 5 is out of range"),
    (json.dumps(CHOICE) + "\n" + "[" * 100_000 + "\n", ":2: JSON nested too deeply"),
    ('{"context": "\\ud800", "choices": ["a", "b"], "label": 0}\n', ":1: a string holds a lone surrogate"),
])
def test_bad_choice_files(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(NpgptError, match=match):
        read_choice_items(f)


def test_bad_files_and_items_in_the_library_calls(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(json.dumps(CHOICE).encode() + b"\n{\"context\": \"\xff\"}\n")
    with pytest.raises(NpgptError, match=":2: not valid UTF-8"):
        read_jsonl(f)
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHOICE).encode() + b"\n")  # a UTF-8 BOM is fine
    assert read_choice_items(f)[0]["context"] == "x"
    m = unigram_model({"a": 1.0})
    with pytest.raises(NpgptError, match="line 2: label 2 is out of range"):
        eval_choice(m, [dict(CHOICE, _line=1), dict(CHOICE, label=2, _line=2)])
    with pytest.raises(NpgptError, match="demonstration line 7: label 9 is out of range"):
        eval_choice(m, [CHOICE, CHOICE], demos=[dict(CHOICE, label=9, _line=7)], shots=1)
    with pytest.raises(NpgptError, match="line 1: a choice of 4 tokens does not fit the context"):
        eval_choice(unigram_model({"a": 1.0}, block=4), [dict(CHOICE, choices=["aaaa", "b"], _line=1)])
    with pytest.raises(NpgptError, match="seed must be"):
        eval_choice(m, [CHOICE, CHOICE], seed=-1)
    for content, match in [('{"question": "q", "answers": [1]}\n', ":1: 'answers' must be a non-empty list"),
                           ('{"answers": ["a"]}\n', ":1: missing field 'context' \\(or 'question'\\)"),
                           ('{"question": ["q"], "answers": ["a"]}\n', ":1: 'question' must be a string")]:
        f.write_text(content)
        with pytest.raises(NpgptError, match=match):
            read_generate_items(f)
    f.write_text('{"text": 5}\n')
    with pytest.raises(NpgptError, match=":1: a LAMBADA item needs a text"):
        read_lambada_items(f)


def test_cli_eval_choice_json_and_bad_file(tmp_path):
    from npgpt.checkpoint import save_checkpoint
    m = unigram_model({"a": 3.0, "b": 2.0})
    save_checkpoint(tmp_path / "m", m)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"context": "q:", "choices": ["a", "b"], "label": i % 2}) for i in range(4)))
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m", "--json", "--shots", "1", "--seed", "2",
                "--separator", "é\\n")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["acc_sum"] == 0.5 and d["shots"] == 1 and d["seed"] == 2 and "acc_sum_stderr" in d
    assert d["separator"] == "é\n" and d["cropped"] == 0
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m", "--separator", "\\x")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "--separator" in r.stderr
    data.write_text('{"context": "q:", "choices": ["a", "b"], "label": 0}\n')  # one item: no stderr
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m", "--json")

    def no_nan(c):
        raise ValueError(f"{c} is not JSON")
    assert r.returncode == 0 and json.loads(r.stdout, parse_constant=no_nan)["acc_sum_stderr"] is None
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m")
    assert r.returncode == 0 and "protocol:" in r.stdout
    data.write_text('{"context": "q:", "choices": ["a"], "label": 0}\n')
    r = run_cli("eval", "choice", data, "--model", tmp_path / "m")
    assert r.returncode == 1 and f"{data}:1:" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
