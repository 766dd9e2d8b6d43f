"""Output dirs: every writer refuses a dir of another kind (even with --force), a dir of its own kind unless
--force, and --force never leaves old and new files mixed."""
import os

import numpy as np
import pytest

import npgpt
import npgpt.files as F
from npgpt.data import TokenData, prepare, save_tokenizer
from npgpt.errors import NpgptError
from npgpt.tokenizer import Tokenizer

from conftest import run_cli


@pytest.fixture(scope="module")
def dirs(shakespeare_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("guards")
    npgpt.train(shakespeare_data, d / "run", quiet=True,
                overrides=dict(n_layer=1, n_head=2, n_embd=16, block_size=16, max_iters=2, eval_interval=2, eval_iters=1))
    from npgpt.checkpoint import load_model, save_checkpoint
    save_checkpoint(d / "ckpt", load_model(d / "run"))
    save_tokenizer(Tokenizer.train_bpe(["hello there " * 50], 300), d / "tok")
    (d / "text.txt").write_text("hello there, general kenobi\n" * 200)
    return d


def snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and p.name != F.LOCK}


@pytest.mark.parametrize("target", ["run", "ckpt", "tok"])
def test_prepare_never_writes_into_another_kind_of_dir(dirs, target):
    before = snapshot(dirs / target)
    for force in (False, True):
        with pytest.raises(NpgptError, match="not prepared data"):
            prepare([dirs / "text.txt"], dirs / target, "char", force=force)
    assert snapshot(dirs / target) == before


def test_each_writer_refuses_a_data_dir(dirs, shakespeare_data, tmp_path):
    before = snapshot(shakespeare_data)
    text = dirs / "text.txt"
    with pytest.raises(NpgptError, match="holds prepared data, not a tokenizer"):
        save_tokenizer(Tokenizer.train_bpe(["abc"], 300), shakespeare_data, force=True)
    with pytest.raises(NpgptError, match="holds prepared data, not a training run"):
        npgpt.train(shakespeare_data, shakespeare_data, force=True, quiet=True)
    from npgpt.convert import quantize_model
    with pytest.raises(NpgptError, match="holds prepared data, not a model checkpoint"):
        quantize_model(dirs / "ckpt", shakespeare_data, force=True)
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    from npgpt.finetune import finetune
    with pytest.raises(NpgptError, match="holds prepared data, not a model checkpoint"):
        finetune(dirs / "ckpt", "classify", tmp_path / "t.jsonl", tmp_path / "t.jsonl", shakespeare_data, force=True)
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    from npgpt.sft import sft
    with pytest.raises(NpgptError, match="holds prepared data, not a model checkpoint"):
        sft(dirs / "ckpt", tmp_path / "d.jsonl", shakespeare_data, force=True)
    r = run_cli("tokenizer", "train", text, "--vocab-size", "300", "--out", shakespeare_data)
    assert r.returncode == 1 and "holds prepared data" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert snapshot(shakespeare_data) == before


def test_same_kind_needs_force_and_force_replaces_the_whole_set(dirs, tmp_path):
    text = dirs / "text.txt"
    prepare([text], tmp_path / "d", "char")
    with pytest.raises(NpgptError, match="already holds prepared data; use --force"):
        prepare([text], tmp_path / "d", "char")
    (tmp_path / "d" / "train.bin").write_bytes(b"")  # damage it, then overwrite with --force
    prepare([text], tmp_path / "d", "gpt2", force=True)
    d = TokenData(tmp_path / "d")
    assert d.tokenizer.kind == "gpt2" and d.dtype == np.uint16
    assert d.tokenizer.decode(d.tokens("train")[:3]).startswith("hello there")
    with pytest.raises(NpgptError, match="already holds a tokenizer; use --force"):
        save_tokenizer(Tokenizer.train_bpe(["abc"], 300), dirs / "tok")


def test_prepare_force_killed_at_any_point_leaves_one_consistent_set(dirs, tmp_path):
    """The bins, tokenizer and meta.json of a data dir switch together: never new ids next to the old
    vocabulary (here char -> gpt2, uint16 both, so a mix would pass every size check). --force removes
    the old set first, so after a crash the dir holds the new set or nothing."""
    text = dirs / "text.txt"
    out = tmp_path / "d"
    for n in range(1, 12):
        prepare([text], out, "char", force=True)
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["NPGPT_CRASH_AT"] = str(n)
                F._crash_count = 0
                prepare([text], out, "gpt2", force=True)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if F.dir_kind(out) is None:
            continue
        d = TokenData(out)  # a reader right after the crash reads through an unfinished switch
        assert d.tokenizer.kind == "gpt2"
        decoded = d.tokenizer.decode(d.tokens("train")[:40])
        assert decoded.startswith("hello there, general kenobi"), (n, d.tokenizer.kind, decoded)
        if not os.WIFSIGNALED(status):
            break
    else:
        pytest.fail("the crash points of prepare were not exhausted")


def test_predict_out_file_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text("precious\n")
    r = run_cli("predict", "--model", tmp_path / "nope", tmp_path / "x.jsonl", "--out", out)
    assert r.returncode == 1 and "--force" in r.stderr and out.read_text() == "precious\n"


def test_convert_and_export_refuse_other_kinds_of_dir(dirs, shakespeare_data, tmp_path):
    from pathlib import Path
    from npgpt.convert import convert_hf, export_hf
    hf = Path(__file__).parent / "fixtures" / "hf" / "l2h4c32"
    before = snapshot(shakespeare_data)
    with pytest.raises(NpgptError, match="holds prepared data, not a Hugging Face model"):
        export_hf(dirs / "ckpt", shakespeare_data, force=True)
    with pytest.raises(NpgptError, match="holds prepared data, not a model checkpoint"):
        convert_hf(hf, shakespeare_data, force=True)
    assert snapshot(shakespeare_data) == before
    export_hf(dirs / "ckpt", tmp_path / "hf")
    with pytest.raises(NpgptError, match="already holds a Hugging Face model; use --force"):
        export_hf(dirs / "ckpt", tmp_path / "hf")
    with pytest.raises(NpgptError, match="holds a Hugging Face model, not a model checkpoint"):
        convert_hf(hf, tmp_path / "hf", force=True)
    export_hf(dirs / "ckpt", tmp_path / "hf", force=True)
    convert_hf(tmp_path / "hf", tmp_path / "back")
    np.testing.assert_array_equal(npgpt.load(tmp_path / "back").flat, npgpt.load(dirs / "ckpt").flat)
