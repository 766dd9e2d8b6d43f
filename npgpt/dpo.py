"""Direct Preference Optimization (Rafailov et al. 2023): preferences without a reward model or sampling.

For a preferred response y_w and a dispreferred y_l of the same prompt x, with log-likelihoods summed over
the response tokens under the policy (pi) and the frozen starting model (ref):

    z = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss = -log sigmoid(z)
    d loss / d log pi(y_w|x) = -beta * sigmoid(-z) = -d loss / d log pi(y_l|x)

beta * (log pi - log ref) is the implicit reward; its accuracy (z > 0) is what we log. Ranked lists give
all their C(K, 2) pairs.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import encode_chat, fit_context, pad_batch, pairs, read_preferences, read_split, start_model
from .checkpoint import save_checkpoint
from .config import check_fields
from .files import claim_out
from .model import GPT
from .optim import AdamW, grad_norm, lr_at, require_finite
from .params import decay_mask


@dataclass
class DPOConfig:
    beta: float = 0.1
    learning_rate: float = 1e-5
    min_lr: float = 1e-6
    batch_size: int = 8           # prompts per step
    epochs: int = 1
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        check_fields(self, beta="positive", learning_rate="positive", min_lr="nonneg", batch_size="count",
                     epochs="count", warmup_fraction="unit", weight_decay="nonneg", grad_clip="nonneg",
                     val_fraction="fraction", seed="index")


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta: float):
    """Mean DPO loss over pairs and its gradients with respect to the policy's sequence log-likelihoods.
    All arguments [P]. Returns (loss, d/d pi_w [P], d/d pi_l [P], implicit-reward accuracy)."""
    z = beta * ((np.asarray(pi_w, np.float64) - ref_w) - (np.asarray(pi_l, np.float64) - ref_l))
    P = len(z)
    loss = float(np.logaddexp(0.0, -z).mean())
    g = -beta / (1.0 + np.exp(z)) / P          # -beta * sigmoid(-z) / P
    return loss, g, -g, float((z > 0).mean())


def _encode(model, recs):
    """Per record: its response sequences (mask on the final assistant turn) and (better, worse) pairs."""
    block = model.config.block_size
    items = []
    for r in recs:
        seqs = []
        for x in r["responses"]:
            t, m = encode_chat(model, r["prompt"] + [{"role": "assistant", "content": x}], train_on="last")
            t, m, _ = fit_context(t, m, block)
            seqs.append((t, m))
        items.append({"seqs": seqs, "pairs": pairs(r["ranking"])})
    return items


def sequence_logprobs(model, seqs, train=False, rng=None):
    """Summed log-likelihood of each sequence's trained tokens [N], and (x, y) for a backward."""
    x, y, _ = pad_batch(seqs)
    lp = model.logprobs(x, y, train=train, rng=rng)
    return lp.sum(1, dtype=np.float64), y


def _flatten(items):
    seqs, ref, w, l = [], [], [], []
    for it in items:
        base = len(seqs)
        seqs += it["seqs"]
        ref += it["ref"]
        w += [base + a for a, _ in it["pairs"]]
        l += [base + b for _, b in it["pairs"]]
    return seqs, np.array(ref), np.array(w), np.array(l)


def evaluate_dpo(model, items, beta, batch_size=16) -> tuple[float, float]:
    """(mean loss, implicit-reward accuracy) over encoded items without training."""
    losses, accs, n = 0.0, 0.0, 0
    for b0 in range(0, len(items), batch_size):
        seqs, ref, w, l = _flatten(items[b0:b0 + batch_size])
        pi, _ = sequence_logprobs(model, seqs)
        loss, _, _, acc = dpo_loss(pi[w], pi[l], ref[w], ref[l], beta)
        losses += loss * len(w)
        accs += acc * len(w)
        n += len(w)
    model.drop_activations()
    return losses / n, accs / n


def dpo(model_dir, data_file, out_dir, cfg: DPOConfig | None = None, *, val_file=None, skip_bad: bool = False,
        force: bool = False, quiet: bool = False, stream=None) -> dict:
    """Train `model_dir` (usually an SFT model; also the frozen reference) on comparisons with DPO and
    save the final policy in `out_dir`. Returns the history."""
    cfg = cfg or DPOConfig()
    stream = stream or sys.stderr
    out = Path(out_dir)
    with claim_out(out, "checkpoint", force):
        rng = np.random.default_rng(cfg.seed)
        recs, val_recs, skipped = read_split(read_preferences, data_file, val_file, cfg.val_fraction, skip_bad, rng)
        start = start_model(model_dir, cfg.seed)
        # no dropout while training: the reference log-likelihoods are computed without it, and at equal
        # weights the policy must give the same numbers (z = 0, loss log 2), not dropout noise of several nats
        model = GPT(dataclasses.replace(start.config, dropout=0.0), start.flat, tokenizer=start.tokenizer)
        items, val_items = _encode(model, recs), _encode(model, val_recs)
        # the reference is the starting model: its log-likelihoods are computed once, before any update
        for group in (items, val_items):
            for it in group:
                it["ref"] = list(sequence_logprobs(model, it["seqs"])[0])
        model.drop_activations()
        n_pairs = sum(len(it["pairs"]) for it in items)
        if not quiet:
            print(f"npgpt dpo: {len(items)} prompts, {n_pairs} pairs ({len(val_items)} prompts held out"
                  + (f", {skipped} bad skipped" if skipped else "") + f"), beta {cfg.beta}, {cfg.epochs} epochs",
                  file=stream, flush=True)
        opt = AdamW(model.flat, decay_mask(model.config), weight_decay=cfg.weight_decay)
        total = math.ceil(len(items) / cfg.batch_size) * cfg.epochs
        warmup = max(1, int(cfg.warmup_fraction * total))
        history, step = [], 0
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(items))
            losses, accs = [], []
            for b0 in range(0, len(order), cfg.batch_size):
                seqs, ref, w, l = _flatten([items[i] for i in order[b0:b0 + cfg.batch_size]])
                model.zero_grad()
                pi, y = sequence_logprobs(model, seqs, train=True, rng=rng)
                loss, gw, gl, acc = dpo_loss(pi[w], pi[l], ref[w], ref[l], cfg.beta)
                dseq = np.zeros(len(seqs))
                np.add.at(dseq, w, gw)
                np.add.at(dseq, l, gl)
                model.backward(dlogp=dseq[:, None] * (y >= 0))  # every response token carries its sequence's gradient
                norm = grad_norm(model.grad)
                require_finite(f"epoch {epoch + 1}, step {step + 1}", loss=loss, gradient_norm=norm)
                opt.step(model.grad, lr_at(step, cfg.learning_rate, cfg.min_lr, warmup, total), cfg.grad_clip, norm)
                losses.append(loss)
                accs.append(acc)
                step += 1
            rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_reward_acc": float(np.mean(accs))}
            if val_items:
                rec["val_loss"], rec["val_reward_acc"] = evaluate_dpo(model, val_items, cfg.beta)
                require_finite(f"the end of epoch {epoch + 1}", validation_loss=rec["val_loss"])
            history.append(rec)
            if not quiet:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}, implicit reward acc "
                      f"{rec['train_reward_acc']:.4f}" + (f", val loss {rec['val_loss']:.4f}, val reward acc "
                                                           f"{rec['val_reward_acc']:.4f}" if val_items else ""),
                      file=stream, flush=True)
        model.config = start.config  # saved with the dropout it came with, for whoever trains it next
        save_checkpoint(out, model, provenance={"created_by": "npgpt dpo", "base": str(model_dir)},
                        sections={"dpo": {**dataclasses.asdict(cfg), "history": history, "skipped": skipped}})
        return {"epochs": history, "skipped": skipped}


__all__ = ["DPOConfig", "dpo", "dpo_loss", "sequence_logprobs"]
