"""GPT-4's predictable scaling, reproduced small: predict a run's final loss before training it.

    python examples/scaling.py --corpus imdb|teacher               # 1. the grid, the fits, the prediction
    git add examples/scaling && git commit                          # 2. register the prediction
    python examples/scaling.py --corpus imdb|teacher --target       # 3. train the target, compare
    python examples/scaling.py --corpus imdb|teacher --target-isoflop   # 4. the measured optimum at its budget

Two corpora: IMDB reviews (runs/imdb-data, written by `make imdb-model`: 22.7M BPE tokens) and text
sampled from a fixed random teacher GPT that sees its last 8 tokens, whose entropy rate (the loss no
student can beat) is known; the power law's c and Chinchilla's E should land on it.

Step 1 trains an IsoFLOP grid (npgpt.scale.plan: 4 sizes per budget) whose largest budget is 1/10 of
the target's, fits L(C) = a C^b + c and Chinchilla's L(N, D) on all of it and on the runs of at most
1/100 of the target's compute, picks the target's size (the ladder size nearest the compute-optimal N
of the 1/10 Chinchilla fit) and writes examples/scaling/CORPUS-prediction.json with every prediction
and its 90% interval. On IMDB it also predicts a capability the GPT-4 way, -log(pass rate) = alpha C^-k
fitted over the compute frontier: greedy last-word accuracy on 1,000 held-out reviews (eval lambada).
Step 3 refuses to run until the prediction is committed and unchanged: the git history is the proof that
it came first. Every run resumes where it stopped (rerun any step to continue).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from npgpt.checkpoint import load_model
from npgpt.data import TokenData, read_jsonl
from npgpt.errors import NpgptError
from npgpt.evaluate import eval_lambada
from npgpt.files import atomic_write_json
from npgpt.scale import (LADDER, fit, final_loss, flops_per_token, non_embedding_params, plan, plot, predict,
                         run_grid, size_config, teacher_corpus, write_plan)

HERE = Path(__file__).resolve().parent / "scaling"
CORPORA = {
    # budgets: the grid (the largest 1/10 of the target); small: the <= 1/100 cut
    "imdb": dict(data="runs/imdb-data", budgets=[5e11, 1e12, 2e12, 3e12, 1e13, 3e13], target=3e14),
    "teacher": dict(data="runs/scaling/teacher-data", budgets=[2e11, 4e11, 7e11, 1e12, 3e12, 1e13], target=1e14),
}
BLOCK, BATCH, PER_BUDGET = 128, 8, 4
TEACHER = dict(n_tokens=4_000_000, vocab_size=32, order=8, n_layer=2, n_embd=64, sharpness=6.0, streams=4096, seed=0)


def lambada_items(imdb_dir: Path, n: int = 1000) -> list[dict]:
    """Held-out reviews (dev, never pretrained on) cut after a sentence's last word: the model must
    produce that word. Passages of 40+ words, the word alphabetic and 3+ letters."""
    items = []
    for r in read_jsonl(imdb_dir / "dev.jsonl", ("text",)):
        text = r["text"].replace("<br />", "\n")
        for end in (i for i, ch in enumerate(text) if ch == "." and i > 200):
            passage = text[:end]
            word = passage.rsplit(" ", 1)[-1]
            if word.isalpha() and len(word) >= 3 and len(passage.split()) >= 40:
                items.append({"text": passage})
                break
        if len(items) == n:
            break
    return items


def capability(out: Path, runs: list[dict], items: list[dict]) -> dict:
    """{run name: greedy last-word accuracy}, cached in out/capability.json."""
    path = out / "capability.json"
    got = json.loads(path.read_text()) if path.is_file() else {}
    for r in runs:
        if r["name"] not in got:
            got[r["name"]] = eval_lambada(load_model(out / r["name"]), items)["acc"]
            atomic_write_json(path, got)
    return got


def fit_capability(runs: list[dict], acc: dict, target_flops: float, seed: int = 0, boots: int = 200) -> dict:
    """-log(pass) = alpha C^-k over the compute frontier (each budget's best run by pass rate), by least
    squares in log-log; the pass rate predicted at target_flops with a bootstrap 90% interval."""
    best = {}
    for r in runs:
        if 0 < acc[r["name"]] < 1 and (r["budget"] not in best or acc[r["name"]] > acc[best[r["budget"]]["name"]]):
            best[r["budget"]] = r
    pts = sorted(best.values(), key=lambda r: r["flops"])
    if len(pts) < 3:
        return {"note": f"only {len(pts)} budgets with a pass rate strictly between 0 and 1"}
    x = np.log([r["flops"] for r in pts])
    y = np.log(-np.log([acc[r["name"]] for r in pts]))

    def at(i):
        slope, icpt = np.polyfit(x[i], y[i], 1)
        return float(np.exp(-np.exp(icpt + slope * math.log(target_flops)))), -slope, float(np.exp(icpt))

    pass_rate, k, alpha = at(np.arange(len(x)))
    rng = np.random.default_rng(seed)
    draws = [at(i)[0] for i in (rng.integers(0, len(x), len(x)) for _ in range(boots)) if len(set(i)) > 2]
    return {"pass_rate": pass_rate, "interval": [float(v) for v in np.percentile(draws, [5, 95])],
            "k": k, "alpha": alpha, "points": [[r["flops"], acc[r["name"]]] for r in pts]}


def target_config(f: dict, data: TokenData, target: float) -> dict:
    """The ladder size nearest (in log N) the fit's compute-optimal N, trained for the steps `target` buys."""
    n_opt = predict(f, flops=target)["optimal"]["params"]
    sizes = [size_config(l_, c, BLOCK, data.vocab_size) for l_, c in LADDER]
    cfg = min(sizes, key=lambda c: abs(math.log(non_embedding_params(c) / n_opt)))
    steps = int(target // (flops_per_token(cfg) * BATCH * BLOCK))
    return {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "steps": steps, "params": non_embedding_params(cfg),
            "tokens": steps * BATCH * BLOCK, "flops": flops_per_token(cfg) * steps * BATCH * BLOCK,
            "n_opt": n_opt}


def committed(path: Path) -> bool:
    """The file is tracked by git and the working copy equals the committed one."""
    rel = str(path.relative_to(Path(__file__).resolve().parent.parent))
    cwd = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=cwd, capture_output=True).returncode == 0
    clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", rel], cwd=cwd).returncode == 0
    return tracked and clean


def grid(corpus: str, out: Path) -> tuple[TokenData, list[dict]]:
    c = CORPORA[corpus]
    if corpus == "teacher" and not (Path(c["data"]) / "meta.json").is_file():
        print(f"sampling the teacher corpus into {c['data']} ...", file=sys.stderr)
        teacher_corpus(c["data"], **TEACHER)
    if not (Path(c["data"]) / "meta.json").is_file():
        raise NpgptError(f"{c['data']} is missing: `make imdb-model` prepares it")
    data = TokenData(c["data"])
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "grid.json").is_file():
        write_plan(plan(c["budgets"], c["data"], block_size=BLOCK, batch_size=BATCH, per_budget=PER_BUDGET),
                   out / "grid.json")
    return data, run_grid(out / "grid.json", out)


def step_predict(corpus: str, out: Path):
    c = CORPORA[corpus]
    data, runs = grid(corpus, out)
    pred = {"corpus": corpus, "target_flops": c["target"], "block_size": BLOCK, "batch_size": BATCH, "fits": {}}
    for cut in (10, 100):
        use = [r for r in runs if r["flops"] <= c["target"] / cut]
        for law in ("power", "chinchilla"):
            f = fit(use, law)
            atomic_write_json(out / f"fit-{law}-{cut}.json", f)
            pred["fits"][f"{law}, <= 1/{cut}"] = {"params": f["params"], "intervals": f["intervals"],
                                                  "runs": len(f["runs"]), "largest_run_flops": max(r["flops"] for r in use)}
            if law == "chinchilla" and cut == 10:
                pred["target"] = target_config(f, data, c["target"])
    t = pred["target"]
    for key, spec in pred["fits"].items():
        f = json.loads((out / f"fit-{key.split(',')[0]}-{key.split('/')[1]}.json").read_text())
        p = predict(f, flops=t["flops"]) if f["law"] == "power" else predict(f, params=t["params"], tokens=t["tokens"])
        spec["prediction"] = {"loss": p["loss"], "interval": p["interval"]}
        plot(f, p, HERE / f"{corpus}-{key.split(',')[0]}-{key.split('/')[1]}.png")
    if corpus == "teacher":
        pred["entropy_rate"] = json.loads((Path(c["data"]) / "teacher.json").read_text())
    if corpus == "imdb":
        acc = capability(out, runs, lambada_items(Path("runs/imdb")))
        pred["capability"] = fit_capability([r for r in runs if r["flops"] <= c["target"] / 10], acc, t["flops"])
    HERE.mkdir(exist_ok=True)
    atomic_write_json(HERE / f"{corpus}-prediction.json", pred)
    print(json.dumps(pred, indent=1))
    print(f"\nwrote {HERE / f'{corpus}-prediction.json'}: commit it, then run with --target", file=sys.stderr)


def train_size(data_dir: str, out: Path, n_layer: int, n_embd: int, steps: int, vocab: int) -> float:
    """Train one size for `steps` (resumable) and return its final loss; the grid's recipe (plan)."""
    from npgpt.scale import learning_rate
    from npgpt.train import train
    cfg = size_config(n_layer, n_embd, BLOCK, vocab)
    lr = learning_rate(n_embd)
    started = (out / "state.json").is_file()
    train(data_dir, out, resume=started, quiet=False, overrides={
        "n_layer": n_layer, "n_head": cfg.n_head, "n_embd": n_embd, "block_size": BLOCK, "dropout": 0.0,
        "batch_size": BATCH, "max_iters": steps, "learning_rate": lr, "min_lr": lr / 10,
        "warmup_iters": max(1, min(100, steps // 10)), "eval_interval": max(1, steps // 10), "eval_iters": 10,
        "seed": 1337})
    return final_loss(load_model(out), TokenData(data_dir))


def step_target(corpus: str, out: Path):
    path = HERE / f"{corpus}-prediction.json"
    if not path.is_file() or not committed(path):
        raise NpgptError(f"{path} must be committed (and unchanged) before the target is trained")
    pred = json.loads(path.read_text())
    t, c = pred["target"], CORPORA[corpus]
    data = TokenData(c["data"])
    loss = train_size(c["data"], out / "target", t["n_layer"], t["n_embd"], t["steps"], data.vocab_size)
    result = {"loss": loss, "predictions": {}}
    for key, spec in pred["fits"].items():
        p = spec["prediction"]
        result["predictions"][key] = {"loss": p["loss"], "error": p["loss"] / loss - 1,
                                      "inside_interval": p["interval"][0] <= loss <= p["interval"][1]}
    if corpus == "imdb" and "pass_rate" in pred.get("capability", {}):
        result["pass_rate"] = eval_lambada(load_model(out / "target"), lambada_items(Path("runs/imdb")))["acc"]
    atomic_write_json(HERE / f"{corpus}-result.json", result)
    print(json.dumps(result, indent=1))


def step_target_isoflop(corpus: str, out: Path):
    """The target's budget spent on the ladder neighbours of the target size too: a parabola in ln N
    through the three gives the measured compute-optimal N."""
    pred = json.loads((HERE / f"{corpus}-prediction.json").read_text())
    t, c = pred["target"], CORPORA[corpus]
    data = TokenData(c["data"])
    i = LADDER.index((t["n_layer"], t["n_embd"]))
    rows = []
    for n_layer, n_embd in LADDER[max(0, i - 1):i + 2]:
        cfg = size_config(n_layer, n_embd, BLOCK, data.vocab_size)
        steps = int(c["target"] // (flops_per_token(cfg) * BATCH * BLOCK))
        name = "target" if (n_layer, n_embd) == (t["n_layer"], t["n_embd"]) else f"iso-l{n_layer}-d{n_embd}"
        loss = train_size(c["data"], out / name, n_layer, n_embd, steps, data.vocab_size)
        rows.append((non_embedding_params(cfg), loss))
    c2, c1, _ = np.polyfit(np.log([n for n, _ in rows]), [l_ for _, l_ in rows], 2)
    measured = float(np.exp(-c1 / (2 * c2))) if c2 > 0 else None
    result = {"sizes": rows, "measured_n_opt": measured, "predicted_n_opt": t["n_opt"],
              "ratio": t["n_opt"] / measured if measured else None}
    atomic_write_json(HERE / f"{corpus}-isoflop.json", result)
    print(json.dumps(result, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", choices=sorted(CORPORA), required=True)
    ap.add_argument("--out", default=None, help="runs dir (default runs/scaling/CORPUS)")
    ap.add_argument("--target", action="store_true", help="train the target (after committing the prediction)")
    ap.add_argument("--target-isoflop", action="store_true", help="the target budget on the neighbouring sizes")
    a = ap.parse_args()
    out = Path(a.out or f"runs/scaling/{a.corpus}")
    try:
        if a.target_isoflop:
            step_target_isoflop(a.corpus, out)
        elif a.target:
            step_target(a.corpus, out)
        else:
            step_predict(a.corpus, out)
    except NpgptError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
