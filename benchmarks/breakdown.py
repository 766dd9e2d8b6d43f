"""Where the time goes: a per-layer breakdown of a training step (baby, small) and a GPT-2 124M decode
step, from cProfile's inclusive time per layer function (matmuls are inside linear/attention).

    python benchmarks/breakdown.py [--threads N]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import npgpt  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.model import GPT, KVCache  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402
from npgpt.params import decay_mask  # noqa: E402
from run import TRAIN_CONFIGS  # noqa: E402

LAYERS = ["linear_forward", "linear_backward", "attention_forward", "attention_backward", "layernorm_forward",
          "layernorm_backward", "gelu_forward", "gelu_backward", "embedding_forward", "embedding_backward",
          "token_nll", "cross_entropy_backward", "dropout_forward", "step"]


def breakdown(stmt: str, env: dict) -> dict[str, float]:
    prof = cProfile.Profile()
    prof.runctx(stmt, env, env)
    st = pstats.Stats(prof)
    total = max(v[3] for v in st.stats.values())  # the outermost call's cumulative time
    out = {}
    for (file, _, name), (_, _, tt, ct, _) in st.stats.items():
        if name in LAYERS and ("npgpt" in file):
            out[name] = out.get(name, 0.0) + ct
    out["(total)"] = total
    return out


def train_profile(name: str, steps: int = 5):
    kw, B, _ = TRAIN_CONFIGS[name]
    cfg = GPTConfig(vocab_size=65, **kw)
    model = GPT(cfg, seed=0)
    opt = AdamW(model.flat, decay_mask(cfg))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65, (B, cfg.block_size))

    def step():
        model.zero_grad()
        model.loss(x, x)
        model.backward()
        opt.step(model.grad, 1e-3, 1.0)

    step()
    return breakdown("for _ in range(n): step()", {"step": step, "n": steps})


def decode_profile(steps: int = 16):
    from npgpt.config import preset
    model = GPT(preset("gpt2-124m"), seed=0)
    cache = KVCache(model.config, 1, length=64 + steps)
    model.forward(np.zeros((1, 64), np.int64), kv=cache, last_only=True)
    tok = np.zeros((1, 1), np.int64)
    return breakdown("for _ in range(n): model.forward(tok, kv=cache, last_only=True)",
                     {"model": model, "cache": cache, "tok": tok, "n": steps})


def show(title, d):
    total = d.pop("(total)")
    print(f"\n{title}: {total * 1e3:.0f} ms profiled")
    for k, v in sorted(d.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<24} {v / total:6.1%}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    npgpt.set_threads(args.threads)
    show("train baby (5 steps)", train_profile("baby"))
    show("train small (2 steps)", train_profile("small", 2))
    show("decode GPT-2 124M (16 tokens)", decode_profile())


if __name__ == "__main__":
    main()
