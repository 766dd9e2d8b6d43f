"""Predictable scaling (GPT-4 report, section 3): train small runs, fit a law, predict a big run.

Two laws, fitted in log-loss space:
  power       L(C) = a C^b + c               over the compute frontier (Henighan et al.; GPT-4 report)
  chinchilla  L(N, D) = E + A / N^alpha + B / D^beta   (Hoffmann et al. 2022, Approach 3: Huber loss,
              delta 1e-3, on log L; L-BFGS-B from a grid of starting points)
and the IsoFLOP reading of the same grid (Approach 2): per budget, a parabola of L in log N gives the
compute-optimal size, and N_opt(C) = k C^a across budgets.

Conventions. N counts the non-embedding parameters (Kaplan et al.): everything but wte and wpe. C is
the exact training compute, 3 x the forward's multiply-adds x 2 (see flops_per_token): every weight
matrix a token passes through (the blocks and the tied LM head), and causal attention over the keys a
query actually sees. Layer norms, softmax, GELU and the embedding lookup are left out (under 1% here).
Intervals come from a bootstrap over runs (resampled with replacement, refitted): the spread of the
fitted law, the 90% interval by default.

The grid (`plan`), its runs (`run_grid`) and the fits are JSON files, so every step can be redone or
inspected; scipy (the `npgpt[scale]` extra) does the optimisation.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .config import GPTConfig
from .errors import NpgptError
from .files import atomic_write_json
from .params import param_shapes

LEVEL = 0.9  # the interval reported: 5th to 95th percentile of the bootstrap


# ---------------------------------------------------------------- compute and size
def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token: 6 x the weights a token's forward multiplies (q, k, v, projections, MLP,
    the tied head) + 12 x C x (keys a query sees, averaged over the T positions) per layer for q k^T and
    p v, forward and backward (2 FLOPs per multiply-add, backward = 2 x forward)."""
    C, T = cfg.n_embd, cfg.block_size
    weights = cfg.n_layer * (4 * C * C + 2 * C * cfg.d_ff) + cfg.vocab_size * C
    keys = 0.0
    for layer in range(cfg.n_layer):
        w = cfg.window(layer)
        # mean over query positions i of i + 1 (dense) or min(i + 1, w) (banded)
        keys += (T + 1) / 2 if not w or w >= T else (w * (w + 1) / 2 + (T - w) * w) / T
    return 6.0 * weights + 12.0 * C * keys


def non_embedding_params(cfg: GPTConfig) -> int:
    """Parameters other than the token and position embeddings (wte is also the head: tied)."""
    return sum(math.prod(s) for name, s in param_shapes(cfg) if name not in ("wte.weight", "wpe.weight"))


# ---------------------------------------------------------------- the grid
# The size ladder of a plan: (n_layer, n_embd), heads of 32. Depth and width grow together, as in
# Kaplan et al.'s and Chinchilla's families; small enough that a point trains in minutes on a laptop.
LADDER = ((2, 64), (2, 96), (3, 128), (4, 160), (4, 192), (5, 256), (6, 320), (6, 384), (8, 512), (12, 768))


def size_config(n_layer: int, n_embd: int, block_size: int, vocab_size: int) -> GPTConfig:
    """A member of the plan's family: heads of 32 (at least one), no dropout (every run sees fresh data)."""
    return GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 32), n_embd=n_embd, block_size=block_size,
                     vocab_size=vocab_size, dropout=0.0).validate()


def learning_rate(n_embd: int) -> float:
    """Peak AdamW rate of a plan's run: narrower models take larger steps (~ 1 / sqrt(width))."""
    return round(2e-3 * math.sqrt(128 / n_embd), 6)


def plan(budgets, data_dir, *, sizes=None, block_size: int = 128, batch_size: int = 16, per_budget: int = 5,
         min_steps: int = 50) -> dict:
    """An IsoFLOP grid: for each compute budget (FLOPs), the `per_budget` sizes of `sizes` (default LADDER)
    closest (in log N) to 20 tokens per parameter, each trained for as many steps of batch_size x
    block_size tokens as its budget buys (its own cosine schedule ends there). Sizes that would take
    fewer than min_steps steps are left out. Returns the grid (see run_grid)."""
    from .data import TokenData
    data = TokenData(data_dir)
    budgets = [float(b) for b in budgets]
    if not budgets or any(not math.isfinite(b) or b <= 0 for b in budgets):
        raise NpgptError(f"budgets must be finite numbers > 0, got {budgets}")
    sizes = [tuple(s) for s in (sizes or LADDER)]
    step_tokens = batch_size * block_size
    points = []
    for budget in sorted(set(budgets)):
        fits = []
        for n_layer, n_embd in sizes:
            cfg = size_config(n_layer, n_embd, block_size, data.vocab_size)
            steps = int(budget // (flops_per_token(cfg) * step_tokens))
            if steps >= min_steps:
                n = non_embedding_params(cfg)
                fits.append((abs(math.log(steps * step_tokens / (20 * n))), n_layer, n_embd, cfg, steps))
        if not fits:
            raise NpgptError(f"budget {budget:.3g} FLOPs buys fewer than {min_steps} steps of the smallest size; "
                             f"raise it or give smaller --sizes")
        for _, n_layer, n_embd, cfg, steps in sorted(sorted(fits)[:per_budget], key=lambda f: non_embedding_params(f[3])):
            lr = learning_rate(n_embd)
            points.append({
                "name": f"c{budget:.3g}-l{n_layer}-d{n_embd}".replace("+", ""), "budget": budget,
                "overrides": {"n_layer": n_layer, "n_head": cfg.n_head, "n_embd": n_embd, "block_size": block_size,
                              "dropout": 0.0, "batch_size": batch_size, "max_iters": steps,
                              "learning_rate": lr, "min_lr": lr / 10, "warmup_iters": max(1, min(100, steps // 10)),
                              "eval_interval": steps, "eval_iters": 10, "seed": 1337},
                "params": non_embedding_params(cfg), "tokens": steps * step_tokens,
                "flops": flops_per_token(cfg) * steps * step_tokens})
    return {"data": str(Path(data_dir).resolve()), "points": points}


def write_plan(grid: dict, out) -> None:
    atomic_write_json(out, grid)


def read_grid(path) -> dict:
    try:
        grid = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise NpgptError(f"{path}: not a grid written by `npgpt scale plan` ({e})") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("points"), list) or "data" not in grid:
        raise NpgptError(f"{path}: not a grid written by `npgpt scale plan` (no data or points)")
    return grid


def final_loss(model, data, max_tokens: int = 1 << 18) -> float:
    """Mean NLL over the val split (its first max_tokens), windows of the full context advancing by half a
    context: every scored token sees at least block_size / 2 tokens, so the number does not depend on
    where a random batch fell, and a Markov source of order <= block_size / 2 is scored at its entropy rate."""
    from .evaluate import perplexity
    ids = np.asarray(data.tokens("val")[:max_tokens], np.int64)
    return perplexity(model, ids=ids, stride=max(1, model.config.block_size // 2))["nll"]


def run_grid(grid_path, out_dir, *, quiet: bool = False, stream=None) -> list[dict]:
    """Train every point of a grid into out_dir/NAME (resuming a point that was interrupted, skipping one
    that finished), score it (final_loss) and rewrite out_dir/runs.jsonl: one line per finished point with
    name, budget, params (N), tokens (D), flops (C), loss. Returns those records."""
    import sys
    from .data import TokenData
    from .files import current
    from .train import train
    stream = stream or sys.stderr
    grid = read_grid(grid_path)
    data = TokenData(grid["data"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, p in enumerate(grid["points"]):
        d = out / p["name"]
        done = d / "result.json"
        if not done.is_file():
            if not quiet:
                print(f"[{i + 1}/{len(grid['points'])}] {p['name']}: N {p['params']:,}, D {p['tokens']:,}, "
                      f"C {p['flops']:.3g}", file=stream)
            started = current(d, "state.json").is_file() if d.is_dir() else False
            model = train(grid["data"], d, overrides=dict(p["overrides"]), resume=started, quiet=True)
            rec = {k: p[k] for k in ("name", "budget", "params", "tokens", "flops")}
            rec["loss"] = final_loss(model, data)
            atomic_write_json(done, rec)
        records.append(json.loads(done.read_text()))
        _write_jsonl(out / "runs.jsonl", records)
    return records


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from .files import atomic_open
    with atomic_open(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records).encode())


# ---------------------------------------------------------------- runs
def read_runs(path) -> list[dict]:
    """Runs from JSON lines or CSV with params, tokens, loss (and flops, else 6 N D); every value finite
    and > 0. Extra fields (name, budget) are kept."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NpgptError(f"{p}: cannot read runs ({e})") from None
    if p.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise NpgptError(f"{p}:{n}: not a JSON line") from None
                if not isinstance(rows[-1], dict):
                    raise NpgptError(f"{p}:{n}: a run must be a JSON object")
    runs = []
    for n, r in enumerate(rows, 1):
        rec = dict(r)
        for key in ("params", "tokens", "loss", "flops"):
            if key == "flops" and r.get(key) in (None, ""):
                rec["flops"] = 6.0 * rec["params"] * rec["tokens"]
                continue
            try:
                v = float(r[key])
            except (KeyError, TypeError, ValueError):
                raise NpgptError(f"{p}: run {n} lacks a number for {key!r}") from None
            if not math.isfinite(v) or v <= 0:
                raise NpgptError(f"{p}: run {n}: {key} must be finite and > 0, got {r[key]!r}")
            rec[key] = v
        if "budget" in rec and rec["budget"] not in (None, ""):
            rec["budget"] = float(rec["budget"])
        runs.append(rec)
    if not runs:
        raise NpgptError(f"{p}: no runs")
    return runs


def frontier(runs: list[dict]) -> list[dict]:
    """The compute frontier: with budgets (an IsoFLOP grid), each budget's best run; otherwise every run
    that beats all runs of less compute. Sorted by compute."""
    if all(r.get("budget") for r in runs):
        best = {}
        for r in runs:
            if r["budget"] not in best or r["loss"] < best[r["budget"]]["loss"]:
                best[r["budget"]] = r
        return sorted(best.values(), key=lambda r: r["flops"])
    out, low = [], math.inf
    for r in sorted(runs, key=lambda r: (r["flops"], r["loss"])):
        if r["loss"] < low:
            out.append(r)
            low = r["loss"]
    return out


# ---------------------------------------------------------------- the laws
def _scipy():
    try:
        import scipy.optimize
    except ImportError:
        raise NpgptError("fitting needs scipy: pip install 'npgpt[scale]'") from None
    return scipy.optimize


def power_loss(p: dict, C):
    """L(C) = a C^b + c."""
    return p["a"] * np.asarray(C, np.float64) ** p["b"] + p["c"]


def chinchilla_loss(p: dict, N, D):
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def fit_power(C, L) -> dict:
    """Least squares on log L of L(C) = a C^b + c with b < 0, c >= 0: C is centred (x = ln C - ln C_ref) so
    that the parameters are of order one; the best of a small grid of starts. Returns {"a", "b", "c"}."""
    opt = _scipy()
    C, L = np.asarray(C, np.float64), np.asarray(L, np.float64)
    x = np.log(C) - np.log(C).mean()
    y = np.log(L)

    def resid(t):  # t = (ln A, b, c): L = A e^(b x) + c
        return np.log(np.exp(t[0] + t[1] * x) + t[2]) - y

    best = None
    for c0 in (0.0, 0.5 * L.min(), 0.8 * L.min(), 0.95 * L.min()):
        for b0 in (-0.05, -0.2, -0.5):
            a0 = np.log(max(np.median(L) - c0, 1e-6))
            r = opt.least_squares(resid, [a0, b0, c0], bounds=([-np.inf, -10.0, 0.0], [np.inf, 0.0, L.min()]),
                                  x_scale="jac", max_nfev=2000)
            if best is None or r.cost < best.cost:
                best = r
    lnA, b, c = best.x
    return {"a": float(np.exp(lnA - b * np.log(C).mean())), "b": float(b), "c": float(c)}


# Chinchilla's grid of starting points (Hoffmann et al., Appendix D.2): alpha, beta, e = ln E, a = ln A, b = ln B
_GRID = np.array(np.meshgrid(np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5), np.arange(-1, 1.51, 0.5),
                             np.arange(0, 26, 5), np.arange(0, 26, 5), indexing="ij")).reshape(5, -1).T


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)), np.clip(r, -delta, delta)


def _chinchilla_objective(t, lnN, lnD, lnL, delta):
    """Sum of Huber(LSE(a - alpha ln N, b - beta ln D, e) - ln L) and its gradient in t = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = t
    z = np.stack([a - alpha * lnN, b - beta * lnD, np.full_like(lnN, e)])
    m = z.max(axis=0)
    w = np.exp(z - m)
    s = w.sum(axis=0)
    r = m + np.log(s) - lnL
    h, dh = _huber(r, delta)
    p = w / s  # d LSE / d z
    g = np.array([(dh * p[0]).sum(), (dh * p[1]).sum(), (dh * p[2]).sum(),
                  -(dh * p[0] * lnN).sum(), -(dh * p[1] * lnD).sum()])
    return h.sum(), g


def fit_chinchilla(N, D, L, delta: float = 1e-3, keep: int = 8, also=None) -> dict:
    """Chinchilla's Approach 3: minimise the Huber loss of log L over (a, b, e, alpha, beta) with L-BFGS-B,
    from the `keep` best points of Chinchilla's starting grid (all 4,500 are scored, the optimiser runs
    from the best: on the synthetic surfaces of the tests its minimum is never above the true law's) and
    from the starts in `also` (rows of alpha, beta, e, a, b). Returns {"E", "A", "B", "alpha", "beta"}."""
    opt = _scipy()
    lnN, lnD, lnL = (np.log(np.asarray(v, np.float64)) for v in (N, D, L))
    z = np.stack([_GRID[:, 3, None] - _GRID[:, 0, None] * lnN, _GRID[:, 4, None] - _GRID[:, 1, None] * lnD,
                  np.broadcast_to(_GRID[:, 2, None], (len(_GRID), len(lnN)))])
    m = z.max(axis=0)
    r = m + np.log(np.exp(z - m).sum(axis=0)) - lnL
    grid = _GRID[np.argsort(_huber(r, delta)[0].sum(axis=1))[:keep]]
    if also is not None:
        grid = np.concatenate([grid, np.atleast_2d(also)])
    best = None
    for alpha, beta, e, a, b in grid:
        r = opt.minimize(_chinchilla_objective, [a, b, e, alpha, beta], args=(lnN, lnD, lnL, delta), jac=True,
                         method="L-BFGS-B", options={"maxiter": 1000})
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)),
            "alpha": float(alpha), "beta": float(beta)}


def _chinchilla_start(p: dict):
    return [p["alpha"], p["beta"], np.log(p["E"]), np.log(p["A"]), np.log(p["B"])]


def isoflop_optimum(runs: list[dict]) -> dict | None:
    """Chinchilla's Approach 2: per budget with >= 3 sizes, the minimum of a parabola in ln N fitted to the
    losses, then N_opt = k C^a by least squares in logs over >= 2 budgets. None without such a grid."""
    groups = {}
    for r in runs:
        if r.get("budget"):
            groups.setdefault(r["budget"], []).append(r)
    opt = []
    for budget, rs in sorted(groups.items()):
        if len({r["params"] for r in rs}) < 3:
            continue
        x = np.log([r["params"] for r in rs])
        c2, c1, _ = np.polyfit(x, [r["loss"] for r in rs], 2)
        if c2 > 0:  # a valley: its bottom (possibly outside the sizes tried, then an extrapolation)
            opt.append((float(np.mean([r["flops"] for r in rs])), float(np.exp(-c1 / (2 * c2)))))
    if len(opt) < 2:
        return None
    a, lnk = np.polyfit(np.log([c for c, _ in opt]), np.log([n for _, n in opt]), 1)
    return {"k": float(np.exp(lnk)), "a": float(a), "budgets": [c for c, _ in opt], "n_opt": [n for _, n in opt]}


def _per_token_flops(runs: list[dict]) -> dict:
    """flops / tokens = u + v N, fitted over the runs: how compute converts to tokens at a size N (6 N plus
    the head's and attention's share, which grow more slowly than N)."""
    N = np.array([r["params"] for r in runs])
    f = np.array([r["flops"] / r["tokens"] for r in runs])
    if np.ptp(N) == 0:
        return {"u": float(np.mean(f - 6 * N)), "v": 6.0}
    v, u = np.polyfit(N, f, 1)
    return {"u": float(u), "v": float(v)}


LAWS = {"power": ("a", "b", "c"), "chinchilla": ("E", "A", "B", "alpha", "beta")}


def fit(runs: list[dict], law: str = "power", *, bootstrap: int = 200, seed: int = 0) -> dict:
    """Fit `law` to runs (read_runs) and bootstrap it. Returns the fit: {"law", "params", "intervals"
    (name -> [lo, hi] at LEVEL), "residuals" (fitted/measured - 1 for each run used), "runs" (those used),
    "samples" (bootstrap parameter sets, for predict), "flops_per_token", "isoflop"}."""
    if law not in LAWS:
        raise NpgptError(f"unknown law {law!r}; choose power or chinchilla")
    used = frontier(runs) if law == "power" else runs
    k = len(LAWS[law])
    if len(used) <= k:
        what = "compute-frontier points" if law == "power" else "runs"
        raise NpgptError(f"the {law} law has {k} parameters: it needs more than {k} {what}, got {len(used)}")
    N, D, C, L = (np.array([r[key] for r in used]) for key in ("params", "tokens", "flops", "loss"))
    if law == "power":
        params = fit_power(C, L)
        pred = power_loss(params, C)
    else:
        params = fit_chinchilla(N, D, L)
        pred = chinchilla_loss(params, N, D)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        i = rng.integers(0, len(used), len(used))
        if len(set(i.tolist())) <= k:  # too few distinct runs to determine the law: draw again
            continue
        if law == "power":
            samples.append(fit_power(C[i], L[i]))
        else:
            # from the full fit's minimum and the resample's own best grid starts: a resample may have
            # another basin, and starting from one point only would hide that spread
            samples.append(fit_chinchilla(N[i], D[i], L[i], keep=2, also=_chinchilla_start(params)))
    q = [(1 - LEVEL) / 2 * 100, (1 + LEVEL) / 2 * 100]
    intervals = {name: [float(v) for v in np.percentile([s[name] for s in samples], q)] for name in LAWS[law]} \
        if samples else {}
    return {"law": law, "params": params, "intervals": intervals, "level": LEVEL,
            "residuals": [float(v) for v in pred / L - 1], "runs": used, "samples": samples,
            "flops_per_token": _per_token_flops(runs), "isoflop": isoflop_optimum(runs)}


def read_fit(path) -> dict:
    try:
        f = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise NpgptError(f"{path}: not a fit written by `npgpt scale fit` ({e})") from None
    if not isinstance(f, dict) or f.get("law") not in LAWS or not isinstance(f.get("params"), dict):
        raise NpgptError(f"{path}: not a fit written by `npgpt scale fit`")
    return f


# ---------------------------------------------------------------- prediction
def compute_optimal(f: dict, flops: float, params: dict | None = None) -> dict | None:
    """The N and D that minimise the Chinchilla law at `flops`, spending it at flops_per_token(N) = u + v N
    per token; or, for a power fit, N_opt = k C^a from the IsoFLOP grid. None when the fit has neither."""
    if f["law"] == "chinchilla":
        opt = _scipy()
        p, ft = params or f["params"], f["flops_per_token"]

        def loss(lnN):
            n = np.exp(lnN)
            return float(chinchilla_loss(p, n, flops / (ft["u"] + ft["v"] * n)))

        # sizes whose per-token cost leaves at least one token
        hi = np.log(max((flops - ft["u"]) / ft["v"], 2.0)) if ft["v"] > 0 else 60.0
        r = opt.minimize_scalar(loss, bounds=(0.0, hi), method="bounded")
        n = float(np.exp(r.x))
        return {"params": n, "tokens": float(flops / (ft["u"] + ft["v"] * n)), "source": "chinchilla law"}
    iso = f.get("isoflop")
    if not iso:
        return None
    n = iso["k"] * flops ** iso["a"]
    ft = f["flops_per_token"]
    return {"params": n, "tokens": flops / (ft["u"] + ft["v"] * n), "source": "IsoFLOP parabolas"}


def predict(f: dict, *, flops: float | None = None, params: float | None = None, tokens: float | None = None) -> dict:
    """The loss a run of `flops` (or of `params` N trained on `tokens` D) should reach, with its bootstrap
    interval, and the compute-optimal N and D for that compute. Returns {"loss", "interval", "level",
    "flops", "optimal"}."""
    for name, v in (("flops", flops), ("params", params), ("tokens", tokens)):
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise NpgptError(f"--{name} must be finite and > 0, got {v}")
    if (flops is None) == (params is None or tokens is None) or (params is None) != (tokens is None):
        raise NpgptError("give --flops C, or --params N with --tokens D")
    if f["law"] == "power":
        if flops is None:
            ft = f["flops_per_token"]
            flops = tokens * (ft["u"] + ft["v"] * params)

        def at(p):
            return float(power_loss(p, flops))
    elif flops is not None:  # a budget: the law's loss at the compute-optimal split of it
        def at(p):
            o = compute_optimal(f, flops, p)
            return float(chinchilla_loss(p, o["params"], o["tokens"]))
    else:
        ft = f["flops_per_token"]
        flops = tokens * (ft["u"] + ft["v"] * params)

        def at(p):
            return float(chinchilla_loss(p, params, tokens))
    draws = [at(p) for p in f.get("samples", [])]
    q = [(1 - f.get("level", LEVEL)) / 2 * 100, (1 + f.get("level", LEVEL)) / 2 * 100]
    return {"loss": at(f["params"]), "interval": [float(v) for v in np.percentile(draws, q)] if draws else None,
            "level": f.get("level", LEVEL), "flops": float(flops), "optimal": compute_optimal(f, flops)}


def plot(f: dict, prediction: dict, out) -> None:
    """Loss against compute: the runs (the ones the law used filled), the fitted law with its interval
    band, and the prediction with its interval; a PNG at `out`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NpgptError("the plot needs matplotlib: pip install 'npgpt[plot]'") from None
    from .files import atomic_open
    runs = f["runs"]
    C = np.array([r["flops"] for r in runs])
    lo, hi = np.log10(min(C.min(), prediction["flops"])) - 0.2, np.log10(max(C.max(), prediction["flops"])) + 0.2
    grid = np.logspace(lo, hi, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(C, [r["loss"] for r in runs], s=14, color="C0", label="runs the law was fitted to")
    if f["law"] == "power":
        curve = lambda p: power_loss(p, grid)  # noqa: E731
    else:  # the loss of the compute-optimal split at each C
        curve = lambda p: [chinchilla_loss(p, o["params"], o["tokens"]) for o in  # noqa: E731
                           (compute_optimal(f, c, p) for c in grid)]
    ax.plot(grid, curve(f["params"]), color="C0", label=f"{f['law']} law")
    if f.get("samples"):
        band = np.array([curve(p) for p in f["samples"][:100]])
        ax.fill_between(grid, np.percentile(band, 5, axis=0), np.percentile(band, 95, axis=0), color="C0", alpha=0.15)
    err = None
    if prediction["interval"]:
        lo, hi = prediction["interval"]  # a percentile interval need not hold the point estimate: clip
        err = [[max(0.0, prediction["loss"] - lo)], [max(0.0, hi - prediction["loss"])]]
    ax.errorbar([prediction["flops"]], [prediction["loss"]], yerr=err, fmt="*", color="C3", ms=10, capsize=3,
                label=f"prediction {prediction['loss']:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("final val loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- a source of known entropy
def teacher_corpus(out, *, n_tokens: int = 2_000_000, vocab_size: int = 32, order: int = 8, n_layer: int = 2,
                   n_embd: int = 64, sharpness: float = 4.0, streams: int = 256, seed: int = 0,
                   val_fraction: float = 0.05, force: bool = False) -> dict:
    """A prepared data dir of text sampled from a fixed random GPT (the teacher) that sees only the last
    `order` tokens: a stationary Markov source whose entropy rate is the mean entropy of its next-token
    distributions along the sample (its standard error is reported). A student whose windows give every
    scored token `order` tokens of context (final_loss does, for block_size >= 2 x order) cannot beat
    it, so a fitted irreducible loss should land on it.

    Tokens are characters of an alphabet of vocab_size letters; `streams` chains run side by side (each
    begins after a burn-in of 4 x order tokens) and are laid end to end. `sharpness` scales the teacher's
    logits: a random GPT's are nearly flat. Returns the meta dict with "entropy_rate" and its "stderr"."""
    from .data import prepare
    from .model import GPT
    from .tokenizer import Tokenizer
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    if not 2 <= vocab_size <= len(alphabet):
        raise NpgptError(f"vocab_size must be in 2..{len(alphabet)}, got {vocab_size}")
    cfg = GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 32), n_embd=n_embd, block_size=order,
                    vocab_size=vocab_size, dropout=0.0)
    teacher = GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    per = -(-n_tokens // streams)
    burn = 4 * order
    ctx = rng.integers(0, vocab_size, (streams, order))
    out_ids = np.empty((streams, per), np.int64)
    ent = np.empty((streams, per))
    for t in range(burn + per):
        z = teacher.forward(ctx, last_only=True)[:, -1].astype(np.float64) * sharpness
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        nxt = (p.cumsum(axis=1) < rng.random((streams, 1))).sum(axis=1).clip(max=vocab_size - 1)
        if t >= burn:
            out_ids[:, t - burn] = nxt
            ent[:, t - burn] = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
        ctx = np.concatenate([ctx[:, 1:], nxt[:, None]], axis=1)
    text = "".join(alphabet[i] for i in out_ids.reshape(-1)[:n_tokens])
    tok = Tokenizer.train_char([alphabet[:vocab_size]])
    from tempfile import TemporaryDirectory
    with TemporaryDirectory() as tmp:
        src = Path(tmp) / "teacher.txt"
        src.write_text(text)
        meta = prepare([src], out, tok, val_fraction=val_fraction, force=force)
    # per-stream means are independent draws: their spread gives the standard error honestly (tokens within a
    # stream are correlated)
    means = ent.mean(axis=1)
    teacher_info = {"entropy_rate": float(ent.mean()), "stderr": float(means.std(ddof=1) / np.sqrt(streams)),
                    "order": order, "vocab_size": vocab_size, "n_layer": n_layer, "n_embd": n_embd,
                    "sharpness": sharpness, "seed": seed, "tokens": n_tokens}
    atomic_write_json(Path(out) / "teacher.json", teacher_info)
    return {**meta, **teacher_info}
