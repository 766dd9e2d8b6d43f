"""Two npgpt trainings at once on the same cores, with the default thread policy (no --threads): each
should run at about half the speed of one alone, not collapse (two 2-thread BLAS pools that busy-wait on
2 cores fight each other). Rows: one alone, two together, and two together with
`--threads <all cores>` forced (what the policy avoids).

    python benchmarks/oversubscribe.py [--iters 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_cmd(data: Path, out: Path, iters: int, threads: int | None):
    cmd = [sys.executable, "-m", "npgpt_cli.main", "train", "--data", str(data), "--out", str(out), "--force",
           "--quiet", "--max_iters", str(iters), "--eval_interval", str(iters), "--eval_iters", "1"]
    return cmd + (["--threads", str(threads)] if threads else [])


def run_together(data: Path, tmp: Path, n: int, iters: int, threads: int | None) -> list[float]:
    """Wall seconds of each of n concurrent trainings."""
    env = {k: v for k, v in os.environ.items() if k != "NPGPT_THREADS"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(train_cmd(data, tmp / f"run{i}", iters, threads), env=env) for i in range(n)]
    ends = []
    for p in procs:
        p.wait()
        ends.append(time.perf_counter() - t0)
        if p.returncode:
            sys.exit(f"a training failed (exit {p.returncode})")
    return ends


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args()
    import npgpt
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        npgpt.prepare([ROOT / "corpora" / "tinyshakespeare.txt"], tmp / "data", "char")
        run_together(tmp / "data", tmp, 1, 5, None)  # kernels compiled and cached
        alone = run_together(tmp / "data", tmp, 1, args.iters, None)[0]
        pair = run_together(tmp / "data", tmp, 2, args.iters, None)
        forced = run_together(tmp / "data", tmp, 2, args.iters, cores)
    print(f"baby training, {args.iters} steps, {cores} cores, default thread policy unless stated")
    print(f"{'one alone':<40} {alone:6.1f} s")
    print(f"{'two at once (shares the cores)':<40} {max(pair):6.1f} s each | {max(pair) / alone:.2f}x one alone "
          f"(ideal 2.0)")
    print(f"{'two at once, --threads ' + str(cores) + ' each':<40} {max(forced):6.1f} s each | "
          f"{max(forced) / alone:.2f}x one alone")


if __name__ == "__main__":
    main()
