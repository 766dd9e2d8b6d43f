"""`make bench`: npgpt training side by side with the PyTorch a user would write (benchmarks/torch_peer.py:
nn.Linear, scaled_dot_product_attention, torch.optim.AdamW; torch.compile as an extra row), same model,
same weights, same threads.

Every figure comes from a fresh process per side (no inherited heap or spinning thread pools); the sides
alternate for `--rounds` rounds and the median is printed, with the thread counts each side reported
after all its imports. One line per figure with the ratio (npgpt / peer; > 1 means npgpt is faster).
Torch is a benchmark-only dependency (`pip install -e .[ref]`).

    python benchmarks/run.py [--threads N] [--rounds 3] [--only baby,small,compile,sample]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_peer

import npgpt  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.model import GPT  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402
from npgpt.params import decay_mask  # noqa: E402
from npgpt.threads import thread_info  # noqa: E402

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


def bench_train_torch(cfg: GPTConfig, B: int, steps: int, warmup: int = 3, compiled: bool = False) -> float:
    """The same measurement for the PyTorch peer (torch.compile'd when `compiled`; its compilation happens
    in the warmup steps, outside the timing)."""
    import torch
    from torch_peer import adamw, peer_from_npgpt
    model = peer_from_npgpt(GPT(cfg, seed=0))
    opt = adamw(model)
    step_model = torch.compile(model) if compiled else model
    rng = np.random.default_rng(0)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        x = rng.integers(0, cfg.vocab_size, (B, cfg.block_size))
        xt, yt = torch.from_numpy(x), torch.from_numpy(np.roll(x, -1, axis=1))
        opt.zero_grad(set_to_none=True)
        step_model(xt, yt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return B * cfg.block_size * steps / (time.perf_counter() - t0)


def same_first_loss(cfg: GPTConfig, B: int = 2) -> tuple[float, float]:
    """Both sides' loss on one batch from the same weights: the peer computes what npgpt computes."""
    import torch
    from torch_peer import peer_from_npgpt
    ours = GPT(cfg, seed=0)
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, cfg.block_size))
    y = np.roll(x, -1, axis=1)
    with torch.no_grad():
        theirs = float(peer_from_npgpt(ours)(torch.from_numpy(x), torch.from_numpy(y)))
    return ours.loss(x, y), theirs


BENCH_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[3])
import run
import npgpt
from npgpt.config import GPTConfig
which, name, threads = sys.argv[1], sys.argv[2], int(sys.argv[4])
if which != "npgpt":
    import torch
    import torch_peer  # noqa: F401  (every import first: some set their own thread counts)
kw, B, steps = run.TRAIN_CONFIGS[name]
cfg = GPTConfig(vocab_size=65, **kw)
if which == "npgpt":
    used = npgpt.set_threads(threads)["blas"]
    tok_s = run.bench_train_npgpt(cfg, B, steps)
else:
    torch.set_num_threads(threads)
    used = torch.get_num_threads()
    tok_s = run.bench_train_torch(cfg, B, steps, compiled=which == "compile")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
print(tok_s, next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024, used)
"""


def train_figures(which: str, config: str, threads: int) -> tuple[float, float, int]:
    """(training tok/s, peak resident MB, threads in effect) of a fresh process for one side: "npgpt",
    "torch" (eager) or "compile" (torch.compile)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", BENCH_SCRIPT, which, config, str(Path(__file__).parent), str(threads)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[-3]), float(out[-2]), int(out[-1])


def line(name, ours, peer, unit, peer_name="torch"):
    ratio = f"{ours / peer:.2f}x" if peer else "n/a"
    peer_s = f"{peer:,.0f} {unit}" if peer else "not available"
    print(f"{name:<32} npgpt {ours:>10,.0f} {unit} | {peer_name} {peer_s:>16} | ratio {ratio}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="alternating fresh-process rounds per figure (median)")
    ap.add_argument("--only", default="baby,small,compile,sample")
    args = ap.parse_args()
    which = args.only.split(",")
    npgpt.set_threads(args.threads)
    try:
        import torch
        from torch_peer import PeerGPT  # noqa: F401
    except ImportError:
        torch = None
    print(f"npgpt {npgpt.__version__}, numpy {np.__version__} (OpenBLAS {thread_info()['blas_kernels']} "
          f"kernels), threads {args.threads}"
          + (f", torch {torch.__version__} ({'MKL' if torch.backends.mkl.is_available() else 'its own BLAS'}, "
             f"{torch.backends.cpu.get_cpu_capability()} kernels)" if torch else ", torch not installed: no peer"),
          flush=True)
    for name, (kw, B, steps) in TRAIN_CONFIGS.items():
        if name not in which:
            continue
        cfg = GPTConfig(vocab_size=65, **kw)
        sides = ["npgpt"] + (["torch"] + (["compile"] if "compile" in which else []) if torch else [])
        runs = {side: [] for side in sides}
        for _ in range(args.rounds):  # interleaved: this VM's speed drifts by 10-20% over minutes
            for side in sides:
                try:
                    runs[side].append(train_figures(side, name, args.threads))
                except Exception as e:  # torch.compile needs a working C++ toolchain
                    print(f"{side} failed: {str(e).splitlines()[0]}", flush=True)
        med = {side: [float(np.median([r[j] for r in rs])) for j in range(2)] + [rs[0][2]] for side, rs in runs.items() if rs}
        title = f"train {name} (B={B}, T={kw['block_size']})"
        if torch:
            a, b = same_first_loss(cfg)
            print(f"{title}: same weights, first-batch loss npgpt {a:.6f} | torch {b:.6f}; threads npgpt "
                  f"{med['npgpt'][2]}" + "".join(f", {s} {med[s][2]}" for s in sides[1:] if s in med), flush=True)
        line(title, med["npgpt"][0], med.get("torch", [None])[0], "tok/s", "torch eager")
        if "compile" in med:
            line(title, med["npgpt"][0], med["compile"][0], "tok/s", "torch.compile")
        ours_mb, peer_mb = med["npgpt"][1], med.get("torch", [None, None])[1]
        print(f"{'peak RSS train ' + name:<32} npgpt {ours_mb:>10,.0f} MB    | torch {peer_mb or 0:>13,.0f} MB | "
              f"npgpt/torch {ours_mb / peer_mb if peer_mb else float('nan'):.2f} (target <= 1)", flush=True)
    if "sample" in which:
        model = npgpt.load(ROOT / "weights" / "shakespeare-char")
        npgpt.generate(model, "ROMEO:", 5, seed=0)  # compile
        n = 200
        t0 = time.perf_counter()
        npgpt.generate(model, "ROMEO:", n, seed=0)
        print(f"{'sample shipped model (KV cache)':<32} npgpt {n / (time.perf_counter() - t0):>10,.0f} tok/s")


if __name__ == "__main__":
    main()
