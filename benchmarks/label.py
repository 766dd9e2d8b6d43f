"""`npgpt label score`, both paths, on real task statements (the release in ../shared, else the committed test
subset):

- the fine-tuned labeller (weights/exposure-labeller, else one of its shape with random weights: 6 layers x
  256, a BPE of 8,192 trained on the statements): tasks/s in length-sorted batches of 32 beside one task at a
  time, and the time all 19,265 tasks would take at that rate (issue #17's goal: <= 600 s on 2 cores);
- in context (the same body as an LM, the default rubric, 2 shots; the tasks of whole occupations, as a tasks
  file lists them): the shared prefix's KV cache with batched rows beside `eval choice`'s way,
  evaluate.continuation_logprobs per task (the whole prompt run again for every task).

    python benchmarks/label.py [--threads 2] [--n 300] [--n-icl 60]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import npgpt
from npgpt.adapt import TaskHead, add_special_tokens
from npgpt.config import GPTConfig
from npgpt.evaluate import continuation_logprobs
from npgpt.finetune import SPECIALS, FinetuneConfig, save_finetuned
from npgpt.label import (DEFAULT_RUBRIC, LABELS, classify_text, draw_shots, prompt_text, read_tasks,
                         score_in_context, score_tasks, shipped_labeller)
from npgpt.model import GPT
from npgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
ALL_TASKS = 19265


def data_dir() -> Path:
    full = ROOT.parent / "shared" / "data" / "gpts-are-gpts"
    return full if (full / "full_onet_data.tsv").is_file() else ROOT / "tests" / "fixtures" / "gpts-are-gpts"


def random_labeller(tasks, d: Path) -> Path:
    """A labeller of the shipped one's shape with random weights, saved as `npgpt finetune` saves one."""
    tok = Tokenizer.train_bpe([classify_text(t) for t in tasks], 8192)
    cfg = GPTConfig(n_layer=6, n_head=8, n_embd=256, block_size=256, vocab_size=tok.vocab_size)
    model, ids = add_special_tokens(GPT(cfg, seed=0, tokenizer=tok), SPECIALS)
    save_finetuned(d, model, TaskHead(cfg.n_embd, 3), "classify", list(LABELS), ids, FinetuneConfig(), [])
    return d


def per_task_in_context(model, tasks, pool, shots: int) -> np.ndarray:
    """The unshared way: each task's whole prompt through continuation_logprobs (as `eval choice` scores)."""
    tok, out = model.tokenizer, []
    conts = [tok.encode(" " + l) for l in LABELS]
    for t in tasks:
        demos = "".join(prompt_text(d, d["label"]) for d in draw_shots(pool, t["soc"], shots, 0))
        out.append([lp.sum() for lp in continuation_logprobs(model, tok.encode(DEFAULT_RUBRIC + demos + prompt_text(t)), conts)])
    return np.array(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--n", type=int, default=300, help="tasks for the fine-tuned labeller")
    ap.add_argument("--n-icl", type=int, default=60, help="tasks for the in-context comparison")
    args = ap.parse_args()
    threads = npgpt.set_threads(args.threads)
    d = data_dir()
    onet = read_tasks(d / "full_onet_data.tsv")
    pool = read_tasks(d / "full_labelset.tsv", "gpt4_exposure")
    sample = [onet[i] for i in sorted(np.random.default_rng(0).choice(len(onet), min(args.n, len(onet)), replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = shipped_labeller() if shipped_labeller().is_dir() else random_labeller(onet, Path(tmp) / "labeller")
        print(f"data: {d}; labeller: {model_dir}; threads: {threads}")
        score_tasks(model_dir, sample[:40])  # warm-up: Numba compiles, pages map
        t0 = time.perf_counter()
        batched = score_tasks(model_dir, sample, batch_size=32)
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = score_tasks(model_dir, sample[:max(1, len(sample) // 4)], batch_size=1)
        t_single = (time.perf_counter() - t0) * len(sample) / max(1, len(sample) // 4)
        assert np.allclose(single, batched[:len(single)], atol=1e-5)
        print(f"fine-tuned labeller, {len(sample)} tasks: batches of 32 {len(sample) / t_batch:,.1f} tasks/s, one at a "
              f"time {len(sample) / t_single:,.1f} tasks/s: {t_single / t_batch:.2f}x")
        print(f"  all {ALL_TASKS:,} tasks at that rate (extrapolated): {ALL_TASKS / (len(sample) / t_batch):,.0f} s "
              f"(goal: 600 s on 2 cores) -> {600 / (ALL_TASKS / (len(sample) / t_batch)):.2f}x the goal's rate")

        lm = npgpt.load(model_dir)
        socs = np.random.default_rng(0).permutation(sorted({t["soc"] for t in onet}))
        icl = [t for s in socs[:args.n_icl] for t in onet if t["soc"] == s][:args.n_icl]  # whole occupations, as a file has
        score_in_context(lm, icl[:3], shots=2, pool=pool)
        t0 = time.perf_counter()
        ours = score_in_context(lm, icl, shots=2, pool=pool)
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = per_task_in_context(lm, icl, pool, 2)
        t_theirs = time.perf_counter() - t0
        # (equal probabilities are tested in tests/test_label.py; a prompt cropped to the context keeps one
        # token more here than continuation_logprobs keeps, so only the labels are compared)
        agree = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
        print(f"in context (rubric + 2 shots), {len(icl)} tasks: shared prefix + batched rows {len(icl) / t_ours:,.2f} "
              f"tasks/s, continuation_logprobs per task {len(icl) / t_theirs:,.2f} tasks/s: {t_theirs / t_ours:.2f}x "
              f"(same label for {agree:.0%})")


if __name__ == "__main__":
    main()
