"""npgpt scale: the compute convention, the fitters on surfaces of known parameters, the grid end to end
on a tiny corpus, the teacher corpus's entropy rate, and bad input."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("scipy")

from npgpt.config import GPTConfig  # noqa: E402
from npgpt.errors import NpgptError  # noqa: E402
from npgpt.params import num_params  # noqa: E402
from npgpt.scale import (_chinchilla_objective, chinchilla_loss, fit, fit_chinchilla, fit_power, flops_per_token, frontier,  # noqa: E402
                         non_embedding_params, plan, power_loss, predict, read_runs, run_grid, teacher_corpus)

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s fitted law


def surface(seed, noise=0.01, budgets=np.logspace(15, 23, 9), sizes=11, span=2.5):
    """Runs on Chinchilla's own law: per budget, sizes around 20 tokens per parameter, log-normal noise."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        for n in math.sqrt(c / 120) * np.logspace(-span / 2, span / 2, sizes):
            d = c / (6 * n)
            runs.append(dict(params=n, tokens=d, flops=c, budget=c,
                             loss=float(chinchilla_loss(CHINCHILLA, n, d) * math.exp(rng.normal(0, noise)))))
    return runs


def test_flops_count_every_matmul_once():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50)
    C, T = 32, 16
    macs = 2 * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) + C * 50  # weights a token multiplies, per forward
    attn = 2 * 2 * C * sum(i + 1 for i in range(T)) / T  # q k^T and p v over the keys each position sees
    assert flops_per_token(cfg) == pytest.approx(3 * 2 * (macs + attn))
    banded = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, attn_window=4, attn_pattern="BD")
    seen = sum(min(i + 1, 4) for i in range(T)) / T + sum(i + 1 for i in range(T)) / T
    assert flops_per_token(banded) == pytest.approx(3 * 2 * (macs + 2 * C * seen))
    assert non_embedding_params(cfg) == num_params(cfg) - 50 * C - T * C


def test_chinchilla_fit_finds_the_law_exactly_on_a_noiseless_surface():
    runs = surface(0, noise=0.0, budgets=np.logspace(15, 21, 4), sizes=5)
    p = fit_chinchilla(*(np.array([r[k] for r in runs]) for k in ("params", "tokens", "loss")))
    for name, v in CHINCHILLA.items():
        assert abs(p[name] / v - 1) < 1e-3, (name, p)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chinchilla_fit_recovers_the_law_from_noisy_runs(seed):
    """1% noise on 399 runs (19 budgets x 21 sizes over 8 decades of compute; Chinchilla fitted about 400):
    alpha, beta and E within 0.01. E is the one that needs the runs: it was within 0.01 in 16 of 16 seeds
    here (at most 0.0087), but in only 9 of 16 with 99 runs (median error 0.009, at most 0.021), a
    statistical limit, not the optimiser's (its minimum was below the true law's objective in all 16)."""
    runs = surface(seed, budgets=np.logspace(15, 23, 19), sizes=21)
    N, D, L = (np.array([r[k] for r in runs]) for k in ("params", "tokens", "loss"))
    p = fit_chinchilla(N, D, L)
    for name in ("alpha", "beta", "E"):
        assert abs(p[name] - CHINCHILLA[name]) < 0.01, (name, p)
    t = lambda q: [np.log(q["A"]), np.log(q["B"]), np.log(q["E"]), q["alpha"], q["beta"]]  # noqa: E731
    lnN, lnD, lnL = np.log(N), np.log(D), np.log(L)
    assert _chinchilla_objective(t(p), lnN, lnD, lnL, 1e-3)[0] <= _chinchilla_objective(t(CHINCHILLA), lnN, lnD, lnL, 1e-3)[0]


def test_power_fit_finds_the_irreducible_loss_and_extrapolates():
    rng = np.random.default_rng(0)
    true = {"a": 40.0, "b": -0.12, "c": 1.5}
    C = np.logspace(12, 15, 8)
    L = power_loss(true, C) * np.exp(rng.normal(0, 0.002, len(C)))
    p = fit_power(C, L)
    assert abs(p["c"] - 1.5) < 0.1 and abs(p["b"] - true["b"]) < 0.03, p
    big = 1e17  # 100x past the largest run
    assert abs(power_loss(p, big) / power_loss(true, big) - 1) < 0.01


def test_fit_bootstrap_intervals_and_prediction():
    runs = surface(0, budgets=np.logspace(15, 21, 7), sizes=7, span=2.0)
    f = fit(runs, "chinchilla", bootstrap=40)
    for name in ("alpha", "beta"):
        lo, hi = f["intervals"][name]
        assert lo <= f["params"][name] <= hi
    p = predict(f, params=1e9, tokens=2e10)
    truth = float(chinchilla_loss(CHINCHILLA, 1e9, 2e10))
    assert abs(p["loss"] / truth - 1) < 0.01 and p["interval"][0] <= p["loss"] <= p["interval"][1]
    opt = predict(f, flops=1e22)["optimal"]  # the law's own optimum: Chinchilla's ~ 20 tokens per parameter
    assert 5 < opt["tokens"] / opt["params"] < 80
    # the IsoFLOP parabolas agree with the law's optimum within 1.5x
    pw = fit(runs, "power", bootstrap=20)
    assert pw["isoflop"] and 1 / 1.5 < predict(pw, flops=1e22)["optimal"]["params"] / opt["params"] < 1.5
    assert len(frontier(runs)) == 7


def test_bad_runs_and_budgets_are_one_clear_line(tmp_path):
    f = tmp_path / "runs.jsonl"
    f.write_text('{"params": 1e6, "tokens": 1e7, "loss": NaN}\n')
    with pytest.raises(NpgptError, match="loss must be finite"):
        read_runs(f)
    f.write_text('{"params": -1, "tokens": 1e7, "loss": 3}\n')
    with pytest.raises(NpgptError, match="params must be finite and > 0"):
        read_runs(f)
    f.write_text('{"params": 1e6, "loss": 3}\n')
    with pytest.raises(NpgptError, match="lacks a number for 'tokens'"):
        read_runs(f)
    f.write_text("".join(json.dumps(r) + "\n" for r in surface(0)[:4]))
    with pytest.raises(NpgptError, match="needs more than 5 runs"):
        fit(read_runs(f), "chinchilla")
    csv = tmp_path / "runs.csv"
    csv.write_text("params,tokens,loss\n1e6,1e7,3.1\n2e6,2e7,2.9\n4e6,4e7,2.8\n8e6,8e7,2.75\n")
    assert [r["flops"] for r in read_runs(csv)] == [6e13, 2.4e14, 9.6e14, 3.84e15]
    from npgpt_cli.main import cli
    r = CliRunner().invoke(cli, ["scale", "fit", str(f), "--law", "chinchilla"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "needs more than 5 runs" in r.output


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "data"
    meta = teacher_corpus(out, n_tokens=40_000, vocab_size=8, order=4, n_layer=1, n_embd=32, streams=64,
                          val_fraction=0.25, seed=0)
    return out, meta


def test_teacher_corpus_is_scored_at_its_entropy_rate_by_the_teacher(teacher):
    """The teacher's own loss on its sample is the sample's mean entropy (in expectation): the sampler
    draws from the distribution whose entropy is recorded."""
    from npgpt.data import TokenData
    from npgpt.model import GPT
    out, meta = teacher
    data = TokenData(out)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    to_teacher = np.array([alphabet.index(data.tokenizer.decode([i])) for i in range(data.vocab_size)])
    ids = to_teacher[np.asarray(data.tokens("train"), np.int64)]
    t = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=32, block_size=4, vocab_size=8, dropout=0.0), seed=0)
    win = np.lib.stride_tricks.sliding_window_view(ids, 5)[::7][:3000]
    z = t.forward(win[:, :4], last_only=True)[:, -1].astype(np.float64) * meta["sharpness"]
    z -= z.max(axis=1, keepdims=True)
    nll = -(z[np.arange(len(win)), win[:, 4]] - np.log(np.exp(z).sum(axis=1)))
    assert 0.3 < meta["entropy_rate"] < math.log(8) - 0.1  # the sharpened teacher is far from uniform
    assert abs(nll.mean() - meta["entropy_rate"]) < 4 * nll.std() / math.sqrt(len(nll)) + 4 * meta["stderr"]


def test_grid_plans_trains_resumes_and_fits_end_to_end(teacher, tmp_path, monkeypatch):
    data, meta = teacher
    runner = CliRunner()
    from npgpt_cli.main import cli
    grid = tmp_path / "grid.json"
    r = runner.invoke(cli, ["scale", "plan", "--budgets", "2e9,4e9,8e9,1.6e10", "--data", str(data), "--sizes",
                            "1x16,1x32", "--per-budget", "1", "--block-size", "16", "--batch-size", "8", "--out", str(grid)])
    assert r.exit_code == 0, r.output
    points = json.loads(grid.read_text())["points"]
    assert len(points) == 4 and all(p["flops"] <= p["budget"] for p in points)
    r = runner.invoke(cli, ["scale", "run", str(grid), "--out", str(tmp_path / "runs"), "--quiet", "--threads", "1"])
    assert r.exit_code == 0, r.output
    runs = read_runs(tmp_path / "runs" / "runs.jsonl")
    assert len(runs) == 4 and all(math.log(8) > x["loss"] > meta["entropy_rate"] - 0.05 for x in runs)
    import sys
    monkeypatch.setattr(sys.modules["npgpt.train"], "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert run_grid(grid, tmp_path / "runs", quiet=True) == json.loads(json.dumps(runs))
    r = runner.invoke(cli, ["scale", "fit", str(tmp_path / "runs" / "runs.jsonl"), "--bootstrap", "20", "--json"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.output)
    assert set(f["params"]) == {"a", "b", "c"} and f["params"]["b"] < 0
    png = tmp_path / "pred.png"
    r = runner.invoke(cli, ["scale", "predict", str(tmp_path / "runs" / "fit-power.json"), "--flops", "1e11",
                            "--plot", str(png), "--json"])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 1000 and json.loads(r.output)["loss"] > 0


def test_a_budget_below_one_step_is_refused(teacher):
    data, _ = teacher
    with pytest.raises(NpgptError, match="fewer than 50 steps"):
        plan([1e6], data, sizes=[(1, 16)], block_size=16, batch_size=8)
