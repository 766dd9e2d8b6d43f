"""Start-up: time from `npgpt generate` starting to its second token (fresh processes: the first comes
from the prompt's forward, the second from the first decode step, which may load Numba kernels), with a
warm Numba cache, and the cold compile time of the kernels each command uses (an empty cache dir).

    python benchmarks/startup.py        (uses the GPT-2 124M checkpoint that decode.py creates)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench-out"

FIRST_TOKEN = r"""
import time, sys
t0 = time.perf_counter()
from npgpt_cli.main import cli  # what the console script imports
import npgpt
m = npgpt.load(sys.argv[1])
first = []
npgpt.generate(m, sys.argv[2], 2, temperature=0, on_token=lambda t: first.append(time.perf_counter()))
print(first[1] - t0, "numba" in sys.modules)
"""

TRAIN_STEP = r"""
import time, numpy as np
from npgpt.config import preset
from npgpt.model import GPT
from npgpt.optim import AdamW
from npgpt.params import decay_mask
cfg = preset("nano")
m = GPT(cfg); opt = AdamW(m.flat, decay_mask(cfg))
x = np.zeros((2, cfg.block_size), np.int64)
t0 = time.perf_counter()
m.zero_grad(); m.loss(x, x, train=True, rng=np.random.default_rng(0)); m.backward(); opt.step(m.grad, 1e-3, 1.0)
print(time.perf_counter() - t0)
"""


def run(script, *args, cache_dir=None):
    env = {**os.environ}
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    return float(out[0]), out[1:] if len(out) > 1 else None


def main():
    fp32 = BENCH / "gpt2-124m-random"
    int8 = BENCH / "gpt2-124m-random-int8"
    if not (fp32 / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--new", "2", "--prompt", "8"],
                       check=True, capture_output=True)
    fp16 = BENCH / "gpt2-124m-random-fp16"
    from npgpt.convert import quantize_model
    for d, fmt in ((int8, "int8"), (fp16, "fp16")):
        if not (d / "model.safetensors").is_file():
            quantize_model(fp32, d, format=fmt, force=True)
    for name, d, prompt in (("shipped model", ROOT / "weights" / "shakespeare-char", "ROMEO:"),
                            ("GPT-2 124M fp32", fp32, "Hello, my name is"),
                            ("GPT-2 124M int8", int8, "Hello, my name is"),
                            ("GPT-2 124M fp16", fp16, "Hello, my name is")):
        run(FIRST_TOKEN, d, prompt)  # warm the OS page cache and the Numba cache
        warm = min(run(FIRST_TOKEN, d, prompt)[0] for _ in range(3))
        with tempfile.TemporaryDirectory() as cold_dir:
            cold, extra = run(FIRST_TOKEN, d, prompt, cache_dir=cold_dir)
        numba = extra and extra[0] == "True"
        print(f"{'second token, ' + name:<32} warm cache {warm:5.2f} s | cold cache {cold:5.2f} s "
              f"(compile {max(cold - warm, 0):.2f} s) | target <= 1.0 s | numba imported: {numba}", flush=True)
    run(TRAIN_STEP)
    warm = min(run(TRAIN_STEP)[0] for _ in range(2))
    with tempfile.TemporaryDirectory() as cold_dir:
        cold = run(TRAIN_STEP, cache_dir=cold_dir)[0]
    print(f"{'first training step (nano)':<32} warm cache {warm:5.2f} s | cold cache {cold:5.2f} s "
          f"(compile {max(cold - warm, 0):.2f} s)")


if __name__ == "__main__":
    main()
