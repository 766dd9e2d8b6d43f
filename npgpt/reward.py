"""Reward models from comparisons (InstructGPT step 2).

A reward model is a GPT (started from the SFT model) with a scalar head r = h_T . w + b on the final
hidden state of prompt + response, where the rendered response ends with <|end|>. For a prompt with K
ranked responses, all C(K, 2) pairs form one batch element (InstructGPT section 3.5):

    loss = -1/C(K,2) * sum_{(w, l)} log sigmoid(r_w - r_l)

so every response is run through the model once however many pairs it is in. After training, the bias
is shifted so that the demonstrations score a mean of 0 (InstructGPT's normalisation).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapt import TaskHead
from .chat import (BadRecord, encode_chat, fit_context, pad_batch, pairs, parse_demo, parse_preference, prompt_messages,
                   read_demos, read_preferences, read_split, records, start_model)
from .checkpoint import load_head, load_model, read_config, save_checkpoint
from .config import check_fields
from .errors import NpgptError
from .files import claim_out
from .model import GPT
from .optim import AdamW, grad_norm, joint_clip, lr_at, require_finite
from .params import decay_mask


@dataclass
class RewardConfig:
    """InstructGPT trains its reward model for one epoch (more overfits); cosine decay."""
    learning_rate: float = 1e-4
    min_lr: float = 1e-5
    batch_size: int = 8          # prompts per step; each brings all its responses
    epochs: int = 1
    warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_fraction: float = 0.05   # held out of --data when no --val file is given
    seed: int = 0

    def __post_init__(self):
        check_fields(self, learning_rate="positive", min_lr="nonneg", batch_size="count", epochs="count",
                     warmup_fraction="unit", weight_decay="nonneg", grad_clip="nonneg", val_fraction="fraction",
                     seed="index")


class RewardModel:
    """A GPT body and a scalar head. `score` gives rewards; `forward` keeps what `backward` needs."""

    def __init__(self, model: GPT, head: TaskHead | None = None, seed: int = 0):
        self.model = model
        self.head = head or TaskHead(model.config.n_embd, 1, seed=seed, dtype=model.flat.dtype)

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        """Ids of prompt + response (ending in <|end|>), cut to the context from the left."""
        t, m = encode_chat(self.model, prompt + [{"role": "assistant", "content": response}], train_on="last")
        return fit_context(t, m, self.model.config.block_size)[0]

    def forward(self, seqs: list[list[int]], train: bool = False, rng=None):
        """Rewards [N] of id sequences and a backward(dr [N]) that adds into model.grad and head.grad."""
        x, _, last = pad_batch([(s, [0] * len(s)) for s in seqs])
        h_all = self.model.features(x, train=train, rng=rng)
        rows = np.arange(len(seqs))
        h = h_all[rows, last]
        W, b = self.head.params["head.weight"], self.head.params["head.bias"]
        r = (h @ W + b)[:, 0]

        def backward(dr):
            dr = np.asarray(dr, h.dtype)[:, None]
            self.head.grads["head.weight"] += h.T @ dr
            self.head.grads["head.bias"] += dr.sum(0)
            dh = np.zeros_like(h_all)
            dh[rows, last] = dr @ W.T
            self.model.backward(dhidden=dh)

        return r, backward

    def score(self, seqs: list[list[int]], batch_size: int = 32) -> np.ndarray:
        """Rewards [N] (float64) of id sequences, no dropout."""
        out = [self.forward(seqs[b0:b0 + batch_size])[0] for b0 in range(0, len(seqs), batch_size)]
        self.model.drop_activations()
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def score_text(self, prompts: list, responses: list[str]) -> np.ndarray:
        return self.score([self.encode(prompt_messages(p), r) for p, r in zip(prompts, responses)])


def pairwise_loss(r: np.ndarray, groups: list[list[tuple[int, int]]]):
    """InstructGPT's comparison loss. r [N] rewards; groups: per prompt, its (better, worse) index pairs
    into r. Returns (loss, dr [N], pair accuracy): each prompt weighs 1, its pairs share the weight."""
    r64 = np.asarray(r, np.float64)
    loss, dr, right, n = 0.0, np.zeros_like(r64), 0, 0
    for prs in groups:
        w = np.array([a for a, _ in prs])
        l = np.array([b for _, b in prs])
        d = r64[w] - r64[l]
        loss += float(np.logaddexp(0.0, -d).mean())       # -log sigmoid(d), stable
        g = -1.0 / (1.0 + np.exp(d)) / len(prs)             # d(-log sigmoid(d))/dd = -sigmoid(-d)
        np.add.at(dr, w, g)
        np.add.at(dr, l, -g)
        right += int((d > 0).sum())
        n += len(prs)
    G = max(len(groups), 1)
    return loss / G, dr / G, right / max(n, 1)


def _batch(rm: RewardModel, items: list[dict]):
    """Sequences and pair groups of a list of encoded preference items."""
    seqs, groups = [], []
    for it in items:
        base = len(seqs)
        seqs += it["seqs"]
        groups.append([(base + a, base + b) for a, b in pairs(it["ranking"])])
    return seqs, groups


def pair_accuracy(rm: RewardModel, items: list[dict]) -> tuple[float, float]:
    """(held-out pair accuracy, mean loss) over encoded preference items."""
    seqs, groups = _batch(rm, items)
    loss, _, acc = pairwise_loss(rm.score(seqs), groups)
    return acc, loss


def train_reward(model_dir, data_file, out_dir, cfg: RewardConfig | None = None, *, val_file=None, demos_file=None,
                 skip_bad: bool = False, force: bool = False, quiet: bool = False, stream=None) -> dict:
    """Train a reward model on comparisons and save it (with head.safetensors) in `out_dir`. The bias is
    set so that the demonstrations in `demos_file` (default: the best-ranked responses of the training
    data) score a mean of 0. Returns the history."""
    cfg = cfg or RewardConfig()
    stream = stream or sys.stderr
    out = Path(out_dir)
    with claim_out(out, "checkpoint", force):
        rng = np.random.default_rng(cfg.seed)
        recs, val_recs, skipped = read_split(read_preferences, data_file, val_file, cfg.val_fraction, skip_bad, rng)
        rm = RewardModel(start_model(model_dir, cfg.seed), seed=cfg.seed)
        enc = lambda rs: [{"seqs": [rm.encode(r["prompt"], x) for x in r["responses"]], "ranking": r["ranking"]}  # noqa: E731
                          for r in rs]
        train_items, val_items = enc(recs), enc(val_recs)
        if demos_file is not None:
            demos = [d for d in read_demos(demos_file, skip_bad)[0] if d[-1]["role"] == "assistant"]
            if not demos:
                raise NpgptError(f"{demos_file}: no demonstration ends with an assistant message, so none can set "
                                 f"the reward model's zero")
            demo_seqs = [rm.encode(d[:-1], d[-1]["content"]) for d in demos]
            demo_source = str(demos_file)
        else:
            demo_seqs = [it["seqs"][it["ranking"][0]] for it in train_items]
            demo_source = "best-ranked training responses"
        n_pairs = sum(len(r["ranking"]) * (len(r["ranking"]) - 1) // 2 for r in recs)
        if not quiet:
            print(f"npgpt reward train: {len(train_items)} prompts, {n_pairs} pairs ({len(val_items)} prompts held out"
                  + (f", {skipped} bad skipped" if skipped else "") + f"), {cfg.epochs} epochs", file=stream, flush=True)

        model, head = rm.model, rm.head
        opt = AdamW(model.flat, decay_mask(model.config), weight_decay=cfg.weight_decay)
        hopt = AdamW(head.flat, head.decay_mask(), weight_decay=cfg.weight_decay)
        total = math.ceil(len(train_items) / cfg.batch_size) * cfg.epochs
        warmup = max(1, int(cfg.warmup_fraction * total))
        history, best, best_state, step = [], None, None, 0
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(train_items))
            losses, accs = [], []
            for b0 in range(0, len(order), cfg.batch_size):
                seqs, groups = _batch(rm, [train_items[i] for i in order[b0:b0 + cfg.batch_size]])
                model.zero_grad()
                head.grad.fill(0)
                r, backward = rm.forward(seqs, train=True, rng=rng)
                loss, dr, acc = pairwise_loss(r, groups)
                backward(dr)
                lr = lr_at(step, cfg.learning_rate, cfg.min_lr, warmup, total)
                norm = math.hypot(grad_norm(model.grad), grad_norm(head.grad))
                require_finite(f"epoch {epoch + 1}, step {step + 1}", reward=float(np.sum(r, dtype=np.float64)),
                               loss=loss, gradient_norm=norm)
                clip = joint_clip(cfg.grad_clip, model.grad, head.grad)
                opt.step(model.grad, lr, 0.0 if clip is None else clip[0])
                hopt.step(head.grad, lr, 0.0 if clip is None else clip[1])
                losses.append(loss)
                accs.append(acc)
                step += 1
            rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_acc": float(np.mean(accs))}
            if val_items:
                rec["val_acc"], rec["val_loss"] = pair_accuracy(rm, val_items)
                require_finite(f"the end of epoch {epoch + 1}", validation_loss=rec["val_loss"])
            history.append(rec)
            if not quiet:
                print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}, train pair acc "
                      f"{rec['train_acc']:.4f}" + (f", val pair acc {rec['val_acc']:.4f}, val loss {rec['val_loss']:.4f}"
                                                   if val_items else ""), file=stream, flush=True)
            if best is None or rec.get("val_acc", 0) >= best.get("val_acc", 0):
                best, best_state = rec, (model.flat.copy(), head.flat.copy())
        model.flat[:], head.flat[:] = best_state
        # InstructGPT's normalisation: demonstrations score 0 on average
        offset = float(rm.score(demo_seqs).mean())
        if not math.isfinite(offset):
            raise NpgptError(f"the demonstrations' mean reward is {offset}; the reward model was not saved")
        head.params["head.bias"][0] -= offset
        save_reward_model(out, rm, {**dataclasses.asdict(cfg), "history": history, "skipped": skipped,
                                    "normalised_on": demo_source, "bias_shift": -offset, "base": str(model_dir)})
        return {"epochs": history, "best": best, "skipped": skipped, "bias_shift": -offset}


def save_reward_model(out: Path, rm: RewardModel, info: dict, kind: str = "reward"):
    """A reward (or value) model: the body, head.safetensors and config section `kind`, as one atomic set."""
    save_checkpoint(out, rm.model, **reward_files(rm, info, kind))


def reward_files(rm: RewardModel, info: dict, kind: str = "reward") -> dict:
    """What distinguishes a reward model's checkpoint from its body's: the head file and a config section."""
    return {"sections": {"provenance": {"created_by": f"npgpt {kind}"}, kind: info},
            "heads": {"head.safetensors": rm.head.tensors()}}


def load_reward_model(model_dir, *, mmap: bool = True) -> RewardModel:
    """A reward model saved by `train_reward` (or a value model saved by PPO)."""
    conf = read_config(model_dir)
    if "reward" not in conf and "value" not in conf:
        raise NpgptError(f"{model_dir} is not a reward model (no scalar head); run `npgpt reward train` first")
    model = load_model(model_dir, mmap=mmap)
    head = TaskHead.from_tensors(load_head(model_dir), model.config.n_embd, f"{model_dir}/head.safetensors")
    if head.params["head.bias"].shape != (1,):
        raise NpgptError(f"{model_dir}/head.safetensors is not a scalar head")
    return RewardModel(model, head)


def score_file(model_dir, data_file, skip_bad: bool = False) -> list[dict]:
    """Rewards for every record of a file: demonstrations ({"prompt", "response"} or messages) give
    {"line", "reward"}; comparisons give {"line", "rewards": [...]} in the order of their responses."""
    rm = load_reward_model(model_dir)
    out = []
    for n, r in records(data_file):
        try:
            if "chosen" in r or "responses" in r:
                p = parse_preference(r)
                out.append({"line": n, "rewards": rm.score([rm.encode(p["prompt"], x) for x in p["responses"]]).tolist()})
            else:
                conv = parse_demo(r)
                out.append({"line": n, "reward": float(rm.score([rm.encode(conv[:-1], conv[-1]["content"])])[0])})
        except BadRecord as e:
            if not skip_bad:
                raise NpgptError(f"{data_file}:{n}: {e} (use --skip-bad to skip such records)") from None
    return out


__all__ = ["RewardConfig", "RewardModel", "train_reward", "pairwise_loss", "load_reward_model", "score_file"]
