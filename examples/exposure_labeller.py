"""GPTs are GPTs with npgpt: an LLM-exposure labeller fine-tuned on GPT-4's labels of O*NET tasks, judged on
occupations it never saw.

    python examples/exposure_labeller.py --data ../shared/data/gpts-are-gpts --out runs/exposure --ship
    python examples/exposure_labeller.py --smoke --out /tmp/exposure-smoke      # minutes: the pipeline, tiny

Every stage is resumable: finished work is read back from --out, an interrupted LM run or fine-tuning goes
on where it stopped (rerun the same command).
  lm     the LM the labeller starts from: --base (default weights/imdb-reviews, `make imdb-model` then
         examples/imdb_ship.py) trained --lm-iters more steps on the 19,265 task statements, unlabelled
         (statements of the test folds included, never their labels); --base none: a small LM from scratch
  folds  the 738 labelled occupations split into --folds folds (seed 0); for each fold, fitted on the
         others: the majority class, a multinomial naive Bayes on the task statement's words, and the
         labeller (`npgpt finetune --task classify` on GPT-4's labels, its epoch chosen on a tenth of the
         training occupations), which scores the fold's tasks with `npgpt label score`
  table  pooled over the folds, beside the goals of issue #17: accuracy and kappa against GPT-4, kappa
         against the humans, Pearson r with GPT-4's occupation beta, the share of workers with beta >= 10%
  ship   (--ship) the labeller fine-tuned on all labelled tasks, copied to weights/exposure-labeller; it
         scores all 19,265 statements (timed); occupation aggregates and worker shares beside GPT-4's and
         the humans'; the in-context path at 0 and --icl-shots shots with the LMs; a plot; the README
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import npgpt
from npgpt.finetune import FinetuneConfig, finetune
from npgpt.threads import thread_info
from npgpt.label import (LABELS, MEASURES, aggregate, classify_examples, classify_text, evaluate_labels,
                         read_employment, read_labels, read_tasks, score_in_context, score_tasks, worker_shares,
                         write_labels)

GOALS = {"acc_gpt4": 0.80, "kappa_gpt4": 0.68, "kappa_human": 0.45, "r_beta": 0.90, "share_gap": 0.03,
         "seconds": 600}
WORD = re.compile(r"[a-z]+")


def write_jsonl(path: Path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def split_occupations(socs, k: int, seed: int = 0) -> dict[str, int]:
    """Occupation -> fold, the sorted codes shuffled with `seed` and dealt round-robin."""
    order = np.random.default_rng(seed).permutation(sorted(socs))
    return {s: i % k for i, s in enumerate(order)}


def hold_out(tasks, fraction: float = 0.1, seed: int = 0):
    """(train, val): val holds the tasks of a `fraction` of the occupations, for choosing the epoch."""
    socs = sorted({t["soc"] for t in tasks})
    val = set(np.random.default_rng(seed).permutation(socs)[:max(1, round(fraction * len(socs)))])
    return [t for t in tasks if t["soc"] not in val], [t for t in tasks if t["soc"] in val]


# ---------------------------------------------------------------- baselines
def naive_bayes(train, test, alpha: float = 1.0) -> np.ndarray:
    """Multinomial naive Bayes on the lower-cased words of the task statements, Laplace-smoothed: [N, 3]
    posteriors of the test tasks (words never seen in training are skipped)."""
    docs = [WORD.findall(t["task"].lower()) for t in train]
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    counts = np.full((3, len(vocab)), alpha)
    for d, t in zip(docs, train):
        np.add.at(counts[LABELS.index(t["label"])], [vocab[w] for w in d], 1)
    logp = np.log(counts / counts.sum(1, keepdims=True))
    prior = np.log(np.bincount([LABELS.index(t["label"]) for t in train], minlength=3) + alpha)
    s = np.array([prior + logp[:, [vocab[w] for w in WORD.findall(t["task"].lower()) if w in vocab]].sum(1)
                  for t in test])
    p = np.exp(s - s.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def majority(train, test) -> np.ndarray:
    p = np.zeros((len(test), 3))
    p[:, LABELS.index(Counter(t["label"] for t in train).most_common(1)[0][0])] = 1.0
    return p


# ---------------------------------------------------------------- stages
def lm_stage(args, onet, out: Path) -> Path:
    """The LM the labeller is fine-tuned from (see the module doc); returns its dir."""
    if args.lm_iters == 0:
        return Path(args.base)
    data, run = out / "lm-data", out / "lm"
    if not (data / "meta.json").is_file():
        write_jsonl(out / "statements.jsonl", [{"text": classify_text(t)} for t in onet])
        npgpt.prepare([out / "statements.jsonl"], data, args.base if args.base != "none" else f"bpe:{args.vocab}",
                      val_fraction=0.02)
    over = {"max_iters": args.lm_iters, "learning_rate": args.lm_lr, "min_lr": args.lm_lr / 10,
            "warmup_iters": min(100, args.lm_iters // 10), "batch_size": args.lm_batch, "eval_interval": 100,
            "eval_iters": 10, "dropout": 0.1}
    if (run / "state.json").is_file():
        npgpt.train(data, run, overrides={"max_iters": args.lm_iters}, resume=True)
    elif args.base != "none":
        npgpt.train(data, run, overrides=over, init=args.base)
    else:
        npgpt.train(data, run, preset="baby", overrides={**over, "block_size": 96, "n_embd": args.width,
                                                         "n_layer": args.layers, "n_head": 4})
    return run


def fine_tune(lm: Path, tasks, d: Path, args) -> Path:
    """The labeller fine-tuned on `tasks` (GPT-4's labels) in d/ft, its epoch chosen on held-out
    occupations; goes on after its last finished epoch when interrupted."""
    d.mkdir(parents=True, exist_ok=True)
    train, val = hold_out(tasks)
    write_jsonl(d / "train.jsonl", classify_examples(train))
    write_jsonl(d / "val.jsonl", classify_examples(val))
    cfg = FinetuneConfig(learning_rate=args.lr, epochs=args.epochs, batch_size=32, seed=0)
    finetune(lm, "classify", d / "train.jsonl", d / "val.jsonl", d / "ft", cfg, resume=(d / "ft" / "resume").is_dir())
    return d / "ft"


def fold_stage(args, lm: Path, gold, out: Path):
    """Every fold's test labels from the labeller, naive Bayes and the majority class: out/folds/K/*.jsonl."""
    fold = split_occupations({t["soc"] for t in gold}, args.folds)
    for k in range(args.folds):
        d = out / "folds" / str(k)
        test = [t for t in gold if fold[t["soc"]] == k]
        train = [t for t in gold if fold[t["soc"]] != k]
        d.mkdir(parents=True, exist_ok=True)
        write_labels(d / "naive_bayes.jsonl", test, naive_bayes(train, test))
        write_labels(d / "majority.jsonl", test, majority(train, test))
        if not (d / "labeller.jsonl").is_file():
            print(f"fold {k + 1}/{args.folds}: fine-tuning on {len(train):,} tasks, testing on {len(test):,}",
                  file=sys.stderr, flush=True)
            write_labels(d / "labeller.jsonl", test, score_tasks(fine_tune(lm, train, d, args), test))


def measures(labels, gold4, human, onet, emp, share4) -> dict:
    """The goal table's column of one labeller, from its labels of the labelled tasks."""
    e4, eh = evaluate_labels(labels, gold4), evaluate_labels(labels, human)
    share = worker_shares(aggregate(labels, onet), emp)["beta"]["0.1"]
    return {"acc_gpt4": e4["accuracy"], "kappa_gpt4": e4["kappa"], "kappa_human": eh["kappa"],
            "r_beta": e4["pearson"]["beta"], "share": share, "share_gap": abs(share - share4)}


def table_stage(args, gold4, human, onet, emp, out: Path) -> dict:
    """The cross-validated goal table (printed and returned)."""
    share4 = worker_shares(aggregate(gold4, onet), emp)["beta"]["0.1"]
    cols = {}
    for name in ("labeller", "naive_bayes", "majority"):
        labels = [r for k in range(args.folds) for r in read_labels(out / "folds" / str(k) / f"{name}.jsonl")]
        cols[name] = measures(labels, gold4, human, onet, emp, share4)
        cols[name]["per_fold_acc"] = [evaluate_labels(read_labels(out / "folds" / str(k) / f"{name}.jsonl"),
                                                      gold4)["accuracy"] for k in range(args.folds)]
    res = {"folds": args.folds, "tasks": len(gold4), "occupations": len({t["soc"] for t in gold4}),
           "share_gpt4": share4, "columns": cols}
    print(goal_table(res))
    return res


def goal_table(res: dict) -> str:
    c = res["columns"]
    rows = [("accuracy vs GPT-4", "acc_gpt4", ">= 0.80"), ("kappa vs GPT-4", "kappa_gpt4", ">= 0.68"),
            ("kappa vs human", "kappa_human", ">= 0.45"), ("occupation r with GPT-4 beta", "r_beta", ">= 0.90"),
            (f"workers with beta >= 10% (GPT-4: {res['share_gpt4']:.3f})", "share", "within 0.03")]
    lines = [f"occupation-held-out cross-validation: {res['folds']} folds, {res['tasks']:,} tasks of "
             f"{res['occupations']} occupations", "",
             "| measure | goal | labeller | naive Bayes | majority class |", "|---|---|---|---|---|"]
    for name, key, goal in rows:
        lines.append(f"| {name} | {goal} | " + " | ".join(f"{c[k][key]:.3f}" for k in c) + " |")
    lines.append("| accuracy per fold (labeller) | | " + ", ".join(f"{a:.3f}" for a in c["labeller"]["per_fold_acc"]) + " | | |")
    return "\n".join(lines)


def in_context(models, gold4, folds: int, n: int, shots, seed: int = 0) -> list[dict]:
    """Accuracy and kappa against GPT-4 of the in-context path on n tasks drawn (seeded) from the first
    cross-validation fold, with demonstrations from the other folds' GPT-4 labels."""
    fold = split_occupations({t["soc"] for t in gold4}, folds)
    test = [t for t in gold4 if fold[t["soc"]] == 0]
    sample = [test[i] for i in sorted(np.random.default_rng(seed).choice(len(test), min(n, len(test)), replace=False))]
    pool = [t for t in gold4 if fold[t["soc"]] != 0]
    rows = []
    for m in models:
        model = npgpt.load(m)
        for k in shots:
            try:
                p = score_in_context(model, sample, shots=k, pool=pool, seed=seed)
            except npgpt.NpgptError as e:  # e.g. a character vocabulary without digits
                rows.append({"model": str(m), "shots": k, "error": str(e)})
                continue
            labels = [{"soc": t["soc"], "task_id": t["task_id"], "label": LABELS[int(q.argmax())], "where": ""}
                      for t, q in zip(sample, p)]
            e = evaluate_labels(labels, sample)
            rows.append({"model": str(m), "shots": k, "n": len(sample), "accuracy": e["accuracy"], "kappa": e["kappa"],
                         "predicted": dict(Counter(r["label"] for r in labels))})
            print(f"in context: {m} {k} shots: accuracy {e['accuracy']:.3f}, kappa {e['kappa']:.3f}", file=sys.stderr)
    return rows


def ship_stage(args, lm: Path, gold4, human, onet, emp, out: Path, cv: dict) -> dict:
    """The shipped labeller: fine-tuned on all labelled tasks, then everything the README shows."""
    ft = out / "final" / "ft"
    if not (out / "final" / "done").is_file():
        fine_tune(lm, gold4, out / "final", args)
        (out / "final" / "done").write_text("")
    ship = Path(args.ship_to)
    ship.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "head.safetensors"):
        shutil.copy2(ft / f, ship / f)
    t0 = time.perf_counter()
    probs = score_tasks(ship, onet)
    seconds = time.perf_counter() - t0
    write_labels(out / "labels-all.jsonl", onet, probs)
    ours = read_labels(out / "labels-all.jsonl")
    occ = {"labeller (all occupations)": aggregate(ours, onet),
           "labeller (labelled occupations)": aggregate([r for r in ours if r["soc"] in {t["soc"] for t in gold4}], onet),
           "GPT-4": aggregate(gold4, onet), "human": aggregate(human, onet)}
    res = {"tasks": len(onet), "seconds": seconds, "threads": thread_info()["blas"],
           "aggregates": {k: {m: float(np.mean([o[m] for o in v])) for m in MEASURES} | {"occupations": len(v)}
                          for k, v in occ.items()},
           "shares": {k: worker_shares(v, emp) for k, v in occ.items()},
           "labels": dict(Counter(r["label"] for r in ours)),
           "in_context": in_context([m for m in (args.base, lm) if m != "none" and Path(m).is_dir()], gold4,
                                    args.folds, args.icl_n, [0] + args.icl_shots)}
    plot(occ, out / "exposure.png")
    if (out / "exposure.png").is_file():
        shutil.copy2(out / "exposure.png", ship / "exposure.png")
    (ship / "README.md").write_text(readme(args, cv, res), encoding="utf-8")
    print(f"scored {len(onet):,} tasks in {seconds:.0f} s; wrote {ship}", file=sys.stderr)
    return res


def plot(occ: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install npgpt[plot])", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 21)
    for name in ("labeller (all occupations)", "GPT-4", "human"):
        ax.hist([o["beta"] for o in occ[name]], bins, histtype="step", density=True, label=f"{name}, {len(occ[name])}")
    ax.set_xlabel("occupation beta (E1 + 0.5 E2, Core tasks x2)")
    ax.set_ylabel("density of occupations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme(args, cv: dict, res: dict) -> str:
    """weights/exposure-labeller/README.md from the measured numbers."""
    sh = res["shares"]
    share_rows = "\n".join(
        f"| {k} | {res['aggregates'][k]['occupations']} | " + " | ".join(f"{res['aggregates'][k][m]:.3f}" for m in MEASURES)
        + " | " + " | ".join(f"{sh[k][m][t]:.3f}" for m in ("alpha", "beta", "zeta") for t in ("0.1", "0.5")) + " |"
        for k in res["aggregates"])
    icl = "\n".join(f"| {r['model']} | {r['shots']} | " + (f"{r['accuracy']:.3f} | {r['kappa']:.3f} | {r['predicted']} |"
                                                          if "accuracy" in r else f"-- | -- | {r['error']} |")
                     for r in res["in_context"])
    return f"""# exposure-labeller

An LLM-exposure labeller for O*NET task statements (Eloundou et al. 2023, "GPTs are GPTs", arXiv 2303.10130):
`npgpt label score TASKS.tsv --out labels.jsonl` uses it when no --model is given. It reads a task as
"Title: Task" and gives E0 (no exposure), E1 (an LLM alone halves the time at equal quality) or E2 (software
built on an LLM would) with their probabilities. Fine-tuned (`npgpt finetune --task classify`, GPT-1's
recipe: lr {args.lr}, {args.epochs} epochs, batch 32, LM coefficient 0.5) from `{args.base}` + {args.lm_iters}
steps on the task statements, on GPT-4's labels (`gpt4_exposure`) of the {cv['tasks']:,} labelled tasks of
the release.

Data: openai/GPTs-are-GPTs @ 0471612 `data/` (MIT). Task statements from the O*NET database by the U.S.
Department of Labor, Employment and Training Administration (USDOL/ETA), used under CC BY 4.0; USDOL/ETA
has not approved, endorsed or tested this model. Employment: BLS OEWS national, May 2021 (public domain).

## Commands

```bash
make experiment-exposure          # = the line below; resumable, rerun to go on
python examples/exposure_labeller.py --data ../shared/data/gpts-are-gpts --out runs/exposure --ship
npgpt label score full_onet_data.tsv --out labels.jsonl
npgpt label aggregate labels.jsonl --tasks full_onet_data.tsv --out occupations.csv --employment national_May2021_dl.csv
npgpt label eval labels.jsonl --gold full_labelset.tsv --column gpt4_exposure
```

## Occupation-held-out cross-validation

{goal_table(cv)}

Throughput: all {res['tasks']:,} statements scored in {res['seconds']:.0f} s with {res['threads']} BLAS threads (goal: <= 600 s on 2 cores).

## Occupations and workers

Mean over occupations of alpha, beta, zeta, and the share of workers whose occupation has at least 10% / 50%
of its tasks exposed (BLS employment; an O*NET occupation counts for its SOC code, or for the broad group
where OEWS reports only that; a code's score is the mean of its occupations').

| labels | occupations | alpha | beta | zeta | alpha >= 10% | alpha >= 50% | beta >= 10% | beta >= 50% | zeta >= 10% | zeta >= 50% |
|---|---|---|---|---|---|---|---|---|---|---|
{share_rows}

![distribution of occupation beta](exposure.png)

## In context (the paper's way, with small LMs)

The default rubric, 0 or K demonstrations from other occupations, the three labels scored by likelihood;
{args.icl_n} tasks drawn from the first fold's occupations, demonstrations from the other folds, against
GPT-4's labels. A small LM lands near one class; a converted GPT-2 run by a user
(`npgpt label score --model models/gpt2 --shots 4 --pool full_labelset.tsv`) may do better (not measured here).

| model | shots | accuracy | kappa | predicted |
|---|---|---|---|---|
{icl}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/gpts-are-gpts")
    ap.add_argument("--out", default="runs/exposure")
    ap.add_argument("--base", default="weights/imdb-reviews", help="LM to start from, or none")
    ap.add_argument("--lm-iters", type=int, default=600)
    ap.add_argument("--lm-lr", type=float, default=3e-4)
    ap.add_argument("--lm-batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary with --base none")
    ap.add_argument("--layers", type=int, default=4, help="with --base none")
    ap.add_argument("--width", type=int, default=128, help="with --base none")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ship", action="store_true", help="also train, ship and describe the final labeller")
    ap.add_argument("--ship-to", default="weights/exposure-labeller")
    ap.add_argument("--icl-n", type=int, default=300)
    ap.add_argument("--icl-shots", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="the whole pipeline in minutes: 40 occupations, a tiny LM from scratch, 2 folds, 1 epoch")
    args = ap.parse_args()
    if args.smoke:
        args.base, args.lm_iters, args.vocab, args.layers, args.width = "none", 30, 512, 2, 32
        args.folds, args.epochs, args.icl_n, args.icl_shots = 2, 1, 30, [2]
        args.ship_to = str(Path(args.out) / "shipped")
    npgpt.set_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    if args.base != "none" and not Path(args.base).is_dir():
        sys.exit(f"error: no LM in {args.base}: build it (make imdb-model, then python examples/imdb_ship.py) or "
                 "give --base DIR, or --base none for a small LM trained on the task statements alone")
    out.mkdir(parents=True, exist_ok=True)
    gold4 = read_tasks(data / "full_labelset.tsv", "gpt4_exposure")
    human = read_tasks(data / "full_labelset.tsv", "human_exposure_agg")
    onet = read_tasks(data / "full_onet_data.tsv")
    emp = read_employment(data / "national_May2021_dl.csv")
    if args.smoke:  # 40 labelled occupations and 10 unlabelled ones
        labelled = sorted({t["soc"] for t in gold4})
        keep = set(labelled[::len(labelled) // 40][:40]) | set(sorted({t["soc"] for t in onet} - set(labelled))[:10])
        gold4, human, onet = ([t for t in ts if t["soc"] in keep] for ts in (gold4, human, onet))
    lm = lm_stage(args, onet, out)
    fold_stage(args, lm, gold4, out)
    cv = table_stage(args, gold4, human, onet, emp, out)
    res = {"cv": cv}
    if args.ship:
        res["ship"] = ship_stage(args, lm, gold4, human, onet, emp, out, cv)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    print(f"wrote {out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
