"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Each demonstration is rendered with the chat template (npgpt.chat) and the loss is the mean next-token
cross-entropy over the assistant's tokens only: the model learns to answer, not to imitate the prompts.
Batches are right-padded (padding and prompt positions carry target -1). Cosine decay, several epochs, the
checkpoint with the lowest validation loss is kept.

A step's batch can be split into grad_accum micro-batches, each padded to its own longest demonstration;
each one's gradient is weighted by its share of the step's response tokens, so the sum is the gradient of
the whole batch's mean. Under an MPI launcher the micro-batches are shared out among the ranks
(npgpt.distributed): the same updates as one process with the same grad_accum.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import encode_chat, fit_context, pad_batch, read_demos, read_split, start_model
from .checkpoint import save_checkpoint
from .config import check_fields, config_from_dict
from .distributed import join, micro_batches
from .errors import NpgptError
from .files import claim_out
from .optim import AdamW, grad_norm, lr_at, require_finite
from .model import GPT
from .params import decay_mask, num_params


@dataclass
class SFTConfig:
    """InstructGPT-style defaults: cosine decay over several epochs. batch_size counts the
    demonstrations of a whole optimizer step and grad_accum the micro-batches it is split into (as
    FinetuneConfig; unlike `npgpt train`, whose batch_size is a micro-batch's): a multiple of the ranks
    under MPI, at most batch_size."""
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    batch_size: int = 16
    grad_accum: int = 1          # micro-batches per step: the same update, in pieces
    epochs: int = 4
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.05   # held out of --data when no --val file is given
    seed: int = 0

    def __post_init__(self):
        check_fields(self, learning_rate="positive", min_lr="nonneg", batch_size="count", grad_accum="count",
                     epochs="count", warmup_fraction="unit", weight_decay="nonneg", grad_clip="nonneg",
                     val_fraction="fraction", seed="index")
        if self.grad_accum > self.batch_size:
            raise NpgptError(f"config: grad_accum ({self.grad_accum}) splits a step's batch_size "
                             f"({self.batch_size}) demonstrations: it must not be larger")


def encode_demos(model, convs: list[list[dict]]) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, target mask) per conversation, cut to the context from the left; returns (seqs, n_cut).
    Conversations left with nothing to learn are dropped."""
    seqs, cut = [], 0
    for conv in convs:
        t, m, was_cut = fit_context(*encode_chat(model, conv), model.config.block_size)
        cut += was_cut
        if sum(m[1:]):
            seqs.append((t, m))
    return seqs, cut


def response_loss(model, seqs, batch_size: int = 32, dist=None) -> float:
    """Mean cross-entropy per response token over all of `seqs` (no dropout). Under MPI (`dist`) each
    rank computes its share of the batches; the sums are then added in batch order, as one process does."""
    starts = range(0, len(seqs), batch_size)
    sums = np.zeros((2, len(starts)))  # per batch: the sum of log-probabilities, the response tokens
    for j, b0 in enumerate(starts):
        if dist is None or dist.owns(j, len(starts)):
            x, y, _ = pad_batch(seqs[b0:b0 + batch_size])
            sums[0, j] = float(model.logprobs(x, y).sum(dtype=np.float64))
            sums[1, j] = int((y >= 0).sum())
    model.drop_activations()
    if dist is not None:
        dist.sum_owned(sums)
    total, n = 0.0, 0
    for j in range(len(starts)):
        total -= float(sums[0, j])
        n += int(sums[1, j])
    return total / max(n, 1)


def sft(model_dir, data_file, out_dir, cfg: SFTConfig | None = None, *, val_file=None, skip_bad: bool = False,
        force: bool = False, quiet: bool = False, stream=None, bucket_mb: float = 4.0) -> dict:
    """Fine-tune `model_dir` on the demonstrations in `data_file` (see npgpt.chat.parse_demo for the
    formats) and keep the lowest-validation-loss checkpoint in `out_dir`. Returns the history.

    Started by an MPI launcher as one of N ranks (`mpiexec -n N npgpt sft ...`), the N processes are one
    data-parallel job, as `npgpt train` (npgpt.distributed): the grad_accum micro-batches of every step (a
    multiple of N) are shared out and the gradients summed, so the run makes one process's updates with
    the same grad_accum (bit for bit with two ranks and grad_accum 2). Rank 0 alone reads the model and
    the demonstrations, writes `out_dir` and prints; it shares the encoded demonstrations, the weights
    and the RNG, and the others wait for its saves. bucket_mb: the all-reduce buckets, as for train."""
    cfg = cfg or SFTConfig()
    stream = stream or sys.stderr
    out = Path(out_dir)
    dist = join(bucket_mb)
    if dist is None:
        with contextlib.ExitStack() as held:
            return _train(*_open(model_dir, data_file, val_file, out, cfg, skip_bad, force, quiet, stream, held,
                                 None), out, quiet, stream, None)
    with dist.guard(), contextlib.ExitStack() as held:
        with dist.together():
            run = _open(model_dir, data_file, val_file, out, cfg, skip_bad, force, quiet, stream, held, dist) \
                if dist.root else None
        return _train(*_share_run(dist, run), out, quiet or not dist.root, stream, dist)


def _open(model_dir, data_file, val_file, out: Path, cfg: SFTConfig, skip_bad: bool, force: bool, quiet: bool,
          stream, held: contextlib.ExitStack, dist):
    """Claim `out` (until `held` closes; under MPI on rank 0 only, after checking grad_accum against the
    ranks), read and encode the demonstrations: (cfg, model, train seqs, val seqs, rng, facts) with
    facts {"model_dir", "skipped", "cut"}."""
    if dist is not None:
        dist.require_split(cfg.grad_accum)
    lock = claim_out(out, "checkpoint", force)
    if lock is not None:
        held.callback(lock.release)
    rng = np.random.default_rng(cfg.seed)
    demos, val_demos, skipped = read_split(read_demos, data_file, val_file, cfg.val_fraction, skip_bad, rng)
    model = start_model(model_dir, cfg.seed)
    train_seqs, cut = encode_demos(model, demos)
    val_seqs, _ = encode_demos(model, val_demos)
    if not train_seqs:
        raise NpgptError(f"{data_file}: no demonstration has response tokens inside the context")
    if not quiet:
        print(f"npgpt sft: {len(train_seqs)} demonstrations ({len(val_seqs)} held out for validation"
              + (f", {skipped} bad skipped" if skipped else "") + (f", {cut} cut to the context" if cut else "")
              + f"), {cfg.epochs} epochs", file=stream, flush=True)
    return cfg, model, train_seqs, val_seqs, rng, {"model_dir": str(model_dir), "skipped": skipped, "cut": cut}


def _share_run(dist, run):
    """Rank 0's start (see _open) on every rank: config, facts and RNG state as JSON, the demonstrations'
    ids and target masks as raw arrays, then the weights. The other ranks' model has no tokenizer: they
    never encode or write. Adam's moments start at 0 on every rank."""
    meta = None
    if dist.root:
        cfg, model, train_seqs, val_seqs, rng, facts = run
        meta = {"cfg": dataclasses.asdict(cfg), "model": dataclasses.asdict(model.config),
                "dtype": model.flat.dtype.str, "rng": rng.bit_generator.state, "n_train": len(train_seqs),
                "facts": facts}
    meta = dist.share(meta)
    both = run[2] + run[3] if dist.root else None  # the train, then the val demonstrations
    ids = dist.share_ragged([t for t, _ in both] if dist.root else None)
    masks = dist.share_ragged([m for _, m in both] if dist.root else None)
    if not dist.root:
        mcfg = config_from_dict(meta["model"])
        model = GPT(mcfg, np.empty(num_params(mcfg), np.dtype(meta["dtype"])))
        pairs = list(zip(ids, masks))
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        run = (SFTConfig(**meta["cfg"]), model, pairs[:meta["n_train"]], pairs[meta["n_train"]:], rng,
               meta["facts"])
    dist.share_arrays(run[1].flat)
    return run


def _train(cfg: SFTConfig, model, train_seqs, val_seqs, rng, facts: dict, out: Path, quiet: bool, stream,
           dist) -> dict:
    """The epochs, from a started run; under MPI on every rank (rank 0 alone prints and writes)."""
    opt = AdamW(model.flat, decay_mask(model.config), weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_seqs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    if not quiet and dist is not None:
        print(f"data-parallel: {dist.size} MPI ranks, {cfg.grad_accum // dist.size} of the {cfg.grad_accum} "
              f"micro-batches of each step each; {dist.describe(model)}", file=stream, flush=True)
    history, best, step = [], None, 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(train_seqs))
        losses = []
        for b0 in range(0, len(order), cfg.batch_size):
            loss, grad = _step(model, [train_seqs[i] for i in order[b0:b0 + cfg.batch_size]], cfg.grad_accum, rng,
                               dist)
            norm = grad_norm(grad)
            require_finite(f"epoch {epoch + 1}, step {step + 1}", loss=loss, gradient_norm=norm)
            opt.step(grad, lr_at(step, cfg.learning_rate, cfg.min_lr, warmup, total), cfg.grad_clip, norm)
            losses.append(loss)
            step += 1
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if val_seqs:
            rec["val_loss"] = response_loss(model, val_seqs, dist=dist)
            require_finite(f"the end of epoch {epoch + 1}", validation_loss=rec["val_loss"])
        history.append(rec)
        if not quiet:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}"
                  + (f", val loss {rec['val_loss']:.4f}" if val_seqs else ""), file=stream, flush=True)
        if best is None or "val_loss" not in rec or rec["val_loss"] <= best["val_loss"]:  # no val: the last
            best = rec
            if dist is not None:  # the other ranks wait for rank 0's save, and learn whether it was written
                dist.check_replicas(model.flat)
            with dist.together() if dist is not None else contextlib.nullcontext():
                if dist is None or dist.root:
                    save_checkpoint(out, model, provenance={"created_by": "npgpt sft", "base": facts["model_dir"]},
                                    sections={"sft": {**dataclasses.asdict(cfg), "history": history,
                                                      "skipped": facts["skipped"]}})
    return {"epochs": history, "best": best, "skipped": facts["skipped"], "cut": facts["cut"]}


def _step(model, batch: list, k: int, rng, dist) -> tuple[float, np.ndarray]:
    """Forward and backward of one step's demonstrations `batch` (ids, target mask) as k micro-batches,
    each micro-batch's mean loss weighted by its share of the step's response tokens: the sums are the
    loss and gradient of the whole batch's mean. Every rank draws every micro-batch's dropout from rng
    (to stay in step) and computes only its own. Returns (loss, gradient [P]; summed over the ranks
    under MPI)."""
    model.zero_grad()
    arrays = [pad_batch(batch[s]) if s.stop > s.start else None for s in micro_batches(len(batch), k)]
    tokens = [0 if a is None else int((a[1] >= 0).sum()) for a in arrays]
    n = sum(tokens)
    losses = np.zeros(k)  # each micro-batch's part of the step's loss; 0 if another rank's
    for i, a in enumerate(arrays):
        mine = dist is None or dist.owns(i, k)
        if a is None:  # fewer demonstrations than micro-batches (an epoch's last batch)
            if mine and dist is not None:
                dist.idle(model, i, k)
        elif not mine:
            model.skip_dropout(*a[0].shape, rng)
        else:
            share = tokens[i] / n if n else 0.0
            losses[i] = model.loss(a[0], a[1], train=True, rng=rng) * share
            model.backward(share, **(dist.hooks(model, i, k) if dist is not None else {}))
    grad = model.grad if dist is None else dist.reduce(model, losses)
    loss = 0.0
    for part in losses:  # in micro-batch order, as one process adds them
        loss += float(part)
    return loss, grad


__all__ = ["SFTConfig", "sft", "encode_demos", "response_loss"]
