"""The training loop: learning, exact resume after SIGKILL, non-finite loss, refusing to overwrite."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import npgpt
from npgpt.errors import NpgptError

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, eval_iters=2, learning_rate=3e-3,
             warmup_iters=5)


def step_losses(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def test_training_reduces_loss_and_writes_a_checkpoint(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    model = npgpt.train(shakespeare_data, out, overrides={**SMALL, "max_iters": 60, "eval_interval": 30},
                        quiet=True)
    losses = step_losses(out)
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    for f in ("config.json", "model.safetensors", "tokenizer.json", "optim.safetensors", "state.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["n_embd"] == 32 and cfg["train"]["max_iters"] == 60 and cfg["tokenizer"]["kind"] == "char"
    loaded = npgpt.load(out)
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(loaded.forward(idx), model.forward(idx))


def test_resume_after_sigkill_matches_uninterrupted_run(shakespeare_data, tmp_path):
    """A real, asynchronous SIGKILL at a random moment of the run (tests/test_crash.py injects kills at
    chosen points, inside checkpoint writes too)."""
    args = ["--data", shakespeare_data, "--quiet", "--max_iters", "150", "--eval_interval", "30",
            "--ckpt_interval", "15"] + [f"--{k}={v}" for k, v in SMALL.items()] + ["--dropout", "0.1"]
    # a fixed thread count: under the default policy another npgpt job starting or ending on the machine
    # changes the BLAS threads mid-run, and OpenBLAS's sums (so the last bits of a run) depend on them
    args += ["--threads", "1"]
    cmd = [sys.executable, "-m", "npgpt_cli.main", "train"]
    full = tmp_path / "full"
    subprocess.run(cmd + ["--out", full] + args, check=True, timeout=300)
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd + ["--out", part] + args)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not step_losses_or_empty(part):
        time.sleep(0.01)
    time.sleep(np.random.default_rng().uniform(0, 0.5))  # somewhere in the run, wherever that is
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd + ["--out", part, "--resume"] + args, check=True, timeout=300)
    assert step_losses(part) == step_losses(full)
    assert json.loads((part / "state.json").read_text())["step"] == 150


def step_losses_or_empty(run):
    try:
        return step_losses(run)
    except (OSError, ValueError):
        return []


def test_non_finite_loss_stops_and_keeps_last_checkpoint(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    npgpt.train(shakespeare_data, out, overrides={**SMALL, "max_iters": 4, "eval_interval": 2}, quiet=True)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NpgptError, match=r"at step \d+"):
        npgpt.train(shakespeare_data, out, overrides={"max_iters": 50, "learning_rate": 1e38, "warmup_iters": 1,
                                                      "grad_clip": 0.0, "min_lr": 1e38},
                    resume=True, quiet=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / "state.json").read_text())["step"] == 4


def test_refuses_existing_run_without_resume_or_force(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    npgpt.train(shakespeare_data, out, overrides={**SMALL, "max_iters": 2, "eval_interval": 2}, quiet=True)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(NpgptError, match="--resume"):
        npgpt.train(shakespeare_data, out, overrides={**SMALL, "max_iters": 2}, quiet=True)
    assert (out / "model.safetensors").read_bytes() == before
    npgpt.train(shakespeare_data, out, overrides={**SMALL, "max_iters": 3, "eval_interval": 3}, force=True,
                quiet=True)
    assert json.loads((out / "state.json").read_text())["step"] == 3


def test_grad_accumulation_run_equals_big_batch_run(shakespeare_data, tmp_path):
    """In float32 too: two micro-batches of 4 with weight 1/2 sum to the gradient of the batch of 8."""
    from npgpt.data import TokenData
    from npgpt.model import GPT
    from npgpt.config import GPTConfig
    data = TokenData(shakespeare_data)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=data.vocab_size)
    x, y = data.batch("train", 8, 32, np.random.default_rng(0))
    a, b = GPT(cfg, seed=0), GPT(cfg, seed=0)
    a.zero_grad()
    a.loss(x, y)
    a.backward()
    b.zero_grad()
    for i in range(2):
        b.loss(x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
        b.backward(0.5)
    np.testing.assert_allclose(b.grad, a.grad, rtol=1e-4, atol=1e-6 * np.abs(a.grad).max())


def test_init_starts_from_a_checkpoint_and_keeps_its_architecture(shakespeare_data, tmp_path):
    base = npgpt.train(shakespeare_data, tmp_path / "base", overrides={**SMALL, "max_iters": 40, "eval_interval": 40},
                       quiet=True)
    from npgpt.data import TokenData
    x, y = TokenData(shakespeare_data).batch("val", 8, 32, np.random.default_rng(0))
    base_loss = base.loss(x, y)
    # zero learning rate: the run's model is the checkpoint's, bit for bit, with the new dropout
    same = npgpt.train(shakespeare_data, tmp_path / "same", init=tmp_path / "base", quiet=True,
                       overrides={"max_iters": 1, "learning_rate": 1e-12, "min_lr": 0.0, "eval_iters": 1,
                                  "dropout": 0.2})
    assert same.config.dropout == 0.2 and same.config.n_embd == 32
    np.testing.assert_allclose(same.flat, base.flat, atol=1e-9)
    cfg = json.loads((tmp_path / "same" / "config.json").read_text())
    assert cfg["provenance"]["init"] == str(tmp_path / "base")
    # continued training starts where the checkpoint is, not where a random model is
    npgpt.train(shakespeare_data, tmp_path / "more", init=tmp_path / "base", quiet=True,
                overrides={"max_iters": 5, "learning_rate": 1e-3, "batch_size": 8, "eval_iters": 1})
    first = step_losses(tmp_path / "more")[0]
    assert abs(first - base_loss) < 0.3 and first < 3.5, (first, base_loss)
    npgpt.train(shakespeare_data, tmp_path / "more", resume=True, quiet=True, overrides={"max_iters": 6})
    assert json.loads((tmp_path / "more" / "config.json").read_text())["provenance"]["init"] == str(tmp_path / "base")
    with pytest.raises(NpgptError, match="architecture"):
        npgpt.train(shakespeare_data, tmp_path / "wider", init=tmp_path / "base", quiet=True,
                    overrides={"n_embd": 64})
    with pytest.raises(NpgptError, match="--preset"):
        npgpt.train(shakespeare_data, tmp_path / "p", init=tmp_path / "base", preset="baby", quiet=True)


def test_init_refuses_data_from_another_tokenizer(shakespeare_data, tmp_path):
    npgpt.train(shakespeare_data, tmp_path / "base", overrides={**SMALL, "max_iters": 1, "eval_interval": 1},
                quiet=True)
    (tmp_path / "other.txt").write_text("completely different characters: 0123456789 {}[]<>" * 50)
    npgpt.prepare([tmp_path / "other.txt"], tmp_path / "other", "char")
    with pytest.raises(NpgptError, match="--tokenizer"):
        npgpt.train(tmp_path / "other", tmp_path / "run", init=tmp_path / "base", quiet=True)
    assert not (tmp_path / "run").exists()
    # prepared with the checkpoint's tokenizer, the same text is accepted
    (tmp_path / "mine.txt").write_text(open(shakespeare_data.parent / "small.txt").read()[:20_000])
    from npgpt.tokenizer import Tokenizer
    npgpt.prepare([tmp_path / "mine.txt"], tmp_path / "mine", Tokenizer.load(tmp_path / "base", "char"))
    npgpt.train(tmp_path / "mine", tmp_path / "run", init=tmp_path / "base", quiet=True,
                overrides={"max_iters": 1, "eval_iters": 1})
