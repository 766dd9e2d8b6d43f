"""PPO against a reward model with a KL penalty to the SFT policy, and PPO-ptx (InstructGPT step 3).

One iteration:
  1. rollouts: sample a response for each of a batch of prompts from the policy (KV cache, batched);
  2. score: the reward model's r(x, y) at the end, and per token t of the response
         reward_t = -beta * (log pi(y_t) - log pi_SFT(y_t))  (+ r(x, y) on the last token)
     values V_t from the value model (a GPT with a scalar head on every position, initialised from the
     reward model as InstructGPT does, or from the policy);
  3. advantages by GAE:  delta_t = reward_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},
     returns R_t = A_t + V_t; advantages whitened over the batch;
  4. a few epochs over minibatches of the clipped surrogate
         L_pi = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),  rho_t = pi(y_t) / pi_old(y_t)
     and the clipped value loss  L_V = 1/2 mean_t max((V_t - R_t)^2, (V_old + clip(V_t - V_old) - R_t)^2);
     with PPO-ptx, ptx_coef times the LM loss on a pretraining batch joins the policy's loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapt import TaskHead
from .chat import chat_ids, encode_chat, pad_batch, read_prompts
from .checkpoint import load_model, load_optimizers, write_checkpoint
from .config import check_fields
from .data import TokenData
from .errors import NpgptError
from .files import KINDS, DirLock, atomic_open, claim_out, crash_point, dir_kind, file_set, recover
from .model import GPT
from .optim import AdamW, grad_norm, joint_clip, require_finite
from .params import decay_mask
from .reward import RewardModel, load_reward_model, reward_files
from .sampling import generate
from .train import _read_state, _truncate_metrics, read_metrics


@dataclass
class PPOConfig:
    iterations: int = 100
    batch_size: int = 32          # rollouts per iteration
    minibatch_size: int = 8
    ppo_epochs: int = 4
    learning_rate: float = 1e-5   # policy
    value_lr: float = 5e-5
    kl_coef: float = 0.02         # beta, InstructGPT's value
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    max_new_tokens: int = 48
    temperature: float = 1.0
    ptx_coef: float = 0.0         # gamma of PPO-ptx (used with ptx data)
    ptx_batch_size: int = 8
    value_init: str = "reward"    # or "policy"
    grad_clip: float = 1.0
    ckpt_interval: int = 10       # iterations between checkpoints (the last one is always saved)
    seed: int = 0

    def __post_init__(self):
        check_fields(self, iterations="count", batch_size="count", minibatch_size="count", ppo_epochs="count",
                     learning_rate="positive", value_lr="positive", kl_coef="nonneg", clip="positive",
                     value_clip="positive", gamma="unit", lam="unit", max_new_tokens="count", temperature="positive",
                     ptx_coef="nonneg", ptx_batch_size="count", grad_clip="nonneg", ckpt_interval="count", seed="index")
        if self.value_init not in ("reward", "policy"):
            raise NpgptError(f"config: value_init must be 'reward' or 'policy', got {self.value_init!r}")


# ---------------------------------------------------------------- the math, on plain arrays
def kl_rewards(logp: np.ndarray, logp_ref: np.ndarray, mask: np.ndarray, score: np.ndarray, beta: float):
    """Per-token rewards [B, T]: -beta * (logp - logp_ref) on response tokens, plus score [B] on each row's
    last response token. Returns (rewards, per-sequence KL [B])."""
    kl = (logp - logp_ref) * mask
    r = -beta * kl
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    r[np.arange(len(score)), last] += score
    return r, kl.sum(1)


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """Generalised advantage estimation over each row's response tokens (mask [B, T], contiguous per row).
    Returns (advantages, returns) [B, T], zero off the mask. The value after the last token is 0."""
    B, T = rewards.shape
    adv = np.zeros((B, T), np.float64)
    for b in range(B):
        nxt_v, nxt_a = 0.0, 0.0
        for t in range(T - 1, -1, -1):
            if not mask[b, t]:
                continue
            delta = rewards[b, t] + gamma * nxt_v - values[b, t]
            nxt_a = delta + gamma * lam * nxt_a
            adv[b, t] = nxt_a
            nxt_v = values[b, t]
    return adv, (adv + values) * mask


def whiten(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(bool)
    mu, sd = x[m].mean(), x[m].std()
    return np.where(m, (x - mu) / (sd + 1e-8), 0.0)


def clipped_surrogate(logp, logp_old, adv, mask, clip: float):
    """PPO's clipped policy loss (mean over masked tokens), its gradient with respect to logp [B, T], and
    the fraction of tokens where the clip is active."""
    n = max(float(mask.sum()), 1.0)
    ratio = np.exp((logp - logp_old) * mask)
    s1 = ratio * adv
    s2 = np.clip(ratio, 1 - clip, 1 + clip) * adv
    loss = float(-(np.minimum(s1, s2) * mask).sum() / n)
    # where the unclipped term is the minimum, d(-rho A)/d logp = -rho A; elsewhere the clip holds it flat
    dlogp = np.where(s1 <= s2, -ratio * adv, 0.0) * mask / n
    clipfrac = float(((np.abs(ratio - 1) > clip) * mask).sum() / n)
    return loss, dlogp, clipfrac


def clipped_value_loss(v, v_old, returns, mask, clip: float):
    """PPO's clipped value loss 1/2 mean max((v - R)^2, (v_clip - R)^2) and its gradient dv [B, T]."""
    n = max(float(mask.sum()), 1.0)
    dv_raw = np.clip(v - v_old, -clip, clip)
    v_clip = v_old + dv_raw
    l1, l2 = (v - returns) ** 2, (v_clip - returns) ** 2
    loss = float(0.5 * (np.maximum(l1, l2) * mask).sum() / n)
    inside = np.abs(v - v_old) <= clip    # d v_clip / d v is 1 inside the clip range, else 0
    dv = np.where(l1 >= l2, v - returns, (v_clip - returns) * inside) * mask / n
    return loss, dv


def entropy(logits: np.ndarray, mask: np.ndarray) -> float:
    """Mean entropy (nats) of the distributions at the masked positions; logits [B, T, V]."""
    z = logits[mask.astype(bool)].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    p = np.exp(z)
    s = p.sum(-1, keepdims=True)
    p /= s
    return float((np.log(s[:, 0]) - (p * z).sum(-1)).mean()) if len(z) else 0.0


# ---------------------------------------------------------------- models
class ValueModel(RewardModel):
    """V(prefix) at every position: the reward model's architecture read at each token, not just the last."""

    def values(self, x, train: bool = False):
        """x [B, T] -> values [B, T] and a backward(dv [B, T])."""
        h = self.model.features(x, train=train)
        W, b = self.head.params["head.weight"], self.head.params["head.bias"]
        v = (h @ W + b)[..., 0]

        def backward(dv):
            dv = np.asarray(dv, h.dtype)
            self.head.grads["head.weight"] += h.reshape(-1, h.shape[-1]).T @ dv.reshape(-1, 1)
            self.head.grads["head.bias"] += dv.sum()
            self.model.backward(dhidden=dv[..., None] * W[:, 0])

        return v.astype(np.float64), backward


def _writable(model: GPT) -> GPT:
    """A private float copy without dropout (RL objectives compare log-likelihoods across passes)."""
    cfg = dataclasses.replace(model.config, dropout=0.0)
    return GPT(cfg, np.array(model.flat, copy=True), tokenizer=model.tokenizer)


# ---------------------------------------------------------------- rollouts
def rollout(policy: GPT, prompts: list[list[dict]], cfg: PPOConfig, seed: int):
    """Sample one response per prompt. Returns (sequences of ids, prompt lengths, finished flags)."""
    end = chat_ids(policy)["<|end|>"]
    room = policy.config.block_size - cfg.max_new_tokens
    if room < 2:
        raise NpgptError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the context "
                         f"of {policy.config.block_size}")
    ids = [encode_chat(policy, p, generation_prompt=True)[0][-room:] for p in prompts]
    outs = generate(policy, ids, cfg.max_new_tokens, temperature=cfg.temperature, eos_id=end, seed=seed)
    seqs, plen, done = [], [], []
    for p, o in zip(ids, outs):
        o = [int(t) for t in o]
        seqs.append(o)
        plen.append(len(p))
        done.append(len(o) > len(p) and o[-1] == end)
    return seqs, plen, done


def _batch_arrays(seqs, plen):
    """ids [B, T] and targets [B, T] that are the response tokens only."""
    x, y, _ = pad_batch([(s, [0] * p + [1] * (len(s) - p)) for s, p in zip(seqs, plen)])
    return x, y


# ---------------------------------------------------------------- the loop
def ppo(policy_dir, reward_dir, prompts_file, out_dir, cfg: PPOConfig | None = None, *, ptx_data=None,
        scorer=None, eval_prompts=None, resume: bool = False, force: bool = False, quiet: bool = False,
        stream=None) -> dict:
    """Optimise the SFT policy in `policy_dir` against the reward model in `reward_dir` on the prompts in
    `prompts_file`; save the policy (and its value model in out/value) in `out_dir`.

    ptx_data: a prepared data dir (npgpt prepare) for PPO-ptx; used when cfg.ptx_coef > 0 (the CLI sets
    1.0 when --ptx-data is given without a coefficient). scorer(prompts, responses) -> [B] floats,
    optional: a ground-truth score logged beside the reward (the synthetic demo's hidden rule).
    Every iteration appends a record to out/metrics.jsonl; out/ppo.png plots them. Every
    cfg.ckpt_interval iterations the whole state (policy, value model, optimizers, RNG) is checkpointed
    as one atomic set, so a killed run continues with resume=True, exactly where it was."""
    cfg = cfg or PPOConfig()
    stream = stream or sys.stderr
    if resume and force:
        raise NpgptError("give --resume or --force, not both")
    if ptx_data is not None and cfg.ptx_coef == 0:
        raise NpgptError("ptx data given with ptx_coef 0: set ptx_coef > 0 (or leave the data out)")
    out = Path(out_dir)
    prompts = read_prompts(prompts_file)
    with DirLock(out):
        recover(out)
        kind = dir_kind(out)
        if resume and kind != "run":
            raise NpgptError(f"nothing to resume in {out}" + (f" (it holds {KINDS[kind]})" if kind else ""))
        if not resume:
            claim_out(out, "run", force, lock=False)
        return _ppo(policy_dir, reward_dir, prompts, out, cfg, ptx_data, scorer, resume, quiet, stream)


def _ppo(policy_dir, reward_dir, prompts, out: Path, cfg: PPOConfig, ptx_data, scorer, resume, quiet, stream):
    ref = load_model(policy_dir)
    chat_ids(ref)
    if ref.quantized:
        raise NpgptError("a quantized model cannot be trained")
    rm = load_reward_model(reward_dir)
    if rm.model.config.vocab_size != ref.config.vocab_size:
        raise NpgptError(f"the reward model's vocabulary ({rm.model.config.vocab_size}) differs from the "
                         f"policy's ({ref.config.vocab_size}); train it from the same SFT model")
    if resume:  # the policy and value model as of the last checkpoint
        policy = _writable(load_model(out))
        saved = load_reward_model(out / "value")
        value = ValueModel(_writable(saved.model), saved.head)
    else:
        policy = _writable(ref)
        if cfg.value_init == "reward":
            value = ValueModel(_writable(rm.model), rm.head.copy())
        else:
            value = ValueModel(_writable(ref), TaskHead(ref.config.n_embd, 1, seed=cfg.seed, std=0.0))
    if policy.config.vocab_size != ref.config.vocab_size:
        raise NpgptError(f"{out} was trained from another policy than {policy_dir}")
    ptx = None
    if ptx_data is not None:
        ptx = TokenData(ptx_data)
        pv = policy.tokenizer.tk.get_vocab()  # the policy's vocabulary is the data's plus the chat tokens
        if any(pv.get(t) != i for t, i in ptx.tokenizer.tk.get_vocab().items()):
            raise NpgptError(f"the ptx data in {ptx_data} was not tokenized with the policy's tokenizer; prepare "
                             f"it with --tokenizer of the model the policy was fine-tuned from")
    opts = {"": AdamW(policy.flat, decay_mask(policy.config), weight_decay=0.0),
            "value.": AdamW(value.model.flat, decay_mask(value.model.config), weight_decay=0.0),
            "value_head.": AdamW(value.head.flat, value.head.decay_mask(), weight_decay=0.0)}
    rng = np.random.default_rng(cfg.seed)
    metrics = out / "metrics.jsonl"
    start = 0
    if resume:
        state = _read_state(out)
        start = state["step"]
        load_optimizers(out, opts, start)
        rng.bit_generator.state = state["rng"]
        _truncate_metrics(metrics, start, key="iteration")
    else:
        _truncate_metrics(metrics, 0, key="iteration")
    history = [r for r in read_metrics(metrics) if "iteration" in r]
    provenance = {"created_by": "npgpt ppo", "policy": str(policy_dir), "reward": str(reward_dir)}
    sections = {"provenance": provenance, "ppo": {**dataclasses.asdict(cfg), "ptx_data": str(ptx_data) if ptx_data else None}}

    def checkpoint(it):
        """Policy, value model, optimizers and RNG as one atomic set; the policy is saved with the SFT
        model's dropout (training runs without it) for whoever fine-tunes it next."""
        saved_policy = GPT(dataclasses.replace(policy.config, dropout=ref.config.dropout), policy.flat,
                           tokenizer=policy.tokenizer)
        state = {"step": it, "rng": rng.bit_generator.state}
        with file_set(out) as stage:
            write_checkpoint(stage, saved_policy, sections=sections, optimizers=opts, state=state)
            write_checkpoint(stage / "value", value.model, **reward_files(value, {"from": cfg.value_init}, "value"))

    if not quiet:
        print(f"npgpt ppo: {len(prompts)} prompts, {cfg.iterations} iterations x {cfg.batch_size} rollouts, "
              f"beta {cfg.kl_coef}" + (f", ptx {cfg.ptx_coef}" if ptx else "")
              + (f"; resuming after iteration {start}" if resume else ""), file=stream, flush=True)
    kept = "the last checkpoint is kept"
    for it in range(start, cfg.iterations):
        t0 = time.perf_counter()
        exp = make_experience(policy, ref, value, rm, prompts, cfg, rng, f"iteration {it + 1}", kept)
        losses = ppo_update(policy, value, opts, exp, cfg, rng, ptx, f"iteration {it + 1}", kept)
        rec = {"iteration": it + 1, "reward": float(exp.score.mean()), "kl": float(exp.kl.mean()),
               "entropy": exp.entropy, **losses, "response_tokens": float(exp.mask.sum(1).mean()),
               "finished": float(np.mean(exp.done)), "seconds": time.perf_counter() - t0}
        if scorer is not None:
            dec = policy.tokenizer.decode
            responses = [dec(s[p:len(s) - d]) for s, p, d in zip(exp.seqs, exp.plen, exp.done)]
            rec["true_score"] = float(np.mean(scorer(exp.prompts, responses)))
        history.append(rec)
        with open(metrics, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        crash_point("ppo iteration")
        if not quiet:
            print(f"iter {it + 1}/{cfg.iterations}: reward {rec['reward']:+.3f} KL {rec['kl']:.3f} entropy "
                  f"{exp.entropy:.3f} clip {rec['clipfrac']:.3f} value loss {rec['value_loss']:.4f}"
                  + (f" true score {rec['true_score']:.3f}" if "true_score" in rec else "")
                  + f" ({rec['seconds']:.1f}s)", file=stream, flush=True)
        if (it + 1) % cfg.ckpt_interval == 0 or it + 1 == cfg.iterations:
            checkpoint(it + 1)
    plot_ppo(out)
    return {"iterations": history}


@dataclass
class Experience:
    """One iteration's rollouts and what the update needs of them ([B, T] arrays over response tokens)."""
    prompts: list
    seqs: list
    plen: list
    done: list
    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    logp_old: np.ndarray
    v_old: np.ndarray
    adv: np.ndarray
    ret: np.ndarray
    score: np.ndarray     # [B] the reward model's
    kl: np.ndarray        # [B] per sequence
    entropy: float


def make_experience(policy, ref, value, rm, prompts, cfg: PPOConfig, rng, where: str, kept: str) -> Experience:
    """Sample a batch of prompts, roll the policy out on them, score the responses, fold the KL penalty
    into per-token rewards and estimate advantages (whitened) and returns with GAE."""
    batch = [prompts[i] for i in rng.choice(len(prompts), cfg.batch_size, replace=len(prompts) < cfg.batch_size)]
    seqs, plen, done = rollout(policy, batch, cfg, seed=int(rng.integers(1 << 31)))
    x, y = _batch_arrays(seqs, plen)
    mask = (y >= 0).astype(np.float64)
    # log-probabilities of the distribution the rollouts were drawn from: at the sampling temperature
    logp_old = policy.logprobs(x, y, temperature=cfg.temperature).astype(np.float64)
    ent = entropy(policy.logits, mask)
    logp_ref = ref.logprobs(x, y, temperature=cfg.temperature).astype(np.float64)
    v_old = value.values(x)[0]
    end = chat_ids(policy)["<|end|>"]
    # the reward model reads the end token; a response cut by max_new_tokens gets one appended
    score = rm.score([(s if d else s + [end])[-policy.config.block_size:] for s, d in zip(seqs, done)])
    require_finite(where, kept, reward=float(score.sum()), value=float((v_old * mask).sum()))
    rewards, kl = kl_rewards(logp_old, logp_ref, mask, score, cfg.kl_coef)
    adv, ret = gae(rewards, v_old, mask, cfg.gamma, cfg.lam)
    return Experience(batch, seqs, plen, done, x, y, mask, logp_old, v_old, whiten(adv, mask), ret, score, kl, ent)


def ppo_update(policy, value, opts: dict, exp: Experience, cfg: PPOConfig, rng, ptx, where: str, kept: str) -> dict:
    """cfg.ppo_epochs passes over minibatches of the experience: the clipped surrogate (plus the ptx LM
    loss) for the policy, the clipped value loss for the value model. Returns the mean losses."""
    opt, vopt, hopt = opts.values()
    policy_losses, value_losses, clip_fracs, ptx_losses = [], [], [], []
    for _ in range(cfg.ppo_epochs):
        order = rng.permutation(len(exp.seqs))
        for b0 in range(0, len(order), cfg.minibatch_size):
            mb = order[b0:b0 + cfg.minibatch_size]
            T = int(max(len(exp.seqs[i]) for i in mb))
            xm, ym, mm = exp.x[mb, :T], exp.y[mb, :T], exp.mask[mb, :T]
            policy.zero_grad()
            logp = policy.logprobs(xm, ym, temperature=cfg.temperature).astype(np.float64)
            loss, dlogp, clipfrac = clipped_surrogate(logp, exp.logp_old[mb, :T], exp.adv[mb, :T], mm, cfg.clip)
            policy.backward(dlogp=dlogp)
            if ptx is not None:
                xb, yb = ptx.batch("train", cfg.ptx_batch_size, policy.config.block_size, rng)
                ptx_losses.append(policy.loss(xb, yb))
                policy.backward(cfg.ptx_coef)
            value.model.zero_grad()
            value.head.grad.fill(0)
            v, vback = value.values(xm)
            vloss, dv = clipped_value_loss(v, exp.v_old[mb, :T], exp.ret[mb, :T], mm, cfg.value_clip)
            vback(dv)
            norm = grad_norm(policy.grad)
            require_finite(where, kept, policy_loss=loss, ptx_loss=ptx_losses[-1] if ptx_losses else 0.0,
                           value_loss=vloss, policy_gradient_norm=norm,
                           value_gradient_norm=math.hypot(grad_norm(value.model.grad), grad_norm(value.head.grad)))
            opt.step(policy.grad, cfg.learning_rate, cfg.grad_clip, norm)
            clip = joint_clip(cfg.grad_clip, value.model.grad, value.head.grad)
            vopt.step(value.model.grad, cfg.value_lr, 0.0 if clip is None else clip[0])
            hopt.step(value.head.grad, cfg.value_lr, 0.0 if clip is None else clip[1])
            policy_losses.append(loss)
            value_losses.append(vloss)
            clip_fracs.append(clipfrac)
    out = {"clipfrac": float(np.mean(clip_fracs)), "policy_loss": float(np.mean(policy_losses)),
           "value_loss": float(np.mean(value_losses))}
    if ptx_losses:
        out["ptx_loss"] = float(np.mean(ptx_losses))
    return out


def plot_ppo(out: Path):
    """ppo.png from metrics.jsonl (reward, KL, entropy, true score when logged), when matplotlib is
    installed (an optional extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    recs = read_metrics(Path(out) / "metrics.jsonl")
    if not recs:
        return
    keys = [k for k in ("reward", "true_score", "kl", "entropy") if recs and k in recs[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot([r["iteration"] for r in recs], [r[k] for r in recs])
        ax.set_title(k), ax.set_xlabel("iteration"), ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(Path(out) / "ppo.png") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


__all__ = ["PPOConfig", "ppo", "make_experience", "ppo_update", "Experience", "gae", "kl_rewards",
           "clipped_surrogate", "clipped_value_loss", "whiten", "rollout", "ValueModel"]
