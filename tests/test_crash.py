"""Crash safety: a run killed at any moment -- including inside a checkpoint write -- resumes and ends with
exactly the losses of an uninterrupted run; a full disk, a torn log line and a second process on the same dir
are handled without losing or mixing anything."""
import errno
import json
import os
import signal

import numpy as np
import pytest

import npgpt
import npgpt.files as F
from npgpt.errors import NpgptError

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=1, max_iters=12,
            eval_interval=4, warmup_iters=2, learning_rate=3e-3, dropout=0.1)


def losses(run):
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("train_loss"), r.get("val_loss")) for r in recs]


def run_killed_at(n, data, out):
    """Train in a forked child that SIGKILLs itself at its n-th crash point; returns how it ended."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.environ["NPGPT_CRASH_AT"] = str(n)
            F._crash_count = 0
            npgpt.train(data, out, overrides=TINY, quiet=True)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else "finished"


def test_kill_at_random_points_including_checkpoint_writes_resumes_exactly(shakespeare_data, tmp_path):
    npgpt.set_threads(1)
    ref = npgpt.train(shakespeare_data, tmp_path / "ref", overrides=TINY, quiet=True)
    ref_losses = losses(tmp_path / "ref")
    # count the crash points of a whole run: every step, every file written, the switch, every move
    os.environ["NPGPT_CRASH_AT"] = "1000000000"
    F._crash_count = 0
    try:
        npgpt.train(shakespeare_data, tmp_path / "count", overrides=TINY, quiet=True)
        points = F._crash_count
    finally:
        del os.environ["NPGPT_CRASH_AT"]
    assert points > 40
    rng = np.random.default_rng(0)
    inside_checkpoint = 0
    for trial, n in enumerate(rng.integers(1, points + 1, size=50)):
        out = tmp_path / f"t{trial}"
        assert run_killed_at(int(n), shakespeare_data, out) == "killed"
        mid_switch = (out / F.COMMIT).exists() or (out / F.STAGE).exists() or any(out.glob(".*.tmp"))
        inside_checkpoint += mid_switch
        model = npgpt.train(shakespeare_data, out, overrides=TINY, resume=True, quiet=True)
        assert losses(out) == ref_losses, f"trial {trial}: killed at crash point {n} of {points}"
        np.testing.assert_array_equal(model.flat, ref.flat)
        assert not (out / F.COMMIT).exists() and not (out / F.STAGE).exists() and not list(out.glob(".*.tmp"))
    assert inside_checkpoint >= 10  # many kills landed inside a checkpoint write, not only between steps


def test_full_disk_inside_a_checkpoint_keeps_the_previous_one(shakespeare_data, tmp_path, monkeypatch):
    import npgpt.checkpoint as C
    out = tmp_path / "run"
    orig = C.write_safetensors

    def write(path, tensors, metadata=None):
        if str(path).endswith("model.safetensors") and metadata and metadata.get("step") == "8":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return orig(path, tensors, metadata)

    monkeypatch.setattr(C, "write_safetensors", write)
    with pytest.raises(OSError):
        npgpt.train(shakespeare_data, out, overrides=TINY, quiet=True)
    monkeypatch.setattr(C, "write_safetensors", orig)
    assert json.loads((out / "state.json").read_text())["step"] == 4
    assert C.read_safetensors_header(out / "optim.safetensors")[1]["step"] == "4"
    npgpt.train(shakespeare_data, out, overrides=TINY, resume=True, quiet=True)
    npgpt.train(shakespeare_data, tmp_path / "ref", overrides=TINY, quiet=True)
    assert losses(out) == losses(tmp_path / "ref")


def test_torn_metrics_line_is_dropped_on_resume(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    same_schedule = {**TINY, "lr_decay_iters": 12}
    npgpt.train(shakespeare_data, out, overrides={**same_schedule, "max_iters": 8}, quiet=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 4.0')
    npgpt.train(shakespeare_data, out, overrides=same_schedule, resume=True, quiet=True)
    npgpt.train(shakespeare_data, tmp_path / "ref", overrides=same_schedule, quiet=True)
    assert losses(out) == losses(tmp_path / "ref")


def test_second_process_on_the_same_run_dir_is_refused(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    npgpt.train(shakespeare_data, out, overrides={**TINY, "max_iters": 4}, quiet=True)
    before = (out / "model.safetensors").read_bytes()
    with F.DirLock(out):  # another process holds the run (flock is per open file, so this stands in for it)
        for kw in (dict(resume=True), dict(force=True), dict()):
            with pytest.raises(NpgptError, match="in use by another npgpt process"):
                npgpt.train(shakespeare_data, out, overrides=TINY, quiet=True, **kw)
    assert (out / "model.safetensors").read_bytes() == before
    npgpt.train(shakespeare_data, out, overrides=TINY, resume=True, quiet=True)  # free again


def test_force_removes_the_old_run_before_writing(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    npgpt.train(shakespeare_data, out, overrides={**TINY, "max_iters": 8}, quiet=True)
    (out / "loss.png").write_bytes(b"old")
    pid = os.fork()
    if pid == 0:
        try:
            os.environ["NPGPT_CRASH_AT"] = "1"
            F._crash_count = 0
            npgpt.train(shakespeare_data, out, overrides={**TINY, "learning_rate": 1e-3}, force=True, quiet=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    # killed while writing the new run's first file: nothing of the old run is left to be mistaken for it,
    # and --resume starts the new run from step 0
    assert not (out / "state.json").exists() and not (out / "loss.png").exists()
    npgpt.train(shakespeare_data, out, overrides={**TINY, "learning_rate": 1e-3}, resume=True, quiet=True)
    assert json.loads((out / "config.json").read_text())["train"]["learning_rate"] == 1e-3
    assert json.loads((out / "state.json").read_text())["step"] == 12


def test_resume_refuses_data_of_another_tokenizer(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    npgpt.train(shakespeare_data, out, overrides={**TINY, "max_iters": 4}, quiet=True)
    before = (out / "tokenizer.json").read_bytes()
    text = (shakespeare_data.parent / "small.txt").read_text().lower()
    (tmp_path / "lower.txt").write_text(text)
    npgpt.prepare([tmp_path / "lower.txt"], tmp_path / "lower", "char")
    with pytest.raises(NpgptError, match="not tokenized with this run's tokenizer"):
        npgpt.train(tmp_path / "lower", out, overrides=TINY, resume=True, quiet=True)
    assert (out / "tokenizer.json").read_bytes() == before


def test_resume_of_nothing_and_of_another_kind_of_dir(shakespeare_data, tmp_path):
    with pytest.raises(NpgptError, match="nothing to resume"):
        npgpt.train(shakespeare_data, tmp_path / "never", overrides=TINY, resume=True, quiet=True)
    assert not (tmp_path / "never").exists()
    with pytest.raises(NpgptError, match="prepared data, not a training run"):
        npgpt.train(shakespeare_data, shakespeare_data, overrides=TINY, resume=True, quiet=True)
    with pytest.raises(NpgptError, match="holds prepared data"):
        npgpt.train(shakespeare_data, shakespeare_data, overrides=TINY, force=True, quiet=True)


def test_non_finite_gradient_at_a_checkpoint_step_never_reaches_the_weights(shakespeare_data, tmp_path, monkeypatch):
    """The loss of the step is finite, one gradient entry overflows, and the step is a checkpoint step: the
    update is refused, the previous checkpoint is kept and what the error says about it is true."""
    from npgpt.checkpoint import load_model
    from npgpt.model import GPT
    calls = {"n": 0}
    real = GPT.backward

    def backward(self, *a, **k):
        real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 8:
            self.grad[0] = np.inf

    monkeypatch.setattr(GPT, "backward", backward)
    out = tmp_path / "run"
    with pytest.raises(NpgptError, match=r"gradient norm became inf at step 8; .* last good checkpoint"):
        npgpt.train(shakespeare_data, out, overrides=TINY, quiet=True)
    assert json.loads((out / "state.json").read_text())["step"] == 4
    assert np.isfinite(load_model(out).flat).all()
