"""GPT-1's core result on IMDB: generative pretraining on unlabelled reviews, then discriminative
fine-tuning, beats the same network trained on the labels alone -- most of all when labels are few.

    python examples/imdb_data.py                 # once: runs/imdb/{pretrain,train,dev}.jsonl
    python examples/gpt1_imdb.py                 # resumable: finished runs are read from results.jsonl

Arms, all with the same tokenizer, architecture, recipe and seeds:
  pretrained   `npgpt finetune --model weights/imdb-reviews` (the shipped LM, pretrained on the unlabelled
               reviews and the training reviews without their labels; never on the dev split)
  scratch      the same with `--scratch`: fresh random weights
  lm0          pretrained without the auxiliary LM loss (lm_coef 0 instead of GPT-1's 0.5)
  bow          logistic regression on TF-IDF word unigrams and bigrams (the classic strong baseline)
  probe        logistic regression on the frozen LM's features (mean and last final hidden state):
               how much sentiment pretraining alone put into the representation; probe-random on the
               random network's features as its control

Labels: 500 of the 20,000 training reviews outside the dev split are held out (seed 0) to choose the
epoch and the baselines' regularisation; subsets of 100 and 1,000 labels are drawn from the other 19,500
with seeds 0, 1, 2; "all" is all 19,500. Every number is accuracy on the 5,000-review dev split (half
positive), scored once per run. The transfer row scores the all-labels pretrained classifier on SST-2's dev
sentences (a different corpus: short, lower-cased, tokenised) with no extra training.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import npgpt
from npgpt.finetune import FinetuneConfig, finetune, head_and_tail, predict

SIZES = (100, 1000)
EPOCHS = {100: 10, 1000: 6, "all": 3}   # GPT-1 fine-tuned 3 epochs; few labels need more passes
VAL = 500                               # labelled reviews held out to choose the epoch and the L2 strength
LR = 2e-4


# ---------------------------------------------------------------- label splits
def read_labelled(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def write_jsonl(path: Path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")


def make_splits(data: Path, out: Path, seeds: int) -> dict[str, Path]:
    """The selection split (val), the label subsets and the dev split as files under out/."""
    train = read_labelled(data / "train.jsonl")
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    val, pool = [train[i] for i in order[:VAL]], [train[i] for i in order[VAL:]]
    files = {"val": out / "val.jsonl", "all": out / "train-all.jsonl", "dev": data / "dev.jsonl"}
    write_jsonl(files["val"], val)
    write_jsonl(files["all"], pool)
    for n in SIZES:
        for seed in range(seeds):
            files[f"{n}-s{seed}"] = out / f"train-{n}-s{seed}.jsonl"
            write_jsonl(files[f"{n}-s{seed}"], random.Random(seed).sample(pool, n))
    return files


def sst2_dev(sst2: Path, out: Path) -> Path | None:
    src = sst2 / "stsa.binary.dev"
    if not src.is_file():
        print(f"note: {src} not found; no transfer row", file=sys.stderr)
        return None
    recs = [{"text": t, "label": "positive" if lab == "1" else "negative"}
            for lab, t in (line.split(" ", 1) for line in src.read_text(encoding="utf-8").splitlines() if line.strip())]
    write_jsonl(out / "sst2-dev.jsonl", recs)
    return out / "sst2-dev.jsonl"


def accuracy(pred_file_or_records, gold: Path) -> float:
    gold_labels = [r["label"] for r in read_labelled(gold)]
    return float(np.mean([p["prediction"] == g for p, g in zip(pred_file_or_records, gold_labels)]))


# ---------------------------------------------------------------- fine-tuning runs
def runs(seeds: int):
    """(name, subset key, arm, epochs key, FinetuneConfig) of every fine-tuning run, cheapest first."""
    out = []
    for n in SIZES:
        for seed in range(seeds):
            for arm in ("pretrained", "scratch", "lm0"):
                if arm == "lm0" and n != 1000:
                    continue
                cfg = FinetuneConfig(learning_rate=LR, epochs=EPOCHS[n], batch_size=32, warmup_fraction=0.1,
                                     seed=seed, scratch=arm == "scratch", lm_coef=0.0 if arm == "lm0" else 0.5)
                out.append((f"{arm}-{n}-s{seed}", f"{n}-s{seed}", arm, n, cfg))
    for arm in ("pretrained", "scratch"):
        cfg = FinetuneConfig(learning_rate=LR, epochs=EPOCHS["all"], batch_size=32, warmup_fraction=0.1, seed=0,
                             scratch=arm == "scratch")
        out.append((f"{arm}-all-s0", "all", arm, "all", cfg))
    return out


def run_finetunes(model: Path, files, out: Path, results: Path, seeds: int, sst2: Path | None):
    done = {r["name"] for r in read_results(results)}
    for name, subset, arm, size, cfg in runs(seeds):
        if name in done:
            continue
        ft = out / "ft" / name
        t0 = time.time()
        resume = (ft / "resume").is_dir()  # a run a stop interrupted goes on after its last epoch
        hist = finetune(model, "classify", files[subset], files["val"], ft, cfg, force=not resume, resume=resume,
                        quiet=True)
        t1 = time.time()
        dev_acc = accuracy(predict(ft, files["dev"]), files["dev"])
        t2 = time.time()
        rec = {"name": name, "kind": "finetune", "arm": arm, "labels": size, "seed": cfg.seed, "lm_coef": cfg.lm_coef,
               "best_epoch": hist["best"]["epoch"], "val_acc": hist["best"]["val_acc"], "dev_acc": dev_acc,
               "finetune_seconds": t1 - t0, "score_seconds": t2 - t1, "epochs": hist["epochs"]}
        if name == "pretrained-all-s0" and sst2:
            rec["sst2_acc"] = accuracy(predict(ft, sst2), sst2)
        append_result(results, rec)
        print(f"{name:<22} dev accuracy {dev_acc:.4f} (epoch {rec['best_epoch']}; fine-tune {t1 - t0:.0f} s, "
              f"score the dev split {t2 - t1:.0f} s)", flush=True)
        if name != "pretrained-all-s0":  # keep the one classifier worth keeping; the rest are 28 MB each
            for f in ft.iterdir():
                f.unlink()
            ft.rmdir()


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_result(path: Path, rec: dict):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------- baselines
WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased word unigrams and bigrams."""
    w = WORD.findall(text.lower())
    return w + [a + " " + b for a, b in zip(w, w[1:])]


class Sparse:
    """Rows of (index, value) pairs, CSR-style, with the two products logistic regression needs."""

    def __init__(self, rows: list[dict[int, float]], n_cols: int):
        self.n_rows, self.n_cols = len(rows), n_cols
        self.lengths = np.array([len(r) for r in rows], np.int64)
        self.row = np.repeat(np.arange(len(rows)), self.lengths)
        self.idx = np.fromiter((i for r in rows for i in r), np.int64, int(self.lengths.sum()))
        self.val = np.fromiter((v for r in rows for v in r.values()), np.float64, int(self.lengths.sum()))

    def __matmul__(self, w):                  # X @ w -> [rows]
        return np.bincount(self.row, weights=self.val * w[self.idx], minlength=self.n_rows)

    def rmatvec(self, r):                     # X.T @ r -> [cols]
        return np.bincount(self.idx, weights=self.val * r[self.row], minlength=self.n_cols)


def tfidf(train_texts, other_texts):
    """TF-IDF (sublinear tf, smoothed idf, L2-normalised rows) on terms seen in >= 2 training texts."""
    docs = [Counter(words(t)) for t in train_texts]
    df = Counter(term for d in docs for term in d)
    vocab = {t: i for i, t in enumerate(sorted(t for t, c in df.items() if c >= 2))}
    idf = np.zeros(len(vocab))
    for t, i in vocab.items():
        idf[i] = math.log((1 + len(docs)) / (1 + df[t])) + 1.0

    def rows(counters):
        out = []
        for d in counters:
            r = {vocab[t]: (1.0 + math.log(c)) * idf[vocab[t]] for t, c in d.items() if t in vocab}
            norm = math.sqrt(sum(v * v for v in r.values())) or 1.0
            out.append({i: v / norm for i, v in r.items()})
        return Sparse(out, len(vocab))

    return rows(docs), [rows(Counter(words(t)) for t in texts) for texts in other_texts]


def fit_logistic(X, y, l2: float, steps: int = 400, lr: float = 0.5):
    """L2-regularised logistic regression by full-batch Adam; X is a Sparse or a dense array."""
    dense = isinstance(X, np.ndarray)
    n_cols = X.shape[1] if dense else X.n_cols
    w, b = np.zeros(n_cols), 0.0
    m, v, mb, vb = np.zeros(n_cols), np.zeros(n_cols), 0.0, 0.0
    for t in range(1, steps + 1):
        z = X @ w + b
        r = (1.0 / (1.0 + np.exp(-z)) - y) / len(y)
        g = (X.T @ r if dense else X.rmatvec(r)) + l2 * w
        gb = float(r.sum())
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb * gb
        c1, c2 = 1 - 0.9 ** t, 1 - 0.999 ** t
        w -= lr * 0.1 * (m / c1) / (np.sqrt(v / c2) + 1e-8)
        b -= lr * 0.1 * (mb / c1) / (math.sqrt(vb / c2) + 1e-8)
    return lambda Xo: (Xo @ w + b) > 0


def choose_and_score(X, y, Xv, yv, Xd, yd, grid=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2)):
    """Pick the L2 strength on the selection split, then score the dev split."""
    best = max(grid, key=lambda l2: float((fit_logistic(X, y, l2)(Xv) == yv).mean()))
    return float((fit_logistic(X, y, best)(Xd) == yd).mean())


def lm_features(model, texts, batch: int = 16) -> np.ndarray:
    """[N, 2C] frozen features: the mean and the last of the final hidden states, head+tail truncated."""
    rows = []
    seqs = [head_and_tail(model.tokenizer.encode(t), model.config.block_size) for t in texts]
    for b0 in range(0, len(seqs), batch):
        part = seqs[b0:b0 + batch]
        T = max(len(s) for s in part)
        x = np.zeros((len(part), T), np.int64)
        for i, s in enumerate(part):
            x[i, :len(s)] = s  # right padding: causal attention never looks right
        h = model.features(x)
        for i, s in enumerate(part):
            rows.append(np.concatenate([h[i, :len(s)].mean(0), h[i, len(s) - 1]]))
        model.drop_activations()
    return np.array(rows, np.float64)


def run_baselines(model_dir: Path, files, out: Path, results: Path, seeds: int):
    done = {r["name"] for r in read_results(results)}
    subsets = [(f"{n}-s{s}", n, s) for n in SIZES for s in range(seeds)] + [("all", "all", 0)]
    pool = read_labelled(files["all"])
    val, dev = read_labelled(files["val"]), read_labelled(files["dev"])
    lab = lambda recs: np.array([r["label"] == "positive" for r in recs], np.float64)  # noqa: E731
    yv, yd = lab(val), lab(dev)
    for key, n, seed in subsets:
        name = f"bow-{n}-s{seed}"
        if name in done:
            continue
        train = read_labelled(files[key])
        t0 = time.time()
        X, (Xv, Xd) = tfidf([r["text"] for r in train], [[r["text"] for r in val], [r["text"] for r in dev]])
        acc = choose_and_score(X, lab(train), Xv, yv, Xd, yd)
        append_result(results, {"name": name, "kind": "bow", "arm": "bow", "labels": n, "seed": seed,
                                "dev_acc": acc, "seconds": time.time() - t0})
        print(f"{name:<22} dev accuracy {acc:.4f}", flush=True)
    index = {r["text"]: i for i, r in enumerate(pool)}
    for arm in ("probe", "probe-random"):
        if all(f"{arm}-{n}-s{seed}" in done for _, n, seed in subsets):
            continue
        cache = out / f"features-{arm}.npz"
        if cache.is_file():
            f = np.load(cache)
            F, Fv, Fd = f["pool"], f["val"], f["dev"]
        else:
            model = npgpt.load(model_dir)
            if arm == "probe-random":
                model = npgpt.GPT(model.config, seed=0, tokenizer=model.tokenizer)
            t0 = time.time()
            F, Fv, Fd = (lm_features(model, [r["text"] for r in recs]) for recs in (pool, val, dev))
            print(f"{arm} features of {len(pool) + len(val) + len(dev):,} reviews: {time.time() - t0:.0f} s", flush=True)
            np.savez(cache, pool=F, val=Fv, dev=Fd)
        mu, sd = F.mean(0), F.std(0) + 1e-6
        F, Fv, Fd = (F - mu) / sd, (Fv - mu) / sd, (Fd - mu) / sd
        for key, n, seed in subsets:
            name = f"{arm}-{n}-s{seed}"
            if name in done:
                continue
            idx = [index[r["text"]] for r in read_labelled(files[key])]
            acc = choose_and_score(F[idx], lab([pool[i] for i in idx]), Fv, yv, Fd, yd)
            append_result(results, {"name": name, "kind": "probe", "arm": arm, "labels": n, "seed": seed,
                                    "dev_acc": acc})
            print(f"{name:<22} dev accuracy {acc:.4f}", flush=True)


# ---------------------------------------------------------------- the table
def table(results: Path, out: Path):
    recs = read_results(results)
    arms = [("pretrained", "pretrained + fine-tuned"), ("scratch", "scratch (`--scratch`)"),
            ("lm0", "pretrained, no aux LM loss"), ("bow", "TF-IDF bag of words"),
            ("probe", "linear probe, pretrained"), ("probe-random", "linear probe, random net")]
    lines = ["| IMDB dev accuracy (5,000 reviews) | " + " | ".join(f"{n:,} labels" if isinstance(n, int) else
                                                               "all (19,500)" for n in (*SIZES, "all")) + " |",
             "|---|" + "---|" * (len(SIZES) + 1)]
    means = {}
    for arm, title in arms:
        cells = []
        for n in (*SIZES, "all"):
            acc = [r["dev_acc"] for r in recs if r["arm"] == arm and r["labels"] == n]
            means[arm, n] = float(np.mean(acc)) if acc else None
            cells.append("" if not acc else f"{np.mean(acc):.3f}" if len(acc) == 1 else
                         f"{np.mean(acc):.3f} ± {np.std(acc, ddof=1):.3f}")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    sst = [r["sst2_acc"] for r in recs if "sst2_acc" in r]
    if sst:
        lines.append(f"\nTransfer: the all-labels pretrained classifier on SST-2 dev (872 sentences), no extra "
                     f"training: **{sst[0]:.3f}**")
    t = [r for r in recs if r["arm"] == "pretrained" and r["labels"] == 1000]
    if t:
        lines.append(f"\nTime, 1,000 labels ({EPOCHS[1000]} epochs, the selection split scored each epoch): "
                     f"fine-tuning {np.median([r['finetune_seconds'] for r in t]) / 60:.1f} min, scoring the "
                     f"5,000 dev reviews {np.median([r['score_seconds'] for r in t]) / 60:.1f} min (medians)")
    text = "\n".join(lines)
    print("\n" + text)
    (out / "table.md").write_text(text + "\n")
    plot(means, out)


def plot(means, out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    xs = [100, 1000, 19500]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, style in (("pretrained", "o-"), ("scratch", "s-"), ("bow", "^--"), ("probe", "d:")):
        ys = [means.get((arm, n)) for n in (*SIZES, "all")]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training reviews")
    ax.set_ylabel("IMDB dev accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gpt1_imdb.png", dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="runs/imdb", help="output of examples/imdb_data.py")
    ap.add_argument("--model", default="weights/imdb-reviews", help="the pretrained LM")
    ap.add_argument("--sst2", default="../shared/data/sst2")
    ap.add_argument("--out", default="runs/gpt1-imdb")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    ap.add_argument("--only", choices=["finetune", "baselines", "table"], help="one stage (default: all)")
    args = ap.parse_args()
    if args.threads:
        npgpt.set_threads(args.threads)
    data, out = Path(args.data), Path(args.out)
    if not (data / "train.jsonl").is_file():
        sys.exit(f"{data}/train.jsonl not found: run `python examples/imdb_data.py --out {data}` first")
    out.mkdir(parents=True, exist_ok=True)
    files, results = make_splits(data, out, args.seeds), out / "results.jsonl"
    if args.only in (None, "baselines"):
        run_baselines(Path(args.model), files, out, results, args.seeds)
    if args.only in (None, "finetune"):
        run_finetunes(Path(args.model), files, out, results, args.seeds, sst2_dev(Path(args.sst2), out))
    table(results, out)


if __name__ == "__main__":
    main()
