"""Ship the LM that `make imdb-model` trained: copy it into weights/imdb-reviews and write its README
with the numbers measured from the run (tokens, compute, validation loss over the whole val split, a
sample), plus the fine-tuning table of `make experiment-gpt1` when runs/gpt1-imdb/table.md exists.

    python examples/imdb_ship.py [--run runs/imdb-reviews] [--data runs/imdb-data] [--out weights/imdb-reviews]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

import npgpt
from npgpt.data import TokenData
from npgpt.evaluate import perplexity
from npgpt.scale import flops_per_token

COMMANDS = """```bash
make imdb-model      # = the three commands below; rerun to resume exactly where it stopped
python examples/imdb_data.py --imdb ../shared/data/imdb --out runs/imdb
npgpt prepare runs/imdb/pretrain.jsonl --tokenizer bpe:8192 --val-fraction 0.01 --out runs/imdb-data
npgpt train --data runs/imdb-data --out runs/imdb-reviews \\
    --n_layer 6 --n_head 8 --n_embd 256 --block_size 256 --batch_size 16 --max_iters 6000 \\
    --learning_rate 1e-3 --min_lr 1e-4 --warmup_iters 200 --dropout 0.0 --weight_decay 0.1 \\
    --eval_interval 250 --eval_iters 40 --seed 1337
python examples/imdb_ship.py
```"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/imdb-reviews")
    ap.add_argument("--data", default="runs/imdb-data")
    ap.add_argument("--out", default="weights/imdb-reviews")
    ap.add_argument("--table", default="runs/gpt1-imdb/table.md")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    model = npgpt.load(run)
    cfg = model.config
    state = json.loads((run / "state.json").read_text())
    train_cfg = json.loads((run / "config.json").read_text())["train"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [m for m in metrics if "val_loss" in m]
    data = TokenData(args.data)
    val = np.asarray(data.tokens("val"), np.int64)
    whole = perplexity(model, ids=val, stride=cfg.block_size)
    tokens = state["tokens_seen"]
    sample = npgpt.generate(model, "This movie", 120, temperature=0.8, top_k=40, seed=1,
                            eos_id=model.tokenizer.eot_id)[0]  # as `npgpt generate`: a review ends there
    rates = sorted(m["tokens_per_sec"] for m in metrics if "tokens_per_sec" in m)
    rate = rates[len(rates) // 2]
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    n_weights = model.flat.size
    table = Path(args.table).read_text() if Path(args.table).is_file() else \
        "(`make experiment-gpt1` has not been run on this model yet.)"
    rows = " | ".join(f"{e['step']}" for e in evals[::4])
    vals = " | ".join(f"{e['val_loss']:.3f}" for e in evals[::4])
    readme = f"""# imdb-reviews: an LM pretrained on unlabelled movie reviews

A {n_weights / 1e6:.1f}M-parameter GPT pretrained with `npgpt train` on the IMDB reviews of Maas et al.
(2011): the 50,000 unlabelled reviews and the 25,000 labelled training reviews *without their labels*,
except a dev split of 5,000 training reviews (seed 0, 2,500 of each label) that pretraining never saw.
HTML line breaks became newlines; each review is one document followed by `<|endoftext|>`. The review
text itself is not shipped (research use only): `examples/imdb_data.py` rebuilds the corpus from it.
It is the starting point of GPT-1's experiment (`make experiment-gpt1`, table below).

| | |
|---|---|
| architecture | {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, context {cfg.block_size}, pre-LN, tanh GELU, tied head |
| tokenizer | byte-level BPE of {cfg.vocab_size:,} tokens trained on the pretraining text |
| data | {data.sizes['train']:,} train / {data.sizes['val']:,} val tokens (the last 1% of the shuffled reviews) |
| training | {state['step']:,} steps of {train_cfg['batch_size']} x {cfg.block_size} tokens ({tokens / 1e6:.1f}M tokens, {tokens / data.sizes['train']:.2f} passes), AdamW (0.9, 0.95), weight decay {train_cfg['weight_decay']}, lr {train_cfg['learning_rate']:g} -> {train_cfg['min_lr']:g} cosine after {train_cfg['warmup_iters']} warmup steps, no dropout, seed {train_cfg['seed']} |
| compute | {flops_per_token(cfg) * tokens:.2e} FLOPs ({flops_per_token(cfg) / 1e6:.0f} MFLOP per token: 6 x weights + attention) |
| **val loss** | **{evals[-1]['val_loss']:.3f}** (40 batches, as printed by training); **{whole['nll']:.3f}** over the whole val split in windows of {cfg.block_size} (perplexity {whole['perplexity']:.1f}) |
| wall time | {tokens / rate / 3600:.1f} h on 2 cores at the run's median {rate:,.0f} tokens/s ({state['elapsed'] / 3600:.1f} h of recorded step time, which counts the minutes the run was paused for benchmarks) |
| file | `model.safetensors`, {(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB float32 |

## Exact commands

{COMMANDS}

## Validation loss during training

| step | {rows} |
|---|{'---|' * len(evals[::4])}
| val | {vals} |

![loss curve](loss.png)

## A sample

`npgpt generate "This movie" --model weights/imdb-reviews --temperature 0.8 --top-k 40 --seed 1 -n 120`:

> {model.tokenizer.decode(sample).strip().replace(chr(10), chr(10) + '> ')}

## Fine-tuning on the labels (GPT-1)

{table}
"""
    (out / "README.md").write_text(readme)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
