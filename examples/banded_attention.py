"""GPT-3's alternating dense and locally banded attention: does it lose anything to all-dense?

    python examples/banded_attention.py [--data ../shared/data/warpeace/warpeace_input.txt] [--steps 1000]

The `small` shapes (6 layers x 384, 6 heads) at context 2,048, batch 1, on War and Peace
(character-level, public domain), with the same seed, data order and schedule in each arm:
  D      every layer dense
  BD     banded (window 256) and dense alternating, GPT-3's pattern
  BBBD   three banded layers to each dense one (nanochat's pattern)
Every arm resumes where it stopped (rerun to continue). Printed per arm: the final validation loss,
tokens/s, and the training FLOPs per token (6 N for the weights plus the attention scores and
values, counted over the keys each query sees: T/2 on average in a dense layer, w in a banded one
once past the window), so the comparison can be read at equal steps and at equal compute.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import npgpt
from npgpt.data import TokenData
from npgpt.scale import final_loss, flops_per_token

ARMS = {"D": dict(attn_pattern="D"), "BD": dict(attn_pattern="BD", attn_window=256),
        "BBBD": dict(attn_pattern="BBBD", attn_window=256)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/warpeace/warpeace_input.txt")
    ap.add_argument("--out", default="runs/banded")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--arms", default="D,BD,BBBD")
    args = ap.parse_args()
    src, out = Path(args.data), Path(args.out)
    if not src.is_file():
        sys.exit(f"corpus not found: {src}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "meta.json").is_file():
        npgpt.prepare([src], out / "data", "char", val_fraction=0.05)
    base = dict(block_size=2048, batch_size=1, max_iters=args.steps, learning_rate=1e-3, min_lr=1e-4,
                warmup_iters=50, dropout=0.0, eval_interval=100, eval_iters=10, seed=1337)
    rows = []
    for arm in args.arms.split(","):
        run = out / arm
        resume = (run / "state.json").is_file()
        model = npgpt.train(out / "data", run, preset="small", overrides={**base, **ARMS[arm]}, resume=resume,
                            quiet=False)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [m for m in metrics if "val_loss" in m]
        speed = [m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m]
        whole = out / arm / "val_whole.json"  # the whole val split, windows advancing by half a context
        if not whole.is_file():
            whole.write_text(json.dumps({"nll": final_loss(model, TokenData(out / "data"))}))
        rows.append((arm, evals[-1]["val_loss"], json.loads(whole.read_text())["nll"], sorted(speed)[len(speed) // 2],
                     flops_per_token(model.config)))
    print(f"\n{'arm':<6} {'val loss (10 batches)':>21} {'whole val split':>16} {'tok/s':>8} {'GFLOP/token':>12}")
    for arm, vl, whole, tok_s, fl in rows:
        print(f"{arm:<6} {vl:21.4f} {whole:16.4f} {tok_s:8.0f} {fl / 1e9:12.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for arm, *_, fl in rows:
        evals = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()
                 if line.strip() and "val_loss" in line]
        evals = [e for e in evals if e["step"] >= 100]  # step 0 (4.5 nats) would flatten the rest
        steps, loss = [e["step"] for e in evals], [e["val_loss"] for e in evals]
        axes[0].plot(steps, loss, label=arm)
        axes[1].plot([s_ * 2048 * fl / 1e15 for s_ in steps], loss, label=arm)
    axes[0].set_xlabel("step (2,048 tokens)")
    axes[1].set_xlabel("training compute (PFLOP)")
    axes[0].set_ylabel("val loss (nats / char, 10 batches)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(__file__).resolve().parent / "banded.png", dpi=100)


if __name__ == "__main__":
    main()
