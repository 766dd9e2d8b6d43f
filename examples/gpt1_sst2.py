"""GPT-1's core result at small scale: generative pretraining on unlabelled text, then discriminative
fine-tuning, beats the same architecture trained on the labelled data alone.

Pretraining corpus (unlabelled, lower-cased to match SST-2's text): War and Peace, LAMBADA's passages
(modern novels, the BooksCorpus genre GPT-1 pretrained on), WikiText-2 valid, and the SST-2 *training
sentences without their labels* -- the semi-supervised setting GPT-1 addresses: plenty of unlabelled text,
few labels. Dev sentences are never seen in pretraining. Labelled data: SST-2 sentence-level binary
(train 6,920 / dev 872), which we may use but not ship: pass its folder.

    python examples/gpt1_sst2.py --sst2 ../shared/data/sst2 --warpeace ../shared/data/warpeace/warpeace_input.txt \
        --lambada ../shared/data/lambada/lambada_test.jsonl --wikitext ../shared/data/wikitext2/valid.txt

Both arms share the tokenizer (a BPE trained on the pretraining corpus), the architecture, the
fine-tuning recipe and the seed; only the starting weights differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import npgpt
from npgpt.checkpoint import save_checkpoint
from npgpt.finetune import FinetuneConfig, finetune
from npgpt.model import GPT


def sst2_to_jsonl(src: Path, dst: Path, size: int | None = None, seed: int = 0):
    """SST-2's `LABEL sentence` lines as JSON lines; `size` keeps a seeded random subset."""
    recs = []
    for line in src.read_text(encoding="utf-8").splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            recs.append(json.dumps({"text": text, "label": "positive" if label == "1" else "negative"}))
    if size:
        import random
        recs = random.Random(seed).sample(recs, size)
    dst.write_text("\n".join(recs) + "\n")


def read_labelled(path: Path):
    """(texts, labels as 0/1) of a JSON-lines SST-2 file."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in recs], [float(r["label"] == "positive") for r in recs]


def sentence_features(model, texts):
    """[N, 2C] frozen features per sentence: the mean and the last of the final hidden states."""
    import numpy as np
    rows = []
    for text in texts:
        h = model.features(np.array([model.tokenizer.encode(text)[-model.config.block_size:]]))[0]
        rows.append(np.concatenate([h.mean(0), h[-1]]))
    model.drop_activations()
    return np.array(rows, np.float64)


def bag_of_words_features(tok, texts):
    """[N, V] which tokens a sentence contains: the baseline a representation has to beat."""
    import numpy as np
    X = np.zeros((len(texts), tok.vocab_size), np.float32)
    for i, text in enumerate(texts):
        X[i, tok.encode(text)] = 1.0
    return X


def logistic_regression(X, y, Xd, yd, standardise: bool, l2: float = 1e-2, lr: float = 0.5) -> float:
    """Fit L2-regularised logistic regression on (X, y) by full-batch gradient descent; accuracy on (Xd, yd)."""
    import numpy as np
    if standardise:
        mu, sd = X.mean(0), X.std(0) + 1e-6
        X, Xd = (X - mu) / sd, (Xd - mu) / sd
    w, b = np.zeros(X.shape[1], X.dtype), 0.0
    for _ in range(500):
        p = 1.0 / (1.0 + np.exp(-(X @ w + b)))
        w -= lr * (X.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    return float(((Xd @ w + b > 0) == yd).mean())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sst2", required=True, help="folder with stsa.binary.train and stsa.binary.dev")
    ap.add_argument("--warpeace", required=True, help="War and Peace text file")
    ap.add_argument("--lambada", help="LAMBADA JSON lines (novel passages), optional extra pretraining text")
    ap.add_argument("--wikitext", help="WikiText-2 text, optional extra pretraining text")
    ap.add_argument("--out", default="runs/gpt1")
    ap.add_argument("--iters", type=int, default=6000)
    ap.add_argument("--threads", type=int, default=0, help="threads (0: all cores)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sizes", default="300,1000", help="low-resource training subset sizes")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning runs (subset + seed) per low-resource size")
    ap.add_argument("--all-seeds", type=int, default=3, help="fine-tuning seeds on all the labels")
    ap.add_argument("--retrain", action="store_true", help="pretrain again even if --out holds a model")
    ap.add_argument("--probe-only", action="store_true", help="only the linear probes of an existing run")
    args = ap.parse_args()
    if args.threads:
        npgpt.set_threads(args.threads)
    sst2, out = Path(args.sst2), Path(args.out)
    for f in ("stsa.binary.train", "stsa.binary.dev"):
        if not (sst2 / f).is_file():
            sys.exit(f"SST-2 not found: {sst2 / f} is missing (its licence does not allow shipping it; pass "
                     f"--sst2 with the folder that holds it)")
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    sst2_to_jsonl(sst2 / "stsa.binary.train", out / "train.jsonl")
    for n in sizes:
        for seed in range(args.seeds):
            sst2_to_jsonl(sst2 / "stsa.binary.train", out / f"train-{n}-{seed}.jsonl", size=n, seed=seed)
    sst2_to_jsonl(sst2 / "stsa.binary.dev", out / "dev.jsonl")
    for name in ("warpeace", "lambada", "wikitext"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            if name == "warpeace":
                sys.exit(f"pretraining corpus not found: {path}")
            print(f"note: {path} not found; pretraining without it", file=sys.stderr)
            setattr(args, name, None)
    corpus = [Path(args.warpeace).read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")]
    if args.lambada:
        corpus += [json.loads(line)["text"] for line in Path(args.lambada).read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    if args.wikitext:
        corpus.append(Path(args.wikitext).read_text(encoding="utf-8"))
    corpus += [line.split(" ", 1)[1] for line in (sst2 / "stsa.binary.train").read_text(encoding="utf-8").splitlines()
               if line.strip()]  # the labels stay behind
    (out / "pretrain.txt").write_text("\n\n".join(corpus).lower())

    if args.probe_only:
        return probes(out, sizes, args.seeds)
    t0 = time.time()
    if args.retrain or not (out / "pretrained" / "model.safetensors").is_file():
        npgpt.prepare([out / "pretrain.txt"], out / "data", "bpe:4096", val_fraction=0.05, force=True)
        arch = ["--n_layer", "4", "--n_head", "4", "--n_embd", "192", "--block_size", "64"]
        threads = ["--threads", str(args.threads)] if args.threads else []
        subprocess.run([sys.executable, "-m", "npgpt_cli.main", "train", *threads, "--data", str(out / "data"), "--out",
                        str(out / "pretrained"), "--force", *arch, "--batch_size", "32", "--max_iters",
                        str(args.iters), "--learning_rate", "1e-3", "--min_lr", "1e-4", "--eval_interval", "500",
                        "--dropout", "0.1"], check=True)
    t_pre = time.time() - t0
    pre = npgpt.load(out / "pretrained")
    scratch = GPT(pre.config, seed=1, tokenizer=pre.tokenizer)  # same shape and tokenizer, random weights
    save_checkpoint(out / "scratch", scratch, provenance={"created_by": "examples/gpt1_sst2.py (random init)"})

    runs = [("all", "train.jsonl", seed, FinetuneConfig(learning_rate=args.lr, epochs=3, batch_size=32, seed=seed))
            for seed in range(args.all_seeds)]
    for n in sizes:
        runs += [(str(n), f"train-{n}-{seed}.jsonl", seed,
                  FinetuneConfig(learning_rate=args.lr, epochs=10, batch_size=32, seed=seed))
                 for seed in range(args.seeds)]
    results = {"pretrain_seconds": t_pre, "pretrain_iters": args.iters, "runs": []}
    for size, train_file, seed, cfg in runs:
        for arm in ("pretrained", "scratch"):
            t = time.time()
            r = finetune(out / arm, "classify", out / train_file, out / "dev.jsonl", out / f"ft-{arm}", cfg,
                         force=True, quiet=True)
            results["runs"].append({"labels": size, "seed": seed, "arm": arm, **r["best"],
                                    "seconds": time.time() - t})
            print(f"{size:>5} labels, seed {seed}, {arm:<10}: dev accuracy {r['best']['val_acc']:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'SST-2 training labels':<22} {'pretrained + fine-tuned':>24} {'from scratch':>14}   runs")
    for size in ["all"] + [str(n) for n in sizes]:
        acc = {arm: [r["val_acc"] for r in results["runs"] if r["labels"] == size and r["arm"] == arm]
               for arm in ("pretrained", "scratch")}
        print(f"{size:<22} {sum(acc['pretrained']) / len(acc['pretrained']):>24.4f} "
              f"{sum(acc['scratch']) / len(acc['scratch']):>14.4f}   {len(acc['scratch'])}")
    probes(out, sizes, args.seeds)


def probes(out: Path, sizes, seeds):
    """Logistic regression on both arms' frozen features (linear probes: how much sentiment the
    representation holds before any fine-tuning) beside one on a bag of words, with the same labels;
    means over the low-resource subsets. Each sentence's features are computed once."""
    import numpy as np
    texts, labels = read_labelled(out / "train.jsonl")
    dev_texts, dev_labels = read_labelled(out / "dev.jsonl")
    row = {t: i for i, t in enumerate(texts)}
    feats = {}
    for arm in ("pretrained", "scratch"):
        model = npgpt.load(out / arm)
        feats[arm] = (sentence_features(model, texts), sentence_features(model, dev_texts), True)
    tok = npgpt.load(out / "pretrained").tokenizer
    feats["bow"] = (bag_of_words_features(tok, texts), bag_of_words_features(tok, dev_texts), False)
    yd = np.array(dev_labels)

    def accuracy(kind, idx, y):
        X, Xd, standardise = feats[kind]
        if standardise:  # hidden states: a linear probe
            return logistic_regression(X[idx], y, Xd, yd, standardise=True)
        return logistic_regression(X[idx], y.astype(np.float32), Xd, yd.astype(np.float32), standardise=False,
                                   l2=1e-3, lr=1.0)

    def subset(path):
        t, lab = read_labelled(path)
        return [row[x] for x in t], np.array(lab)

    print(f"\n{'linear probe, labels':<22} {'pretrained features':>24} {'random features':>16} {'bag of words':>13}")
    subsets = [(str(n), [subset(out / f"train-{n}-{seed}.jsonl") for seed in range(seeds)]) for n in sizes]
    subsets.append(("all", [(list(range(len(texts))), np.array(labels))]))
    for name, parts in subsets:
        acc = [np.mean([accuracy(kind, idx, y) for idx, y in parts]) for kind in ("pretrained", "scratch", "bow")]
        print(f"{name:<22} {acc[0]:>24.4f} {acc[1]:>16.4f} {acc[2]:>13.4f}", flush=True)


if __name__ == "__main__":
    main()
