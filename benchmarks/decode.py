"""GPT-2 124M inference on the CPU: prefill and decode tokens/s, npgpt vs llama.cpp (the engine people pick
for CPU inference; benchmarks/llamacpp.py builds it once) and transformers, and the memory-bandwidth bound
measured in the same run.

Random weights (speed does not depend on their values). Batch 1, float32, a 512-token prompt, 128 new
tokens, `--threads` threads for both (default 2).

    python benchmarks/decode.py [--threads N] [--new 128] [--prompt 512]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import npgpt
from npgpt.threads import thread_info
from npgpt.checkpoint import save_checkpoint
from npgpt.config import preset
from npgpt.model import GPT, KVCache

CKPT = Path(__file__).resolve().parent.parent / "bench-out" / "gpt2-124m-random"


def best(f, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def stream_bandwidth(threads: int) -> float:
    """Bytes/s read from DRAM by `threads` threads, each summing its own part of 1 GiB (too large for any
    cache). A single-threaded BLAS dot product reads about half as fast here: one core cannot keep the
    memory busy, so a bound taken from it would flatter every engine."""
    import numba as nb

    @nb.njit(nogil=True, fastmath=True)
    def part_sum(a):
        s = np.float32(0)
        for i in range(a.size):  # a view from 0: vectorised
            s += a[i]
        return s

    @nb.njit(parallel=True)
    def read_all(a, T):
        out = np.zeros(T, np.float32)
        chunk = a.size // T
        for t in nb.prange(T):
            out[t] = part_sum(a[t * chunk:(t + 1) * chunk])
        return out.sum()

    nb.set_num_threads(min(threads, nb.config.NUMBA_NUM_THREADS))
    a = np.ones(1 << 28, np.float32)
    read_all(a, threads)
    return a.nbytes / best(lambda: read_all(a, threads), 5)


def sgemm_flops() -> float:
    """FLOP/s of NumPy's BLAS on a prefill-like product: [512, 768] @ [768, 3072]."""
    a = np.random.default_rng(0).standard_normal((512, 768), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((768, 3072), dtype=np.float32)
    return 2 * 512 * 768 * 3072 / best(lambda: a @ b, 5)


def prefill_flops_per_token(cfg, T: int) -> float:
    """Matmul FLOPs per prompt token: weights (2 per multiply-add), causal attention, last-token head."""
    C, L = cfg.n_embd, cfg.n_layer
    weights = 2 * L * (C * 3 * C + C * C + 2 * C * cfg.d_ff)
    attention = 2 * L * 2 * C * (T + 1) / 2  # q k^T and att v over the causal half, on average
    return weights + attention + 2 * C * cfg.vocab_size / T


def npgpt_figures(model: GPT, prompt: np.ndarray, n_new: int):
    def prefill():
        cache = KVCache(model.config, 1, length=prompt.shape[1] + n_new)
        model.forward(prompt, kv=cache, last_only=True)
        return cache

    t_prefill = best(prefill)
    cache = prefill()
    tok = prompt[:, -1:]

    def decode():
        cache.length = prompt.shape[1]
        for _ in range(n_new):
            model.forward(tok, kv=cache, last_only=True)

    return prompt.shape[1] / t_prefill, n_new / best(decode, 2)


def transformers_figures(hf_dir: Path, prompt: np.ndarray, n_new: int, threads: int):
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging
    logging.disable_progress_bar()  # one figure per line
    torch.set_num_threads(threads)
    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = torch.from_numpy(prompt)
    tok = x[:, -1:]

    def step(inp, cache=None):
        """One forward pass; returns the KV cache. The cache is the second positional argument: named
        past_key_values before transformers 5.x renamed it (and its output field) to cache."""
        out = model(inp, cache, use_cache=True)
        return out["cache"] if "cache" in out else out["past_key_values"]

    with torch.inference_mode():
        t_prefill = best(lambda: step(x))

        def decode():
            cache = step(x)  # the prompt's cache, not timed
            t0 = time.perf_counter()
            for _ in range(n_new):
                cache = step(tok, cache)
            return time.perf_counter() - t0

        t_decode = min(decode() for _ in range(2))
    return prompt.shape[1] / t_prefill, n_new / t_decode


def llama_figures(hf_dir, threads: int):
    """llama-bench's figures for the same weights ({type: {"pp512", "tg128"}}), or why there are none."""
    import json
    import subprocess
    import sys
    if hf_dir is None:
        return "needs transformers and torch to convert the checkpoint"
    try:
        out = subprocess.run([sys.executable, str(Path(__file__).with_name("llamacpp.py")), str(hf_dir), "--threads",
                              str(threads)], capture_output=True, text=True, check=True, timeout=3600).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    npgpt.set_threads(args.threads)
    if not (CKPT / "model.safetensors").is_file():
        m = GPT(preset("gpt2-124m"), seed=0)
        m.tokenizer = npgpt.Tokenizer.gpt2()
        save_checkpoint(CKPT, m)
        del m
    int8_dir, fp16_dir = CKPT.parent / "gpt2-124m-random-int8", CKPT.parent / "gpt2-124m-random-fp16"
    import json
    from npgpt.convert import quantize_model
    from npgpt.quant import FORMATS
    for d, fmt in ((int8_dir, "int8"), (fp16_dir, "fp16")):
        cfg = d / "config.json"  # a copy in an earlier layout is written again
        if not cfg.is_file() or json.loads(cfg.read_text()).get("quantization", {}).get("scheme") != FORMATS[fmt]:
            quantize_model(CKPT, d, format=fmt, force=True)
    model = npgpt.load(CKPT)
    prompt = np.random.default_rng(0).integers(0, 50257, (1, args.prompt))
    weight_bytes = model.flat.nbytes
    # every decoded token reads all weights and the KV cache so far: 2 (k, v) x layers x C floats per
    # position, at the mean position of the timed decode
    cfg = model.config
    kv_bytes = 2 * cfg.n_layer * cfg.n_embd * 4 * (args.prompt + args.new / 2)
    bw = stream_bandwidth(args.threads)
    bound = bw / (weight_bytes + kv_bytes)
    flops = sgemm_flops()
    pre, dec = npgpt_figures(model, prompt, args.new)
    q8 = npgpt.load(int8_dir)
    q8_bytes = sum(getattr(p, "nbytes", 0) for p in q8.params.values())
    q8_pre, q8_dec = npgpt_figures(q8, prompt, args.new)
    try:
        import transformers  # noqa: F401
        from npgpt.convert import export_hf
        hf_dir = CKPT.parent / "gpt2-124m-random-hf"
        if not (hf_dir / "model.safetensors").is_file():
            export_hf(CKPT, hf_dir, force=True)
        hf_pre, hf_dec = transformers_figures(hf_dir, prompt, args.new, args.threads)
    except ImportError:
        hf_pre = hf_dec = None

    def ratio(a, b):
        return f"{a / b:.2f}x" if b else "n/a (transformers not installed)"

    print(f"GPT-2 124M fp32, batch 1, {args.threads} threads (OpenBLAS {thread_info()['blas_kernels']} "
          f"kernels); weights {weight_bytes / 1e6:.0f} MB + KV cache "
          f"{kv_bytes / 1e6:.0f} MB read per token; stream bandwidth {bw / 1e9:.1f} GB/s -> bound {bound:.1f} tok/s "
          f"(weights alone: {bw / weight_bytes:.1f})")
    print(f"{'prefill (' + str(args.prompt) + ' tokens)':<28} npgpt {pre:8.1f} tok/s | transformers "
          f"{hf_pre or 0:8.1f} tok/s | ratio {ratio(pre, hf_pre)}")
    print(f"{'decode (' + str(args.new) + ' tokens)':<28} npgpt {dec:8.1f} tok/s | transformers "
          f"{hf_dec or 0:8.1f} tok/s | ratio {ratio(dec, hf_dec)} | {dec / bound:.0%} of bandwidth bound")
    print(f"{'prefill vs sgemm':<28} npgpt {pre * prefill_flops_per_token(model.config, args.prompt) / 1e9:8.1f} "
          f"GFLOP/s | sgemm {flops / 1e9:.1f} GFLOP/s | {pre * prefill_flops_per_token(model.config, args.prompt) / flops:.0%}")
    print(f"{'decode int8':<28} npgpt {q8_dec:8.1f} tok/s | transformers {hf_dec or 0:8.1f} tok/s | ratio "
          f"{ratio(q8_dec, hf_dec)} | {q8_dec / dec:.2f}x npgpt fp32 | weights {q8_bytes / 1e6:.0f} MB, "
          f"bound {bw / (q8_bytes + kv_bytes):.0f} tok/s")
    print(f"{'prefill int8':<28} npgpt {q8_pre:8.1f} tok/s | ratio vs transformers fp32 {ratio(q8_pre, hf_pre)}")

    # against llama.cpp: its tg128 decodes from an empty context, so npgpt decodes after a short prompt
    short = prompt[:, :8]
    _, dec_short = npgpt_figures(model, short, args.new)
    _, q8_dec_short = npgpt_figures(q8, short, args.new)
    f16 = npgpt.load(fp16_dir)
    _, f16_dec_short = npgpt_figures(f16, short, args.new)
    f16_pre, _ = npgpt_figures(f16, prompt, 1)
    llama = llama_figures(hf_dir if hf_pre is not None else None, args.threads)
    for name, ours, peer in ((f"decode fp32 ({args.new}, short prompt)", dec_short, ("f32", f"tg{args.new}")),
                             (f"prefill fp32 ({args.prompt})", pre, ("f32", f"pp{args.prompt}")),
                             (f"decode int8 ({args.new}, short prompt)", q8_dec_short, ("q8_0", f"tg{args.new}")),
                             (f"prefill int8 ({args.prompt})", q8_pre, ("q8_0", f"pp{args.prompt}")),
                             (f"decode fp16 ({args.new}, short prompt)", f16_dec_short, ("f16", f"tg{args.new}")),
                             (f"prefill fp16 ({args.prompt})", f16_pre, ("f16", f"pp{args.prompt}"))):
        theirs = llama.get(peer[0], {}).get(peer[1]) if isinstance(llama, dict) else None
        ours_s = f"{ours:8.1f} tok/s"
        peer_s = f"{theirs:8.1f} tok/s" if theirs else f"not available ({llama})" if isinstance(llama, str) else "n/a"
        r = f" | ratio {ours / theirs:.2f}x" if ours and theirs else ""
        print(f"{name:<32} npgpt {ours_s} | llama.cpp {peer[0]} {peer[1]} {peer_s}{r}", flush=True)



if __name__ == "__main__":
    main()
