"""GPT-1 fine-tuning: input transformations, head and multiple-choice gradients against finite
differences, learning a task, predict, bad data."""
import json

import numpy as np
import pytest

import npgpt
from npgpt.checkpoint import save_checkpoint
from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.finetune import (SPECIALS, TaskHead, add_special_tokens, encode_example, finetune, predict,
                            read_task_file, step_loss, FinetuneConfig, load_finetuned)
from npgpt.model import GPT
from npgpt.tokenizer import Tokenizer

from conftest import numeric_grad, run_cli

ALPHABET = "abcdefghijklmnopqrstuvwxyz ?."


def tiny(dtype=np.float32, seed=0):
    tok = Tokenizer.train_char([ALPHABET])
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=24, vocab_size=tok.vocab_size)
    return add_special_tokens(GPT(cfg, seed=seed, dtype=dtype, tokenizer=tok), SPECIALS)


def test_special_tokens_extend_the_vocabulary():
    tok = Tokenizer.train_char([ALPHABET])
    base = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=tok.vocab_size), seed=1,
               tokenizer=tok)
    model, ids = add_special_tokens(base, SPECIALS)
    V = tok.vocab_size
    assert sorted(ids.values()) == [V, V + 1, V + 2] and model.config.vocab_size == V + 3
    np.testing.assert_array_equal(model.params["wte.weight"][:V], base.params["wte.weight"])
    x = np.array([[1, 2, 3]])
    np.testing.assert_allclose(model.forward(x)[..., :V], base.forward(x), atol=1e-6)  # old logits unchanged
    assert model.tokenizer.tk.token_to_id("<|extract|>") == ids["<|extract|>"]  # (text never encodes to it)


def test_input_transformations():
    model, ids = tiny()
    S, D, E = (ids[s] for s in SPECIALS)
    enc = model.tokenizer.encode
    assert encode_example(model, "classify", {"text": "ab"}, ids) == [[S] + enc("ab") + [E]]
    assert encode_example(model, "entail", {"premise": "ab", "hypothesis": "c"}, ids) == [[S] + enc("ab") + [D] + enc("c") + [E]]
    assert encode_example(model, "similar", {"a": "ab", "b": "c"}, ids) == [[S] + enc("ab") + [D] + enc("c") + [E],
                                                                           [S] + enc("c") + [D] + enc("ab") + [E]]
    seqs = encode_example(model, "choice", {"context": "q", "choices": ["x", "yz"]}, ids)
    assert seqs == [[S] + enc("q") + [D] + enc("x") + [E], [S] + enc("q") + [D] + enc("yz") + [E]]
    long = encode_example(model, "classify", {"text": "abcdefghijklmnopqrstuvwxyz"}, ids)[0]
    # 22 tokens of room: the first 5 (a quarter) and the last 17, the middle dropped
    assert long == [S] + enc("abcde") + enc("jklmnopqrstuvwxyz") + [E] and len(long) == 24
    fits = encode_example(model, "classify", {"text": "abcdefghijklmnopqrstuv"}, ids)[0]
    assert fits == [S] + enc("abcdefghijklmnopqrstuv") + [E]  # exactly the room: nothing cut
    ctx = encode_example(model, "choice", {"context": "abcdefghijklmnopqrstuvwxyz", "choices": ["x"]}, ids)[0]
    assert ctx == [S] + enc("ghijklmnopqrstuvwxyz") + [D] + enc("x") + [E]  # a context is cut from the left


@pytest.mark.parametrize("task,examples,labels", [
    ("classify", [{"text": "ab c"}, {"text": "ba"}, {"text": "cab a"}], [0, 1, 2]),
    ("entail", [{"premise": "ab c", "hypothesis": "ca"}, {"premise": "b", "hypothesis": "abc"}], [2, 0]),
    ("similar", [{"a": "ab", "b": "c"}, {"a": "b", "b": "ac"}], [1, 0]),
    ("choice", [{"context": "q", "choices": ["x", "yz", "z"]}, {"context": "qq", "choices": ["a", "b", "cc"]}], [2, 0]),
])
def test_gradients_of_head_and_body_match_finite_differences(task, examples, labels):
    model, ids = tiny(np.float64, seed=3)
    model.flat[:] += np.random.default_rng(0).standard_normal(model.flat.size) * 0.1
    head = TaskHead(16, 1 if task == "choice" else 3, seed=1, dtype=np.float64, std=0.5)
    enc = [encode_example(model, task, ex, ids) for ex in examples]
    y = np.array(labels)

    def total():
        return step_loss(model, head, task, enc, y, lm_coef=0.5, train=False)[0]

    model.zero_grad()
    head.grad.fill(0)
    step_loss(model, head, task, enc, y, lm_coef=0.5, train=True, rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    for flat, grad, idx in ((head.flat, head.grad, np.arange(head.flat.size)),
                            (model.flat, model.grad, rng.choice(model.flat.size, 60, replace=False))):
        num = numeric_grad(total, flat, idx)
        assert np.abs(num - grad[idx]).max() < 1e-6 * max(1.0, np.abs(grad).max()), task


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def synthetic_sentiment(n, seed):
    """Label 1 when the text contains 'z', else 0."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = ["".join(rng.choice(list("abcdefg"), 3)) for _ in range(3)]
        label = int(rng.random() < 0.5)
        if label:
            words[rng.integers(0, 3)] = "zzz"
        out.append({"text": " ".join(words), "label": ["neg", "pos"][label]})
    return out


def test_finetune_learns_a_task_and_predicts(tmp_path):
    model, _ = tiny()
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=model.tokenizer.vocab_size - 3),
               seed=0, tokenizer=Tokenizer.train_char([ALPHABET]))
    save_checkpoint(tmp_path / "base", base)
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_sentiment(192, 0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_sentiment(64, 1))
    cfg = FinetuneConfig(learning_rate=2e-3, batch_size=16, epochs=6, clf_dropout=0.0)
    r = finetune(tmp_path / "base", "classify", train, val, tmp_path / "ft", cfg, quiet=True)
    assert r["best"]["val_acc"] >= 0.9, r
    assert r["best"]["val_f1"] is not None
    preds = predict(tmp_path / "ft", val)
    acc = np.mean([p["prediction"] == ex["label"] for p, ex in zip(preds, synthetic_sentiment(64, 1))])
    assert acc == pytest.approx(r["best"]["val_acc"])
    assert set(preds[0]["probabilities"]) == {"neg", "pos"}
    res = run_cli("predict", "--model", tmp_path / "ft", val)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 64, res.stderr


@pytest.mark.parametrize("content,task,match", [
    ('{"text": "ab"}\n', "classify", None),  # labels are optional for predict files
    ('{"label": 1}\n', "classify", r":1: missing field 'text'"),
    ('{"context": "q", "choices": ["a", "b"], "label": 3}\n', "choice", r":1: label 3 is out of range"),
    ("", "classify", "no records"),
    ('{"text": 5, "label": "a"}\n', "classify", r":1: field 'text' must be a string"),
    ('{"text": "a", "label": [1]}\n', "classify", r":1: label must be a non-empty string or an integer"),
    ('{"context": "q", "choices": [1, 2], "label": 0}\n', "choice", r":1: choices must be a list of 2 or more strings"),
    ('{"context": "q", "choices": ["a", ""], "label": 0}\n', "choice", r":1: choice 1 is empty"),
    ('{"context": "q", "choices": ["a", "b"], "label": true}\n', "choice", r":1: label must be an integer index"),
    ('{"context": "q", "choices": ["a", "b"], "label": 0}\n{"context": "q", "choices": ["a", "b", "c"], "label": 0}\n',
     "choice", r":2: 3 choices, but line 1 has 2"),
    ('{"premise": "a", "hypothesis": "\\udc80", "label": 0}\n', "entail", r":1: a string holds a lone surrogate"),
])
def test_bad_task_files(tmp_path, content, task, match):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    if match is None:
        assert read_task_file(f, task)[0]["text"] == "ab"
    else:
        with pytest.raises(NpgptError, match=match):
            read_task_file(f, task)


def test_training_files_need_labels(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"context": "q", "choices": ["a", "b"], "label": 1},
                                          {"context": "q", "choices": ["a", "b"]}])
    assert len(read_task_file(f, "choice")) == 2  # a prediction file
    with pytest.raises(NpgptError, match=r"d.jsonl:2: missing field 'label'"):
        read_task_file(f, "choice", labelled=True)
    # finetune reads its files before it loads the model (the old code crashed on y_train with a KeyError)
    with pytest.raises(NpgptError, match=r"d.jsonl:2: missing field 'label'"):
        finetune(tmp_path / "no-model", "choice", f, f, tmp_path / "out")


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.tsv").write_text("premise\thypothesis\tlabel\nab\tc\tyes\n")
    assert read_task_file(tmp_path / "d.tsv", "entail")[0]["hypothesis"] == "c"
    (tmp_path / "d.csv").write_text("context,choice0,choice1,label\nq,a,b,1\n")
    assert read_task_file(tmp_path / "d.csv", "choice")[0]["choices"] == ["a", "b"]
    (tmp_path / "d.csv").write_text('text,label\n"a, \nb",x\n\nc,\n')  # quoted newline, blank line, no label
    assert read_task_file(tmp_path / "d.csv", "classify") == [{"text": "a, \nb", "label": "x", "_line": 3},
                                                             {"text": "c", "_line": 5}]


def test_csv_choice_columns_in_numeric_order(tmp_path):
    """choice10 sorts before choice2 by name; the label indexes the columns by their number."""
    header = "context," + ",".join(f"choice{i}" for i in range(11)) + ",label\n"
    (tmp_path / "d.csv").write_text(header + "q," + ",".join(f"ans{i}" for i in range(11)) + ",2\n")
    r = read_task_file(tmp_path / "d.csv", "choice")[0]
    assert r["choices"] == [f"ans{i}" for i in range(11)] and r["choices"][r["label"]] == "ans2"


@pytest.mark.parametrize("content,match", [
    ("context,choice0,choice1,label\nq,,b,1\n", r"d.csv:2: choice 0 is empty"),  # was dropped: labels shifted
    ("context,choice0,choice1,label\nq,a,b,1,EXTRA\n", r"d.csv:2: 5 fields, but the header has 4"),
    ("context,choice0,choice1,label\nq,a,b\n", r"d.csv:2: 3 fields, but the header has 4"),
    ("context,choice0,choice2,label\nq,a,b,1\n", r"choice0, choice1, \.\.\. .*found choice0, choice2"),
    ("context,choice0,choice1,label\nq,a,b,1_0\n", r"d.csv:2: label must be an integer index"),
    ("context,choice0,choice0,label\nq,a,b,1\n", r"d.csv:1: column 'choice0' appears twice"),
])
def test_bad_csv_choice_files(tmp_path, content, match):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(NpgptError, match=match):
        read_task_file(tmp_path / "d.csv", "choice")
    (tmp_path / "d.csv").write_bytes(b"text,label\nab,x\n\xff,y\n")
    with pytest.raises(NpgptError, match=r"d.csv:3: not valid UTF-8"):
        read_task_file(tmp_path / "d.csv", "classify")


def test_cli_finetune_bad_data_names_the_line(tmp_path):
    tok = Tokenizer.train_char([ALPHABET])
    save_checkpoint(tmp_path / "base", GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16,
                                                     vocab_size=tok.vocab_size), seed=0, tokenizer=tok))
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "ab", "label": "x"}, {"text": "ba", "label": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ab", "label": "x"}\n{"txt": "ba", "label": "y"}\n')
    r = run_cli("finetune", "--model", tmp_path / "base", "--task", "classify", "--train", bad, "--val", good,
                "--out", tmp_path / "ft")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and ":2: missing field 'text'" in r.stderr
    r = run_cli("finetune", "--model", tmp_path / "base", "--task", "classify", "--train", good, "--val", good,
                "--out", tmp_path / "ft", "--epochs", "1", "--bogus", "1")
    assert r.returncode != 0 and "unknown key 'bogus'" in r.stderr
    r = run_cli("finetune", "--model", tmp_path / "base", "--task", "classify", "--train", good, "--val", good,
                "--out", tmp_path / "ft", "--epochs", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["finetune"]["labels"] == ["x", "y"]


def test_cli_finetune_scratch_is_the_same_network_with_fresh_weights(tmp_path):
    """--scratch keeps --model's architecture and tokenizer and draws the weights from the seed, as
    GPT(config, seed) does: the control arm of GPT-1's comparison."""
    tok = Tokenizer.train_char([ALPHABET])
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=tok.vocab_size)
    base = GPT(cfg, seed=0, tokenizer=tok)
    base.flat[:] = 0.5  # far from any random init
    save_checkpoint(tmp_path / "base", base)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab", "label": "x"}, {"text": "ba", "label": "y"}])
    cfg_ft = FinetuneConfig(epochs=1, learning_rate=1e-12, scratch=True, seed=7)
    finetune(tmp_path / "base", "classify", data, data, tmp_path / "ft", cfg_ft, quiet=True)
    got = npgpt.load(tmp_path / "ft")
    fresh, _ = add_special_tokens(GPT(cfg, seed=7, tokenizer=tok), SPECIALS, 7)
    assert got.config == fresh.config and got.tokenizer.same_vocab(fresh.tokenizer)
    np.testing.assert_allclose(got.flat, fresh.flat, atol=1e-6)  # lr ~0: still the seeded init
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["finetune"]["scratch"] is True
    r = run_cli("finetune", "--model", tmp_path / "base", "--task", "classify", "--train", data, "--val", data,
                "--out", tmp_path / "ft2", "--epochs", "1", "--learning_rate", "1e-12", "--seed", "7", "--scratch",
                "--quiet")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(npgpt.load(tmp_path / "ft2").flat, got.flat)


def test_finetune_killed_anywhere_resumes_to_the_same_result(tmp_path):
    """A fine-tuning killed at random points (between steps, inside the end-of-epoch save) and resumed
    with --resume ends with the uninterrupted run's history, weights and head; resuming a finished run
    changes nothing, and a dir without a fine-tuning state is refused."""
    import os
    import signal
    import npgpt.files as F
    tok = Tokenizer.train_char([ALPHABET])
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "base", GPT(cfg, seed=0, tokenizer=tok))
    rng = np.random.default_rng(0)
    recs = [{"text": "".join(rng.choice(list("abc d"), 6)), "label": "xy"[i % 2]} for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    ft = FinetuneConfig(epochs=3, batch_size=8, learning_rate=1e-3, seed=1)
    npgpt.set_threads(1)
    ref = finetune(tmp_path / "base", "classify", data, data, tmp_path / "ref", ft, quiet=True)

    def killed_at(n, out):
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["NPGPT_CRASH_AT"] = str(n)
                F._crash_count = 0
                finetune(tmp_path / "base", "classify", data, data, out, ft, quiet=True)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    os.environ["NPGPT_CRASH_AT"] = "1000000000"  # count the crash points of a whole run
    F._crash_count = 0
    try:
        finetune(tmp_path / "base", "classify", data, data, tmp_path / "count", ft, quiet=True)
        points = F._crash_count
    finally:
        del os.environ["NPGPT_CRASH_AT"]
    resumed = 0
    for trial, n in enumerate(np.random.default_rng(0).integers(1, points + 1, size=12)):
        out = tmp_path / f"t{trial}"
        assert killed_at(n, out)
        if not (out / "resume").is_dir() and not (out / F.COMMIT / "resume").is_dir():
            continue  # killed before the first epoch ended: nothing to resume, a fresh start is right
        resumed += 1
        got = finetune(tmp_path / "base", "classify", data, data, out, quiet=True, resume=True)
        assert got == ref, f"trial {trial}, crash point {n}"
        a, b = npgpt.load(out), npgpt.load(tmp_path / "ref")
        np.testing.assert_array_equal(a.flat, b.flat)
        np.testing.assert_array_equal(load_finetuned(out)[1].flat, load_finetuned(tmp_path / "ref")[1].flat)
    assert resumed >= 4, (resumed, points)
    again = finetune(tmp_path / "base", "classify", data, data, tmp_path / "ref", quiet=True, resume=True)
    assert again == ref
    with pytest.raises(NpgptError, match="nothing to resume"):
        finetune(tmp_path / "base", "classify", data, data, tmp_path / "empty", quiet=True, resume=True)
    r = run_cli("finetune", "--model", tmp_path / "base", "--task", "classify", "--train", data, "--val", data,
                "--out", tmp_path / "ref", "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
