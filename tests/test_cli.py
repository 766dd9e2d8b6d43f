"""The command line: a real tour, and bad input -> one line on stderr, non-zero exit, nothing overwritten."""
import json

import pytest

from conftest import run_cli


def assert_clean_error(r, match):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_run(shakespeare_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    r = run_cli("train", "--data", shakespeare_data, "--out", out, "--n_layer", "1", "--n_head", "2", "--n_embd",
                "16", "--block_size", "16", "--max_iters", "3", "--eval_interval", "3", "--eval_iters", "1")
    assert r.returncode == 0, r.stderr
    assert "threads: BLAS" in r.stderr
    return out


def test_prepare_and_tokenizer_train(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello there, general kenobi\n" * 200)
    r = run_cli("tokenizer", "train", src, "--vocab-size", "300", "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    r = run_cli("prepare", src, "--out", tmp_path / "d", "--tokenizer", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 300
    r = run_cli("prepare", src, "--out", tmp_path / "d2", "--tokenizer", "gpt2", "--val-fraction", "0.2")
    assert r.returncode == 0 and json.loads((tmp_path / "d2" / "meta.json").read_text())["vocab_size"] == 50257


def test_generate_streams_and_reads_stdin(tiny_run):
    r = run_cli("generate", "ROMEO:", "--model", tiny_run, "-n", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) >= len("ROMEO:") + 20
    again = run_cli("generate", "ROMEO:", "--model", tiny_run, "-n", "20", "--seed", "1")
    assert again.stdout == r.stdout
    r = run_cli("generate", "-", "--model", tiny_run, "-n", "5", "--temperature", "0", input="JULIET:")
    assert r.returncode == 0 and r.stdout.startswith("JULIET:")
    r = run_cli("generate", "ab", "--model", tiny_run, "-n", "5", "--num-samples", "2", "--top-k", "5",
                "--top-p", "0.9", "--seed", "3")
    assert r.stdout.count("--- sample") == 2


def test_prompt_longer_than_context_is_cropped_with_warning(tiny_run):
    r = run_cli("generate", "a" * 40, "--model", tiny_run, "-n", "3")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "keeping the last 16" in r.stderr


def test_missing_empty_and_undecodable_corpus(tmp_path):
    assert_clean_error(run_cli("prepare", tmp_path / "nope.txt", "--out", tmp_path / "d"), "not found")
    (tmp_path / "empty.txt").write_text("")
    assert_clean_error(run_cli("prepare", tmp_path / "empty.txt", "--out", tmp_path / "d"), "empty")
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfedef")
    assert_clean_error(run_cli("prepare", tmp_path / "bin.txt", "--out", tmp_path / "d"), "not UTF-8")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args,match", [
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--n_lyer", "3"], "unknown key 'n_lyer'"),
    (["--n_layer", "three"], "expects int"),
    (["--preset", "gpt5"], "unknown preset"),
    (["--max_iters"], "has no value"),
])
def test_bad_training_config(shakespeare_data, tmp_path, args, match):
    r = run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "run", *args)
    assert_clean_error(r, match)
    assert not (tmp_path / "run").exists()


def test_bad_config_file(shakespeare_data, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"model": {"n_layer": 2, "bogus": 1}}))
    assert_clean_error(run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--config",
                               tmp_path / "c.json"), "unknown key 'bogus'")
    (tmp_path / "c.toml").write_text("n_layer = 'x'\n")
    assert_clean_error(run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--config",
                               tmp_path / "c.toml"), "expects int")


def test_existing_run_is_not_overwritten(shakespeare_data, tiny_run):
    before = (tiny_run / "model.safetensors").read_bytes()
    r = run_cli("train", "--data", shakespeare_data, "--out", tiny_run, "--max_iters", "2")
    assert_clean_error(r, "--resume")
    assert (tiny_run / "model.safetensors").read_bytes() == before


def test_bad_model_dirs(tiny_run, tmp_path):
    assert_clean_error(run_cli("generate", "x", "--model", tmp_path / "missing"), "not found")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("generate", "x", "--model", tmp_path / "empty"), "no config.json")
    import shutil
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_run, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[:len(data) - 100])
    assert_clean_error(run_cli("generate", "x", "--model", trunc), "truncated")
    mism = tmp_path / "mism"
    shutil.copytree(tiny_run, mism)
    cfg = json.loads((mism / "config.json").read_text())
    cfg["model"]["n_layer"] = 2
    (mism / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("generate", "x", "--model", mism), "do not match")


def test_resume_without_a_run(shakespeare_data, tmp_path):
    assert_clean_error(run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--resume"),
                       "nothing to resume")


def test_unknown_prompt_character(tiny_run):
    assert_clean_error(run_cli("generate", "日本", "--model", tiny_run, "-n", "2"), "vocabulary lacks")


def test_train_init_from_a_checkpoint(shakespeare_data, tiny_run, tmp_path):
    out = tmp_path / "more"
    r = run_cli("train", "--data", shakespeare_data, "--out", out, "--init", tiny_run, "--max_iters", "2",
                "--eval_iters", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model"]["n_embd"] == 16
    assert_clean_error(run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "x", "--init", tiny_run,
                               "--n_layer", "3"), "architecture")
    assert_clean_error(run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "y", "--init",
                               tmp_path / "missing"), "not found")
