"""Pretraining: the loop that `npgpt train` runs, as a library function.

One step = `grad_accum` micro-batches of `batch_size` windows, gradients summed with weight 1/k (equal to
one batch k times the size), global-norm clipping, AdamW with warmup + cosine decay. Every `eval_interval`
steps the train and val loss are estimated on fixed batches; checkpoints are written atomically. A run
resumes exactly: the checkpoint carries the step, Adam's state and the RNG state that draws batches and
dropout, so an interrupted and resumed run makes the same updates as an uninterrupted one. Under an MPI
launcher the micro-batches of a step are shared out among the ranks (npgpt.distributed): the same run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import load_model, load_optimizers, read_config, save_checkpoint
from .config import TrainConfig, config_from_dict, load_config_file, resolve_config
from .data import TokenData
from .distributed import join
from .errors import NpgptError
from .files import KINDS, LOCK, DirLock, atomic_open, claim_out, crash_point, current, dir_kind, recover
from .model import GPT
from .optim import AdamW, grad_norm, lr_at, require_finite
from .params import decay_mask, num_params
from .threads import rebalance, thread_info


def estimate_loss(model: GPT, data: TokenData, split: str, iters: int, batch_size: int, seed: int,
                  dist=None) -> float:
    """Mean loss over `iters` fixed batches (seeded, so every evaluation sees the same windows); under
    MPI (`dist`) each rank computes its share of the batches."""
    rng = np.random.default_rng([seed, 1 if split == "val" else 0])
    T = model.config.block_size
    losses = np.zeros(iters)
    for i in range(iters):
        x, y = data.batch(split, batch_size, T, rng)
        if dist is None or dist.owns(i, iters):
            losses[i] = model.loss(x, y)
    model.drop_activations()
    if dist is not None:
        dist.sum_owned(losses)
    return float(np.mean(losses))


def train(data_dir, out_dir, *, preset: str | None = None, config_file: str | None = None,
          overrides: dict | None = None, init: str | Path | None = None, resume: bool = False,
          force: bool = False, quiet: bool = False, verbose: bool = False, bucket_mb: float = 4.0,
          stream=None) -> GPT:
    """Train a GPT on a prepared data dir and write checkpoints to `out_dir`; returns the final model.

    Config precedence: preset < config_file < overrides (keys of GPTConfig or TrainConfig). With
    resume=True the run continues from `out_dir` with its saved configs (overrides may change training
    settings such as max_iters); a run killed before its first checkpoint starts again from step 0.
    An existing run in `out_dir` is refused unless resume or force (force removes it first).
    init starts from a checkpoint's weights instead of random ones (continued pretraining, or nanoGPT's
    fine-tuning of GPT-2 on new text): its architecture is kept (dropout may change) and the data must
    have been prepared with its tokenizer (`npgpt prepare --tokenizer INIT_DIR`).
    The run dir is locked for the whole run: a second process on it stops with an error.

    Started by an MPI launcher as one of N ranks (`mpirun -n N npgpt train ...`, with mpi4py), the N
    processes are one data-parallel job (see npgpt.distributed): grad_accum (a multiple of N) counts the
    micro-batches of the whole step, and the run makes the same updates as one process, so it resumes
    with any number of ranks. Rank 0 alone reads and writes `out_dir`; the data dir must be the same on
    every host. bucket_mb: the all-reduce buckets, sent while the backward goes on (0: one all-reduce
    after it). verbose: a line per step (with the time spent waiting for the sums, under MPI).
    """
    stream = stream or sys.stderr
    if init is not None and (resume or preset):
        raise NpgptError("--init takes the architecture from its checkpoint: give neither --resume nor --preset")
    if resume and force:
        raise NpgptError("give --resume or --force, not both")
    out = Path(out_dir)
    dist = join(bucket_mb)
    if dist is None:
        with contextlib.ExitStack() as held:
            data = TokenData(data_dir)
            run = _open_run(data, out, held, preset, config_file, overrides, init, resume, force, None)
            return _train(data, out, *run, quiet, verbose, stream, None)
    with dist.guard(), contextlib.ExitStack() as held:
        with dist.together():  # every rank reads the data first: a host without it stops the job at once
            data = TokenData(data_dir)
        dist.same([data.vocab_size, data.sizes], f"the prepared data in {data_dir}")
        with dist.together():
            run = _open_run(data, out, held, preset, config_file, overrides, init, resume, force, dist) \
                if dist.root else None
        return _train(data, out, *_share_run(dist, run), quiet or not dist.root, verbose, stream, dist)


def _open_run(data: TokenData, out: Path, held: contextlib.ExitStack, preset, config_file, overrides, init,
              resume: bool, force: bool, dist):
    """Lock `out` (until `held` closes), check what it holds, and start the run or resume it: (model
    config, train config, init dir, model, optimizer, step, rng, best val loss, elapsed seconds)."""
    started = (out / LOCK).exists()
    held.enter_context(DirLock(out))
    recover(out)
    kind = dir_kind(out)
    if resume and kind not in ("run", None):
        raise NpgptError(f"{out} holds {KINDS[kind]}, not a training run; nothing to resume")
    if resume and kind is None and not started:
        raise NpgptError(f"nothing to resume in {out} (no run was started there)")
    if not resume and kind == "run" and not force:
        raise NpgptError(f"{out} already holds a run; use --resume to continue it or --force to overwrite it")
    if not resume:
        claim_out(out, "run", force, lock=False)
    resume = resume and kind == "run"
    mcfg, tcfg, init, start = _configs(data, out, preset, config_file, overrides, init, resume)
    if dist is not None and tcfg.grad_accum % dist.size:
        raise NpgptError(f"grad_accum {tcfg.grad_accum} counts the micro-batches of a whole step: make it a "
                         f"multiple of the {dist.size} ranks (e.g. --grad_accum {dist.size})")
    return (mcfg, tcfg, init, resume) + _start_run(data, out, mcfg, tcfg, start, resume)


def _share_run(dist, run):
    """Rank 0's start of the run (see _open_run) on every rank: configs and counters as JSON, then the
    weights and Adam's moments."""
    head = None
    if dist.root:
        mcfg, tcfg, init, resume, model, opt, step, rng, best_val, elapsed = run
        head = {"model": dataclasses.asdict(mcfg), "train": dataclasses.asdict(tcfg), "init": init and str(init),
                "resume": resume, "t": opt.t, "step": step, "rng": rng.bit_generator.state,
                "best_val": best_val, "elapsed": elapsed}
    head = dist.share(head)
    if not dist.root:
        mcfg, tcfg = config_from_dict(head["model"]), config_from_dict(head["train"], TrainConfig)
        model = GPT(mcfg, np.empty(num_params(mcfg), np.float32))
        opt = AdamW(model.flat, decay_mask(mcfg), weight_decay=tcfg.weight_decay, beta1=tcfg.beta1,
                    beta2=tcfg.beta2, eps=tcfg.eps)
        opt.t, rng = head["t"], np.random.default_rng()
        rng.bit_generator.state = head["rng"]
        run = (mcfg, tcfg, head["init"], head["resume"], model, opt, head["step"], rng, head["best_val"],
               head["elapsed"])
    dist.share_arrays(model.flat, opt.m, opt.v)
    return run


def _configs(data: TokenData, out: Path, preset, config_file, overrides, init, resume: bool):
    """(model config, train config, the init dir, the init model or None): from the resumed run's saved
    configs, from the init checkpoint's architecture, or from a preset; then the file and overrides."""
    file_values = load_config_file(config_file) if config_file else {}
    start = None
    if resume:
        saved = read_config(out)
        base_model = config_from_dict(saved["model"])
        base_train = config_from_dict(saved.get("train") or {}, TrainConfig)
        mcfg, tcfg = resolve_config(None, file_values, overrides, base=base_model, train_base=base_train)
        if mcfg != base_model:
            raise NpgptError("cannot change the model's architecture when resuming")
        init = (saved.get("provenance") or {}).get("init")  # kept in the resumed run's provenance
    elif init is not None:
        start = _init_model(init, data)
        mcfg, tcfg = resolve_config(None, file_values, overrides, base=start.config)
        if dataclasses.replace(mcfg, dropout=start.config.dropout) != start.config:
            raise NpgptError(f"cannot change the architecture of the model in {init} (only dropout)")
    else:
        mcfg, tcfg = resolve_config(preset or "baby", file_values, overrides)
        mcfg = dataclasses.replace(mcfg, vocab_size=data.vocab_size).validate()
    if data.vocab_size > mcfg.vocab_size:
        raise NpgptError(f"data has {data.vocab_size} tokens, the model's vocabulary only {mcfg.vocab_size}")
    return mcfg, tcfg, init, start


def _start_run(data: TokenData, out: Path, mcfg, tcfg, start: GPT | None, resume: bool):
    """(model, optimizer, step, rng, best val loss, elapsed seconds): as the last checkpoint left them when
    resuming (the data must speak the run's tokenizer), else fresh (from `start`'s weights if given)."""
    if resume:
        model = load_model(out, mmap=False)
        if not data.tokenizer.same_vocab(model.tokenizer):
            raise NpgptError(f"the data in {data.dir} was not tokenized with this run's tokenizer; resume with "
                             f"the data the run started on (or prepare yours with --tokenizer {out})")
    else:
        model = GPT(mcfg, seed=tcfg.seed, tokenizer=data.tokenizer)
        if start is not None:
            model.flat[...] = start.flat
    opt = AdamW(model.flat, decay_mask(mcfg), weight_decay=tcfg.weight_decay, beta1=tcfg.beta1, beta2=tcfg.beta2,
                eps=tcfg.eps)
    if not resume:
        _truncate_metrics(out / "metrics.jsonl", 0)
        return model, opt, 0, np.random.default_rng(tcfg.seed), math.inf, 0.0
    state = _read_state(out)
    load_optimizers(out, {"": opt}, state["step"])
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    _truncate_metrics(out / "metrics.jsonl", state["step"])
    return model, opt, state["step"], rng, state.get("best_val_loss", math.inf), state.get("elapsed", 0.0)


def _train(data: TokenData, out: Path, mcfg, tcfg, init, resume: bool, model: GPT, opt: AdamW, step: int, rng,
           best_val: float, elapsed: float, quiet: bool, verbose: bool, stream, dist) -> GPT:
    """The loop, from a started run; under MPI on every rank (rank 0 alone writes and prints)."""
    T, B, k = mcfg.block_size, tcfg.batch_size, tcfg.grad_accum
    lead = dist is None or dist.root
    decay_iters = tcfg.lr_decay_iters or tcfg.max_iters
    ckpt_every = tcfg.ckpt_interval or tcfg.eval_interval
    provenance = {"data": str(data.dir), "tokenizer": data.tokenizer.kind, "created_by": "npgpt train"}
    if init is not None:
        provenance["init"] = str(init)

    th = thread_info()
    if not quiet:
        print(f"npgpt train: {model.num_params:,} parameters, {mcfg.n_layer} layers x {mcfg.n_embd} wide, "
              f"context {T}; batch {B} x {k} micro-batches; threads: BLAS {th['blas']}, Numba kernels 1 "
              f"({th['cores']} cores" + (f"; OpenBLAS {th['blas_kernels']} kernels)" if th["blas_kernels"] else ")"),
              file=stream)
        if dist is not None:
            print(f"data-parallel: {dist.size} MPI ranks, {k // dist.size} of the {k} micro-batches each; "
                  f"{dist.describe(model)}", file=stream)
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if th["blas"] and th["blas"] > 1 and busy + th["blas"] > (th["cores"] or 1) + 0.5:
            # two busy-waiting BLAS pools on the same cores were measured 25x slower per step
            print(f"warning: the machine is busy (load {busy:.1f} on {th['cores']} cores); if other jobs "
                  f"keep running, --threads 1 avoids oversubscription", file=stream)
        if resume:
            print(f"resuming from step {step}", file=stream)

    metrics = open(out / "metrics.jsonl", "a") if lead else None
    kept = f"the last good checkpoint in {out} is kept"

    def log(rec):
        if metrics is not None:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    def evaluate():
        tl = estimate_loss(model, data, "train", tcfg.eval_iters, B, tcfg.seed, dist)
        vl = (estimate_loss(model, data, "val", tcfg.eval_iters, B, tcfg.seed, dist) if data.sizes["val"] > T
              else math.nan)
        require_finite(f"the evaluation of step {step}", kept, train_loss=tl,
                       **({"val_loss": vl} if data.sizes["val"] > T else {}))
        log({"step": step, "train_loss": tl, "val_loss": vl})
        return tl, vl

    def checkpoint():
        if dist is not None:  # the other ranks wait, and learn whether it was written
            dist.check_replicas(model.flat)
        with dist.together() if dist else contextlib.nullcontext():
            if lead:
                os.fsync(metrics.fileno())  # the log of every step up to this one is on disk before the checkpoint
                state = {"step": step, "rng": rng.bit_generator.state, "best_val_loss": best_val,
                         "elapsed": elapsed, "tokens_seen": step * B * k * T}
                save_checkpoint(out, model, train_config=tcfg, optimizer=opt, state=state, provenance=provenance)
                if step:
                    _plot(out)

    bar = _Progress(tcfg.max_iters, step, stream, quiet, verbose)
    try:
        if step == 0:  # a fresh run: checkpoint the start, so that a kill at any moment can resume
            if not resume:
                checkpoint()
            tl, vl = evaluate()
            bar.message(f"step 0: train loss {tl:.4f}, val loss {vl:.4f}")
        t_last = time.perf_counter()
        while step < tcfg.max_iters:
            lr = lr_at(step, tcfg.learning_rate, tcfg.min_lr, tcfg.warmup_iters, decay_iters)
            model.zero_grad()
            losses = np.zeros(k)  # each micro-batch's loss / k
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below, once
                for i in range(k):
                    x, y = data.batch("train", B, T, rng)
                    if dist is not None and not dist.owns(i, k):
                        model.skip_dropout(B, T, rng)  # another rank's micro-batch
                        continue
                    losses[i] = model.loss(x, y, train=True, rng=rng) / k
                    model.backward(1.0 / k, **(dist.hooks(model, i, k) if dist else {}))
                grad = model.grad if dist is None else dist.reduce(model, losses)
                loss = 0.0
                for part in losses:  # in micro-batch order, as one process adds them
                    loss += float(part)
                norm = grad_norm(grad)
            require_finite(f"step {step + 1}", kept, loss=loss, gradient_norm=norm)
            opt.step(grad, lr, tcfg.grad_clip, norm=norm)
            step += 1
            crash_point("train step")
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            elapsed += dt
            tok_s = B * k * T / dt
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens_per_sec": tok_s}
            if dist is not None:
                rec["comm_wait_s"] = dist.wait_s
            log(rec)
            bar.update(step, loss, tok_s, f" (waited {dist.wait_s * 1e3:.1f} ms for the sums)" if dist else "")
            if step % 10 == 0:
                rebalance()  # another npgpt job may have started or ended: take this one's share
            if step % tcfg.eval_interval == 0 or step == tcfg.max_iters:
                tl, vl = evaluate()
                best_val = min(best_val, vl) if math.isfinite(vl) else best_val
                bar.message(f"step {step}: train loss {tl:.4f}, val loss {vl:.4f}")
            if step % ckpt_every == 0 or step == tcfg.max_iters:
                checkpoint()
            t_last = time.perf_counter()
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()
    return model


def _init_model(init, data: TokenData) -> GPT:
    """The checkpoint a run starts from, after checking that the data speaks its tokenizer."""
    start = load_model(init)
    if start.quantized:
        raise NpgptError(f"{init} holds a quantized model, which cannot be trained")
    if not data.tokenizer.same_vocab(start.tokenizer):
        raise NpgptError(f"the data in {data.dir} was not tokenized with the tokenizer of {init}; prepare it "
                         f"with: npgpt prepare FILES --tokenizer {init} --out DIR")
    return start


def _read_state(out: Path) -> dict:
    """state.json, the resume record, checked enough that a damaged one is an error, not a traceback."""
    try:
        state = json.loads(current(out, "state.json").read_text())
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("rng"), dict)):
            raise ValueError
        return state
    except (OSError, ValueError, UnicodeDecodeError):
        raise NpgptError(f"{out}/state.json is damaged; the run cannot be resumed") from None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line torn by a crash or a full disk is skipped."""
    recs = []
    if Path(path).is_file():
        for ln in Path(path).read_text(errors="replace").splitlines():
            try:
                rec = json.loads(ln)
            except ValueError:
                continue
            if isinstance(rec, dict):
                recs.append(rec)
    return recs


def _truncate_metrics(path: Path, step: int, key: str = "step"):
    """Keep the log lines up to the checkpoint we (re)start from: later ones will be redone. From step
    0 nothing is kept (the step-0 evaluation runs again)."""
    keep = [r for r in read_metrics(path) if step > 0 and isinstance(r.get(key), int) and r[key] <= step]
    with atomic_open(path) as f:
        f.write("".join(json.dumps(r) + "\n" for r in keep).encode())


def _plot(out: Path):
    """loss.png from metrics.jsonl, when matplotlib is installed (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = read_metrics(out / "metrics.jsonl")
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.6, label="train (batch)")
    ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(out / "loss.png") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


class _Progress:
    """A one-line progress bar on a terminal (loss, tokens/s, ETA); periodic plain lines otherwise."""

    def __init__(self, total, start, stream, quiet, verbose=False):
        self.total, self.start, self.stream, self.quiet = total, start, stream, quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty() and not verbose
        self.t0 = time.perf_counter()
        self.every = 1 if verbose else max(1, (total - start) // 20)

    def update(self, step, loss, tok_s, extra=""):
        if self.quiet:
            return
        done = step - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - step)
        line = f"step {step}/{self.total} loss {loss:.4f} {tok_s:,.0f} tok/s ETA {eta:,.0f}s"
        if self.every == 1:
            line += extra
        if self.tty:
            n = int(30 * step / self.total)
            print(f"\r[{'#' * n}{'.' * (30 - n)}] {line}\033[K", end="", file=self.stream, flush=True)
        elif done % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)

    def message(self, text):
        if not self.quiet:
            print(("\r\033[K" if self.tty else "") + text, file=self.stream, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            print(file=self.stream)
