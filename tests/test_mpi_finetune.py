"""Data-parallel `npgpt finetune` and `npgpt sft` on MPI: two ranks make the updates of one process with
grad_accum 2, bit for bit (a sum of two gradients is exact), a fine-tuning resumes across rank counts,
and bad input is one line from rank 0. Without MPI: grad_accum K is the grad_accum 1 step to float
rounding. The MPI runs need mpi4py and mpiexec (`pip install -e '.[mpi]'`)."""
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npgpt
import npgpt.files as F
from npgpt.chat import add_chat_tokens
from npgpt.checkpoint import save_checkpoint
from npgpt.config import GPTConfig
from npgpt.finetune import FinetuneConfig, _open, _step, finetune
from npgpt.model import GPT
from npgpt.sft import SFTConfig, _step as sft_step, encode_demos, sft
from npgpt.tokenizer import Tokenizer

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.!,"
# 17 examples in steps of 8: the last step's single example leaves micro-batch 0 (rank 0's) empty
FT = dict(epochs=3, batch_size=8, learning_rate=1e-3, seed=1)          # lm_coef 0.5, clf_dropout 0.1
SFT = dict(epochs=2, batch_size=8, learning_rate=1e-3, val_fraction=0.25, seed=2)


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base model with dropout 0.1, a classify task of texts of 3-11 letters, demonstrations."""
    d = tmp_path_factory.mktemp("mpift")
    tok = Tokenizer.train_char([ALPHABET])
    save_checkpoint(d / "base", GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32,
                                              vocab_size=tok.vocab_size, dropout=0.1), seed=0, tokenizer=tok))
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abc dz"), int(rng.integers(3, 12)))) for _ in range(26)]
    recs = [{"text": t, "label": "yes" if "z" in t else "no"} for t in texts]
    write_jsonl(d / "train.jsonl", recs[:17])
    write_jsonl(d / "val.jsonl", recs[17:])
    words = ["cat", "dog", "sun", "tree", "big hill", "sea", "red fox", "moon"]
    write_jsonl(d / "demos.jsonl", [{"prompt": f"about {w}", "response": f"the {w} is {a}."}
                                    for w in words for a in ("nice", "far away")])
    return d


def launch(ranks, command, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`mpiexec -n RANKS npgpt COMMAND ARGS --threads 1`; env {rank: {VAR: value}} sets one rank apart
    (MPMD: one command per rank, joined by ':')."""
    cmd = [MPIEXEC]
    for i in range(ranks):
        cmd += [":"] if i else []
        cmd += ["-n", "1", *sum((["-env", k, str(v)] for k, v in (env or {}).get(i, {}).items()), [])]
        cmd += [sys.executable, "-m", "npgpt_cli.main", command, "--threads", "1", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def ft_args(d, out, **cfg):
    return ["--model", d / "base", "--task", "classify", "--train", d / "train.jsonl", "--val", d / "val.jsonl",
            "--out", out, "--quiet", *sum(([f"--{k}", v] for k, v in {**FT, **cfg}.items()), [])]


def alone_ft(d, out, **kw):
    """The fine-tuning in this process (one BLAS thread, as the ranks): Numba is warm here already."""
    npgpt.set_threads(1)
    return finetune(d / "base", "classify", d / "train.jsonl", d / "val.jsonl", out,
                    FinetuneConfig(**FT, grad_accum=2), quiet=True, **kw)


def history(out):
    return json.loads((out / "resume" / "config.json").read_text())["finetune"]["history"]


def same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


FT_FILES = ["model.safetensors", "head.safetensors", "resume/model.safetensors", "resume/head.safetensors",
            "resume/optim.safetensors", "resume/state.json"]


@pytest.fixture(scope="module")
def ft_reference(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftref") / "one"
    return out, alone_ft(files, out)


@needs_mpi
def test_finetune_on_two_ranks_is_one_process_bit_for_bit(files, ft_reference, tmp_path):
    """Dropout in the body and the head, the auxiliary LM loss, an empty micro-batch on rank 0 in each
    epoch's last step, small buckets sent while the backward goes on."""
    ref, r = ft_reference
    run = launch(2, "finetune", *ft_args(files, tmp_path / "two", grad_accum=2), "--bucket-mb", 0.002)
    assert run.returncode == 0, run.stderr
    assert history(tmp_path / "two") == r["epochs"]
    same_files(tmp_path / "two", ref, FT_FILES)
    assert run.stdout.count("best: epoch") == 1  # rank 0 alone reports


def crash_points_of_one_epoch(d, tmp_path) -> int:
    """Crash points one process passes in the first epoch, its steps' and its save's (files.crash_point)."""
    os.environ["NPGPT_CRASH_AT"] = "1000000000"
    F._crash_count = 0
    try:
        finetune(d / "base", "classify", d / "train.jsonl", d / "val.jsonl", tmp_path / "count",
                 FinetuneConfig(**{**FT, "epochs": 1}, grad_accum=2), quiet=True)
        return F._crash_count
    finally:
        del os.environ["NPGPT_CRASH_AT"]


@needs_mpi
@pytest.mark.parametrize("first", ["two ranks", "one process"])
def test_finetune_stopped_after_an_epoch_resumes_in_the_other_rank_count(files, ft_reference, tmp_path, first):
    """Killed at the first step of epoch 2 (SIGKILL at a crash point: on rank 1, which passes only the
    steps' points; in one process, after the first epoch's steps and save), then resumed by one process
    or by two ranks: the uninterrupted run's history, weights, head and optimizer state."""
    ref, r = ft_reference
    out = tmp_path / "run"
    steps = 3  # ceil(17 / 8)
    if first == "two ranks":
        run = launch(2, "finetune", *ft_args(files, out, grad_accum=2), env={1: {"NPGPT_CRASH_AT": steps + 1}},
                     timeout=60)
        assert run.returncode != 0
        assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 1
        got = alone_ft(files, out, resume=True)
    else:
        at = crash_points_of_one_epoch(files, tmp_path) + 1
        run = subprocess.run([sys.executable, "-m", "npgpt_cli.main", "finetune", "--threads", "1",
                              *map(str, ft_args(files, out, grad_accum=2))], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "NPGPT_CRASH_AT": str(at)})
        assert run.returncode != 0
        assert json.loads((out / "resume" / "state.json").read_text())["epoch"] == 1
        run = launch(2, "finetune", *ft_args(files, out), "--resume")
        assert run.returncode == 0, run.stderr
        assert "resuming after epoch 1" not in run.stderr  # --quiet
        got = {"epochs": history(out)}
    assert got["epochs"] == r["epochs"]
    same_files(out, ref, FT_FILES)


@needs_mpi
def test_sft_on_two_ranks_is_one_process_bit_for_bit(files, tmp_path):
    """Right-padded demonstrations of different lengths; micro-batches weighted by response tokens."""
    npgpt.set_threads(1)
    r = sft(files / "base", files / "demos.jsonl", tmp_path / "one", SFTConfig(**SFT, grad_accum=2), quiet=True)
    run = launch(2, "sft", "--model", files / "base", "--data", files / "demos.jsonl", "--out", tmp_path / "two",
                 "--quiet", "--grad_accum", 2, *sum(([f"--{k}", v] for k, v in SFT.items()), []))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["sft"]["history"] == r["epochs"]
    same_files(tmp_path / "two", tmp_path / "one", ["model.safetensors"])
    assert run.stdout.count("saved") == 1


@needs_mpi
def test_errors_are_one_line_from_rank_0(files, tmp_path):
    sft_args = ["--model", files / "base", "--data", files / "demos.jsonl", "--out", tmp_path / "sft"]
    for command, args in (("finetune", ft_args(files, tmp_path / "finetune")), ("sft", sft_args)):
        run = launch(2, command, *args, "--grad_accum", 3)
        assert run.returncode == 1 and run.stderr.count("Error:") == 1, run.stderr
        assert "multiple of the 2 ranks" in run.stderr and "Traceback" not in run.stderr
        assert not (tmp_path / command).exists()
    # a run saved with grad_accum 1 cannot be shared by two ranks: it says so, and leaves the run as it was
    npgpt.set_threads(1)
    finetune(files / "base", "classify", files / "train.jsonl", files / "val.jsonl", tmp_path / "one",
             FinetuneConfig(**{**FT, "epochs": 1}), quiet=True)
    before = (tmp_path / "one" / "resume" / "state.json").read_bytes()
    run = launch(2, "finetune", *ft_args(files, tmp_path / "one"), "--resume")
    assert run.returncode == 1 and run.stderr.count("Error:") == 1, run.stderr
    assert "grad_accum 1" in run.stderr and "Traceback" not in run.stderr
    assert (tmp_path / "one" / "resume" / "state.json").read_bytes() == before
    run = launch(2, "finetune", *ft_args(files, tmp_path / "one"), "--resume", "--force")
    assert run.returncode == 1 and run.stderr.count("Error:") == 1 and "not both" in run.stderr, run.stderr


# ---------------------------------------------------------------- without MPI: the normalisation
def rel_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_finetune_micro_batches_make_the_whole_batch_step(files, tmp_path):
    """One step's gradients (body and head) and loss with grad_accum 1, 2, 3 and 7 on 7 examples (micro-
    batches of unequal sizes and LM targets), without dropout: equal to float32 rounding."""
    npgpt.set_threads(1)
    base = npgpt.load(files / "base")
    save_checkpoint(tmp_path / "base", GPT(dataclasses.replace(base.config, dropout=0.0), base.flat.copy(),
                                           tokenizer=base.tokenizer))
    cfg = FinetuneConfig(**FT, clf_dropout=0.0)
    steps = {}
    for k in (1, 2, 3, 7):
        with contextlib.ExitStack() as held:
            run = _open(tmp_path / "base", "classify", files / "train.jsonl", files / "val.jsonl",
                        tmp_path / f"out{k}", dataclasses.replace(cfg, grad_accum=k), False, False, held, None)
        loss, grad, hgrad = _step(run, np.arange(7), None)
        steps[k] = loss, grad.copy(), hgrad.copy()
    loss, grad, hgrad = steps[1]
    for k in (2, 3, 7):
        assert steps[k][0] == pytest.approx(loss, rel=1e-6), k
        assert rel_diff(steps[k][1], grad) < 1e-5, k
        assert rel_diff(steps[k][2], hgrad) < 1e-5, k


def test_sft_micro_batches_make_the_whole_batch_step(files):
    """One SFT step's gradient and loss with grad_accum 1, 2, 3 and 6 on 6 demonstrations of different
    lengths (unequal response tokens per micro-batch), without dropout: equal to float32 rounding."""
    npgpt.set_threads(1)
    tok = Tokenizer.train_char([ALPHABET])
    model = add_chat_tokens(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size),
                                seed=0, tokenizer=tok))
    convs = [[{"role": "user", "content": "about " + w}, {"role": "assistant", "content": "the " + w + r}]
             for w, r in (("cat", "."), ("big hill", " is far."), ("sea", "!"), ("a red fox", " runs fast."),
                          ("moon", " is up."), ("dog", "."))]
    seqs, _ = encode_demos(model, convs)
    steps = {}
    for k in (1, 2, 3, 6):
        loss, grad = sft_step(model, seqs, k, np.random.default_rng(0), None)
        steps[k] = loss, grad.copy()
    for k in (2, 3, 6):
        assert steps[k][0] == pytest.approx(steps[1][0], rel=1e-6), k
        assert rel_diff(steps[k][1], steps[1][1]) < 1e-5, k


def test_grad_accum_larger_than_the_batch_is_refused():
    with pytest.raises(npgpt.NpgptError, match="grad_accum"):
        FinetuneConfig(batch_size=4, grad_accum=8)
    with pytest.raises(npgpt.NpgptError, match="grad_accum"):
        SFTConfig(batch_size=4, grad_accum=8)
