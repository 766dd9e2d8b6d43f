"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Each demonstration is rendered with the chat template (npgpt.chat) and the loss is the mean next-token
cross-entropy over the assistant's tokens only: the model learns to answer, not to imitate the prompts.
Batches are right-padded (padding and prompt positions carry target -1). Cosine decay, several epochs, the
checkpoint with the lowest validation loss is kept.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import encode_chat, fit_context, pad_batch, read_demos, read_split, start_model
from .checkpoint import save_checkpoint
from .config import check_fields
from .errors import NpgptError
from .files import claim_out
from .optim import AdamW, grad_norm, lr_at, require_finite
from .params import decay_mask


@dataclass
class SFTConfig:
    """InstructGPT-style defaults: cosine decay over several epochs."""
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    batch_size: int = 16
    epochs: int = 4
    warmup_fraction: float = 0.03
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    val_fraction: float = 0.05   # held out of --data when no --val file is given
    seed: int = 0

    def __post_init__(self):
        check_fields(self, learning_rate="positive", min_lr="nonneg", batch_size="count", epochs="count",
                     warmup_fraction="unit", weight_decay="nonneg", grad_clip="nonneg", val_fraction="fraction",
                     seed="index")


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


def response_loss(model, seqs, batch_size: int = 32) -> float:
    """Mean cross-entropy per response token over all of `seqs` (no dropout)."""
    total, n = 0.0, 0
    for b0 in range(0, len(seqs), batch_size):
        x, y, _ = pad_batch(seqs[b0:b0 + batch_size])
        lp = model.logprobs(x, y)
        total -= float(lp.sum(dtype=np.float64))
        n += int((y >= 0).sum())
    model.drop_activations()
    return total / max(n, 1)


def sft(model_dir, data_file, out_dir, cfg: SFTConfig | None = None, *, val_file=None, skip_bad: bool = False,
        force: bool = False, quiet: bool = False, stream=None) -> dict:
    """Fine-tune `model_dir` on the demonstrations in `data_file` (see npgpt.chat.parse_demo for the
    formats) and keep the lowest-validation-loss checkpoint in `out_dir`. Returns the history."""
    cfg = cfg or SFTConfig()
    stream = stream or sys.stderr
    out = Path(out_dir)
    with claim_out(out, "checkpoint", force):
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

        opt = AdamW(model.flat, decay_mask(model.config), weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(train_seqs) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        warmup = max(1, int(cfg.warmup_fraction * total))
        history, best, step = [], None, 0
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(train_seqs))
            losses = []
            for b0 in range(0, len(order), cfg.batch_size):
                x, y, _ = pad_batch([train_seqs[i] for i in order[b0:b0 + cfg.batch_size]])
                model.zero_grad()
                loss = model.loss(x, y, train=True, rng=rng)
                model.backward()
                norm = grad_norm(model.grad)
                require_finite(f"epoch {epoch + 1}, step {step + 1}", loss=loss, gradient_norm=norm)
                opt.step(model.grad, lr_at(step, cfg.learning_rate, cfg.min_lr, warmup, total), cfg.grad_clip, norm)
                losses.append(loss)
                step += 1
            rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
            if val_seqs:
                rec["val_loss"] = response_loss(model, val_seqs)
                require_finite(f"the end of epoch {epoch + 1}", validation_loss=rec["val_loss"])
            history.append(rec)
            if not quiet:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}"
                      + (f", val loss {rec['val_loss']:.4f}" if val_seqs else ""), file=stream, flush=True)
            if best is None or "val_loss" not in rec or rec["val_loss"] <= best["val_loss"]:  # no val: the last
                best = rec
                save_checkpoint(out, model, provenance={"created_by": "npgpt sft", "base": str(model_dir)},
                                sections={"sft": {**dataclasses.asdict(cfg), "history": history, "skipped": skipped}})
        return {"epochs": history, "best": best, "skipped": skipped, "cut": cut}


__all__ = ["SFTConfig", "sft", "encode_demos", "response_loss"]
