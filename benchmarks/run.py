"""`make bench`: npgpt side by side with PyTorch eager in one run, same model, same threads.

Prints one line per figure with the ratio (npgpt / peer; > 1 means npgpt is faster). Torch is a
benchmark-only dependency (`pip install -e .[ref]`).

    python benchmarks/run.py [--threads N] [--only baby,small,sample]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test-only torch reference model

import npgpt  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.model import GPT  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402
from npgpt.params import decay_mask  # noqa: E402

TRAIN_CONFIGS = {  # (GPTConfig kwargs, batch size, timed steps); vocab 65 = tiny shakespeare, char-level
    "baby": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64), 12, 30),
    "small": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 8, 6),
}


def bench_train_npgpt(cfg: GPTConfig, B: int, steps: int, warmup: int = 3) -> float:
    """Training tokens/s: forward, backward, clip, AdamW on random batches."""
    model = GPT(cfg, seed=0)
    opt = AdamW(model.flat, decay_mask(cfg))
    rng = np.random.default_rng(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
        model.zero_grad()
        model.loss(x, np.roll(x, -1, axis=1))
        model.backward()
        opt.step(model.grad, 1e-3, 1.0)
    return B * cfg.block_size * steps / (time.perf_counter() - t0)


def bench_train_torch(cfg: GPTConfig, B: int, steps: int, warmup: int = 3) -> float:
    import torch
    from torch_ref import build_torch_model, make_adamw
    model = build_torch_model(cfg, GPT(cfg, seed=0).flat)
    opt = make_adamw(model)
    rng = np.random.default_rng(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
        xt, yt = torch.from_numpy(x), torch.from_numpy(np.roll(x, -1, axis=1))
        opt.zero_grad(set_to_none=True)
        model.loss(xt, yt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return B * cfg.block_size * steps / (time.perf_counter() - t0)


BENCH_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[3])
import run
from npgpt.config import GPTConfig
which, name, threads = sys.argv[1], sys.argv[2], int(sys.argv[4])
kw, B, steps = run.TRAIN_CONFIGS[name]
if which == "npgpt":
    import npgpt
    npgpt.set_threads(threads)
else:
    import torch
    torch.set_num_threads(threads)
tok_s = (run.bench_train_npgpt if which == "npgpt" else run.bench_train_torch)(GPTConfig(vocab_size=65, **kw), B, steps)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
print(tok_s, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def train_figures(which: str, config: str, threads: int) -> tuple[float, float]:
    """(training tok/s, peak resident MB) of a fresh process: neither side inherits the other's heap,
    thread pools or spinning OpenMP workers (one process for both once made npgpt 30% faster)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", BENCH_SCRIPT, which, config, str(Path(__file__).parent), str(threads)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-2]), float(out[-1])


def line(name, ours, peer, unit, peer_name="torch"):
    ratio = f"{ours / peer:.2f}x" if peer else "n/a"
    peer_s = f"{peer:,.0f} {unit}" if peer else "not installed"
    print(f"{name:<32} npgpt {ours:>10,.0f} {unit} | {peer_name} {peer_s:>16} | ratio {ratio}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", default="baby,small,sample")
    args = ap.parse_args()
    which = args.only.split(",")
    npgpt.set_threads(args.threads)
    try:
        import torch
    except ImportError:
        torch = None
    print(f"npgpt {npgpt.__version__}, numpy {np.__version__}, threads {args.threads}"
          + (f", torch {torch.__version__}" if torch else ", torch not installed"))
    for name, (kw, B, steps) in TRAIN_CONFIGS.items():
        if name not in which:
            continue
        # best of 3 alternating runs per side, each in a fresh process: this VM's speed drifts by 10-20%
        ours, peer = [], []
        for _ in range(3):
            ours.append(train_figures("npgpt", name, args.threads))
            if torch:
                peer.append(train_figures("torch", name, args.threads))
        line(f"train {name} (B={B}, T={kw['block_size']})", max(r[0] for r in ours),
             max(r[0] for r in peer) if torch else None, "tok/s")
        ours_mb = min(r[1] for r in ours)
        peer_mb = min(r[1] for r in peer) if torch else None
        print(f"{'peak RSS train ' + name:<32} npgpt {ours_mb:>10,.0f} MB    | torch {peer_mb or 0:>13,.0f} MB | "
              f"npgpt/torch {ours_mb / peer_mb if peer_mb else float('nan'):.2f} (target <= 1)", flush=True)
    if "sample" in which:
        model = npgpt.load(ROOT / "weights" / "shakespeare-char")
        model.generate("ROMEO:", 5, seed=0)  # compile
        n = 200
        t0 = time.perf_counter()
        model.generate("ROMEO:", n, seed=0)
        print(f"{'sample shipped model (KV cache)':<32} npgpt {n / (time.perf_counter() - t0):>10,.0f} tok/s")


if __name__ == "__main__":
    main()
