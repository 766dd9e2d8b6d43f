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
    return out


def test_train_prints_the_thread_counts(shakespeare_data, tmp_path):
    r = run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--preset", "nano", "--max_iters", "1",
                "--eval_iters", "1", "--threads", "1")
    assert r.returncode == 0 and "threads: BLAS 1, Numba kernels 1" in r.stderr, r.stderr


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
    assert_clean_error(run_cli("prepare", tmp_path / "bin.txt", "--out", tmp_path / "d"), "not valid UTF-8")
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


# ---------------------------------------------------------------- bad settings, prompts, env, OS errors
def invoke(*args, input=None, env=None):
    """Run the CLI in this process (fast; no interpreter start): a click Result with .stdout/.stderr."""
    from click.testing import CliRunner

    from npgpt_cli.main import cli
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def assert_refused(res, match, code=1):
    """A one-line error (click usage errors add their 'Usage:' lines), no traceback, nothing on stdout."""
    assert isinstance(res.exception, SystemExit) and res.exit_code == code, (res.exception, res.output)
    assert res.stdout == "", res.stdout  # refused before the prompt was echoed
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and match in errors[0], res.stderr
    if code == 1:
        assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr


@pytest.fixture(scope="module")
def gpt2_kind_model(tmp_path_factory):
    from npgpt.convert import convert_hf
    from test_hf import FIX
    return convert_hf(FIX / "l2h4c32", tmp_path_factory.mktemp("g2") / "g2")


@pytest.mark.parametrize("args,match", [
    (["-t", "nan"], "'nan' is not a finite number"),
    (["--temperature", "inf"], "'inf' is not a finite number"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--seed", "-1"], "--seed"),
])
def test_generate_refuses_bad_settings_before_echo(tiny_run, args, match):
    assert_refused(invoke("generate", "ROMEO:", "--model", tiny_run, "-n", "3", *args), match, code=2)


def test_generate_refuses_an_empty_stop_string(tiny_run):
    assert_refused(invoke("generate", "ROMEO:", "--model", tiny_run, "-n", "3", "--stop", ""), "stop strings")


def test_special_token_text_in_a_prompt_is_plain_text(gpt2_kind_model):
    # "<|endoftext|>" in a prompt is seven ordinary tokens, so generation does not see an end of text
    res = invoke("generate", "a<|endoftext|>b", "--model", gpt2_kind_model, "-n", "2", "-t", "0")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("a<|endoftext|>b")


@pytest.mark.parametrize("model", ["tiny_run", "gpt2_kind_model"])
def test_undecodable_prompt_bytes_are_one_line_before_echo(request, model):
    m = request.getfixturevalue(model)
    # Python hands the undecodable byte 0xff of argv over as the surrogate escape U+DCFF
    assert_refused(invoke("generate", "ab\udcffcd", "--model", m, "-n", "2"), "not valid UTF-8")
    assert_refused(invoke("generate", "-", "--model", m, "-n", "2", input=b"ab\xffcd"), "stdin is not valid UTF-8")
    assert_refused(invoke("generate", "ab\udcffcd", "--model", m, "--chat"), "")  # no chat tokens, or bad UTF-8


def test_undecodable_argv_in_a_real_process(gpt2_kind_model):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "npgpt_cli.main", "generate", b"ab\xffcd", "--model",
                        os.fsencode(gpt2_kind_model), "-n", "2"], capture_output=True, text=True, timeout=300)
    assert_clean_error(r, "not valid UTF-8: undecodable byte 0xff")
    assert r.stdout == ""


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_npgpt_threads_is_one_line(tiny_run, value):
    assert_refused(invoke("generate", "x", "--model", tiny_run, "-n", "1", env={"NPGPT_THREADS": value}),
                   f"NPGPT_THREADS must be a positive integer, got '{value}'")


def test_negative_seeds_are_refused_everywhere(tiny_run, shakespeare_data, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n')
    (tmp_path / "g.jsonl").write_text('{"question": "a", "answers": ["b"]}\n')
    for cmd in (["eval", "choice", tmp_path / "c.jsonl"], ["eval", "generate", tmp_path / "g.jsonl"]):
        assert_refused(invoke(*cmd, "--model", tiny_run, "--seed", "-1"), "--seed", code=2)
    res = invoke("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--seed", "-1")
    assert_refused(res, "seed must be an integer >= 0")


def test_os_errors_are_one_line_with_the_path():
    import errno

    import click

    from npgpt_cli.main import _Group

    @click.group(cls=_Group)
    def g():
        pass

    @g.command()
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")

    @g.command()
    def moved():
        raise OSError(errno.EROFS, "Read-only file system", "out/.x.tmp", None, "out/x")  # a rename

    from click.testing import CliRunner
    res = CliRunner().invoke(g, ["full"])
    assert res.exit_code == 1 and res.stderr == "Error: out/model.safetensors: No space left on device\n"
    res = CliRunner().invoke(g, ["moved"])
    assert res.exit_code == 1 and res.stderr == "Error: out/.x.tmp -> out/x: Read-only file system\n"


def test_a_real_os_error_is_one_line(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello there\n" * 50)
    # a path under a regular file: mkdir fails with ENOTDIR (root ignores permissions, this it cannot)
    assert_clean_error(run_cli("prepare", src, "--out", src / "sub"), str(src / "sub"))


def test_a_write_past_the_file_size_limit_is_one_line_and_leaves_no_file(tmp_path):
    # RLIMIT_FSIZE makes write() fail with EFBIG (Python ignores SIGXFSZ), like a disk filling up
    import resource
    import subprocess
    import sys
    src = tmp_path / "a.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 3000)  # 132 kB of uint16 tokens

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    r = subprocess.run([sys.executable, "-m", "npgpt_cli.main", "prepare", str(src), "--out", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert_clean_error(r, "File too large")
    left = sorted(p.name for p in (tmp_path / "d").iterdir()) if (tmp_path / "d").exists() else []
    assert not [n for n in left if n.endswith(".tmp") or n.endswith(".bin")], left
