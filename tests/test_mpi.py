"""Data-parallel training on MPI (npgpt.distributed): N ranks make one process's updates (bit for bit with
two ranks), checkpoints resume across rank counts, and a failure ends the job without a hang. The MPI
runs need mpi4py and mpiexec (`pip install -e '.[mpi]'`: the mpich wheel brings mpiexec into the venv)."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.distributed import DataParallel, ordered
from npgpt.model import GPT
from npgpt.params import make_views

BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")
CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, learning_rate=3e-3,
              warmup_iters=5, lr_decay_iters=100, eval_interval=50, dropout=0.1)
TINY = ["--threads", "1", "--quiet"] + [f"--{k}={v}" for k, v in CONFIG.items()]
NPGPT = [sys.executable, "-m", "npgpt_cli.main", "train"]


def launch(ranks, *args, env=None, extra=None, timeout=120) -> subprocess.CompletedProcess:
    """`mpiexec -n RANKS npgpt train ARGS`; env {rank: {VAR: value}} and extra {rank: [more args]} set
    one rank apart (MPMD: one command per rank, joined by ':')."""
    cmd = [MPIEXEC]
    for i in range(ranks):
        cmd += [":"] if i else []
        cmd += ["-n", "1", *sum((["-env", k, str(v)] for k, v in (env or {}).get(i, {}).items()), [])]
        cmd += [*NPGPT, *map(str, args), *map(str, (extra or {}).get(i, []))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def alone(data, out, max_iters, grad_accum=2, resume=False):
    """The same run in this process (one BLAS thread, as the ranks): Numba is warm here already."""
    npgpt.set_threads(1)
    npgpt.train(data, out, overrides={**CONFIG, "grad_accum": grad_accum, "max_iters": max_iters}, resume=resume,
                quiet=True)


def metrics(run, key="loss"):
    return [r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def reference(shakespeare_data, tmp_path_factory):
    """One process, 2 micro-batches per step, 100 steps: the run every MPI job here is held to."""
    out = tmp_path_factory.mktemp("mpi") / "one"
    alone(shakespeare_data, out, 100)
    return out


@needs_mpi
def test_two_ranks_make_one_process_run_bit_for_bit(shakespeare_data, reference, tmp_path):
    out = tmp_path / "two"
    r = launch(2, "--data", shakespeare_data, "--out", out, *TINY, "--grad_accum", 2, "--max_iters", 100)
    assert r.returncode == 0, r.stderr
    for key in ("loss", "grad_norm", "train_loss", "val_loss"):
        assert metrics(out, key) == metrics(reference, key), key
    assert len(metrics(out)) == 100
    for f in ("model.safetensors", "optim.safetensors"):
        assert (out / f).read_bytes() == (reference / f).read_bytes(), f
    state = [json.loads((d / "state.json").read_text()) for d in (out, reference)]
    assert state[0]["rng"] == state[1]["rng"] and state[0]["tokens_seen"] == state[1]["tokens_seen"]


@needs_mpi
@pytest.mark.parametrize("ranks, grad_accum", [(3, 6), (4, 4)])
def test_more_ranks_match_one_process_to_float_rounding(shakespeare_data, tmp_path, ranks, grad_accum):
    """More than two gradients are summed in MPI's order, not one process's: equal to rounding. Small
    buckets make several all-reduces overlap the backward; with 3 ranks each accumulates 2 micro-batches."""
    alone(shakespeare_data, tmp_path / "one", 6, grad_accum=grad_accum)
    r = launch(ranks, "--data", shakespeare_data, "--out", tmp_path / "many", *TINY, "--grad_accum", grad_accum,
               "--max_iters", 6, "--bucket-mb", 0.005)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(metrics(tmp_path / "many"), metrics(tmp_path / "one"), rtol=1e-6, atol=0)
    assert len(metrics(tmp_path / "many")) == 6


@needs_mpi
def test_a_one_process_checkpoint_goes_on_in_two_ranks(shakespeare_data, reference, tmp_path):
    """grad_accum counts the whole step's micro-batches, so the saved config needs no change: the next
    steps are the uninterrupted run's. (A 2-rank checkpoint goes on in one process in the test below.)"""
    alone(shakespeare_data, tmp_path / "run", 6)
    r = launch(2, "--data", shakespeare_data, "--out", tmp_path / "run", *TINY, "--resume", "--max_iters", 8)
    assert r.returncode == 0, r.stderr
    assert metrics(tmp_path / "run") == metrics(reference)[:8]


@needs_mpi
@pytest.mark.parametrize("rank, crash_at", [(1, 13), (0, 43)])
def test_a_dying_rank_ends_the_job_and_the_last_checkpoint_is_intact(shakespeare_data, reference, tmp_path,
                                                                     rank, crash_at):
    """Rank 1 is killed after its step 13; rank 0 while it moves the step-10 checkpoint into place (its
    43rd crash point, see files.crash_point). The job ends at once with an error, and one process
    resumes the run to the uninterrupted one's losses."""
    out = tmp_path / "run"
    t0 = time.perf_counter()
    r = launch(2, "--data", shakespeare_data, "--out", out, *TINY, "--grad_accum", 2, "--max_iters", 100,
               "--ckpt_interval", 5, env={rank: {"NPGPT_CRASH_AT": crash_at}}, timeout=60)
    assert r.returncode != 0
    assert time.perf_counter() - t0 < 30
    assert json.loads((out / "state.json").read_text())["step"] in (5, 10)
    alone(shakespeare_data, out, 20, resume=True)
    assert metrics(out) == metrics(reference)[:20]


@needs_mpi
def test_a_rank_refused_before_joining_ends_the_job(shakespeare_data, tmp_path):
    """Rank 1's arguments are refused before it starts MPI: rank 0, waiting in MPI_Init for it, must not
    wait forever (MPICH's launcher alone would let it)."""
    t0 = time.perf_counter()
    r = launch(2, "--data", shakespeare_data, "--out", tmp_path / "run", *TINY, "--grad_accum", 2,
               "--max_iters", 2, extra={1: ["--threads", 0]}, timeout=60)
    assert r.returncode != 0 and "--threads" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 30


@needs_mpi
def test_errors_are_one_line_from_rank_0(shakespeare_data, tmp_path):
    common = ["--data", shakespeare_data, *TINY, "--max_iters", 2]
    r = launch(2, *common, "--out", tmp_path / "odd", "--grad_accum", 3)
    assert r.returncode == 1 and r.stderr.count("Error:") == 1 and "multiple of the 2 ranks" in r.stderr
    assert not (tmp_path / "odd").exists()
    # a host without the data stops the job before rank 0 writes anything
    r = launch(2, *common, "--out", tmp_path / "x", "--grad_accum", 2, extra={1: ["--data", tmp_path / "nowhere"]})
    assert r.returncode == 1 and r.stderr.count("Error:") == 1 and "rank 1 of 2" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_without_a_launcher_mpi4py_is_never_imported(shakespeare_data, tmp_path, monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert "mpi4py" not in sys.modules
    npgpt.train(shakespeare_data, tmp_path / "run", overrides={"n_layer": 1, "n_embd": 16, "n_head": 2,
                "block_size": 16, "max_iters": 2, "eval_iters": 1}, quiet=True)
    assert "mpi4py" not in sys.modules


def test_a_launcher_without_mpi4py_is_a_clear_error(shakespeare_data, tmp_path):
    (tmp_path / "mpi4py").mkdir()
    (tmp_path / "mpi4py" / "__init__.py").write_text("raise ImportError('no MPI here')\n")
    r = subprocess.run([*NPGPT, "--data", shakespeare_data, "--out", tmp_path / "run"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PMI_SIZE": "2", "PMI_RANK": "0",
                                                   "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "pip install 'npgpt[mpi]'" in r.stderr and "Traceback" not in r.stderr


@needs_mpi
def test_a_launcher_of_another_mpi_is_a_clear_error(shakespeare_data, tmp_path):
    """Open MPI's mpirun starting an MPICH-bound mpi4py: each process would be alone in its own world,
    N trainings instead of one."""
    r = subprocess.run([*NPGPT, "--data", shakespeare_data, "--out", tmp_path / "run"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "OMPI_COMM_WORLD_SIZE": "2"})
    assert r.returncode == 1 and "the launcher started 2 ranks but MPI sees 1" in r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cfg", [dict(), dict(ln="post", bias=False), dict(attn_window=4, attn_pattern="BD")])
def test_skip_dropout_draws_what_a_training_forward_draws(cfg):
    model = GPT(npgpt.GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32,
                                          dropout=0.1), **cfg}), seed=0)
    ran, skipped = np.random.default_rng(5), np.random.default_rng(5)
    model.loss(np.ones((3, 16), int), np.ones((3, 16), int), train=True, rng=ran)
    model.skip_dropout(3, 16, skipped)
    assert ran.bit_generator.state == skipped.bit_generator.state


@pytest.mark.parametrize("cfg", [dict(), dict(ln="post", bias=False)])
def test_deferred_additions_replayed_give_the_backward_bit_for_bit(cfg):
    """What a rank records instead of adding (embeddings, layernorms), applied onto the LM head's
    wte gradient, is the plain backward's gradient; on_block reports every block, last first."""
    model = GPT(npgpt.GPTConfig(**{**dict(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=32), **cfg}),
                seed=0)
    x = np.random.default_rng(0).integers(0, 32, (2, 16))
    model.zero_grad()
    model.loss(x, np.roll(x, -1, 1))
    model.backward(0.5)
    plain = model.grad.copy()
    model.zero_grad()
    model.loss(x, np.roll(x, -1, 1))
    deferred, blocks = [], []
    model.backward(0.5, defer=deferred, on_block=blocks.append)
    assert blocks == [2, 1, 0]
    views = {n: np.zeros_like(g) for n, g in model.grads.items()}
    views["wte.weight"] += model.grads["wte.weight"]
    for names, fn, args in deferred:
        fn(*args, *(views[n] if n else None for n in names))
    for name, expect in make_views(plain, model.shapes).items():
        assert np.array_equal(views[name] if ordered(name) else model.grads[name], expect), name


def test_only_the_last_micro_batch_of_a_rank_starts_sending():
    """No communication on a rank's earlier micro-batches (DDP's no_sync); their deferred additions are
    kept for the chain."""
    model = GPT(npgpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32), seed=0)
    model.zero_grad()
    dp = DataParallel.__new__(DataParallel)
    dp.rank, dp.size, dp.bucket_bytes, dp.layout = 1, 2, 1 << 20, None
    first, last = dp.hooks(model, 2, 4), dp.hooks(model, 3, 4)
    assert first["on_block"] is None and last["on_block"] is not None and first["defer"] is last["defer"]


def test_micro_batches_are_shared_in_contiguous_blocks():
    dp = DataParallel.__new__(DataParallel)
    for size, k in ((2, 2), (2, 6), (3, 3), (4, 8)):
        owners = []
        for rank in range(size):
            dp.rank, dp.size = rank, size
            owners.append([i for i in range(k) if dp.owns(i, k)])
        assert sum(owners, []) == list(range(k)) and {len(o) for o in owners} == {k // size}
