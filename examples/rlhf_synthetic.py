"""InstructGPT end to end on a task with a measurable truth: pretrain -> SFT -> reward model -> PPO (with and
without the KL penalty) and, separately, DPO.

No human labellers here, so a hidden, programmatic rule plays the labeller. An assistant answers prompts
such as "what do you think of rivers?" with an opener, one to three statements and a closing line. The
rule scores a response 0..3, one point each for
  * a polite opener ("thank you for asking.", ...),
  * staying on topic (every statement is about the prompt's subject),
  * ending with a question.
The demonstrations (SFT data) are drawn from a base distribution that does each of these only part of the
time (mean score about 1.3), so SFT imitates a mediocre assistant. Comparisons between two base responses
ranked by the rule train the reward model; PPO and DPO must then find the better behaviour. The rule is
never shown to any model: only pairs.

    python examples/rlhf_synthetic.py            # seeds 0, 1, 2, one thread; writes runs/rlhf/seedN/

Prints a table of the true score and the KL to SFT, measured on held-out prompts (prompt wordings and
subjects combined in ways no training stage saw).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

TOPICS = ["cats", "dogs", "rain", "music", "books", "tea", "trains", "gardens", "stars", "bread", "rivers", "chess"]
PROMPTS = ["tell me about {t}.", "what do you think of {t}?", "i want to talk about {t}.", "say something about {t}."]
POLITE = ["thank you for asking.", "happy to help.", "what a nice question."]
RUDE = ["that is a dull topic.", "i do not care.", "ask someone else."]
STATEMENTS = ["{t} are lovely.", "i like {t}.", "many people enjoy {t}.", "{t} can be surprising.",
              "there is a lot to say about {t}."]
QUESTIONS = ["do you like {t}?", "what about you?", "have you thought about {t}?"]
CLOSERS = ["that is all.", "goodbye.", "now you know."]


# ---------------------------------------------------------------- the task and its hidden rule
def split_prompts(seed=0):
    """(train, held-out) prompts: every (wording, topic) pair, a quarter of them held out."""
    pairs = [(w, t) for w in PROMPTS for t in TOPICS]
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = {pairs[i] for i in order[:len(pairs) // 4]}
    as_text = lambda ps: [w.format(t=t) for w, t in ps]  # noqa: E731
    return as_text([p for p in pairs if p not in held]), as_text([p for p in pairs if p in held])


def topic_of(prompt: str) -> str:
    return next(t for t in TOPICS if t in prompt.split(" ")[-1])


def base_response(prompt: str, rng) -> str:
    """A response from the base (demonstrator) distribution: each good behaviour only some of the time."""
    t = topic_of(prompt)
    parts = []
    r = rng.random()
    if r < 1 / 3:
        parts.append(rng.choice(POLITE))
    elif r < 2 / 3:
        parts.append(rng.choice(RUDE))
    for _ in range(rng.integers(1, 4)):
        subject = t if rng.random() < 0.7 else rng.choice([x for x in TOPICS if x != t])
        parts.append(rng.choice(STATEMENTS).format(t=subject))
    parts.append((rng.choice(QUESTIONS) if rng.random() < 0.5 else rng.choice(CLOSERS)).format(t=t))
    return " ".join(parts)


def true_score(prompt: str, response: str) -> float:
    """The hidden rule: polite opener + every statement on the prompt's topic + ends with a question (0..3).
    A statement is any sentence ending in "." that is not an opener or a closing line."""
    t = topic_of(prompt)
    sents = [x.strip() for x in re.findall(r"[^.?]*[.?]", response) if x.strip()]
    if not sents:
        return 0.0
    polite = float(sents[0] in POLITE)
    statements = [x for x in sents if x.endswith(".") and x not in POLITE + RUDE + CLOSERS]
    on_topic = float(bool(statements) and all(t in x[:-1].split() for x in statements))
    question = float(response.strip().endswith("?"))
    return polite + on_topic + question


def scorer(prompts, responses):
    """true_score over a batch; prompts are message lists (the user's turn is the last)."""
    return [true_score(p[-1]["content"] if isinstance(p, list) else p, r) for p, r in zip(prompts, responses)]


# ---------------------------------------------------------------- data files
def write_jsonl(path: Path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def make_data(out: Path, train_prompts, rng, n_demos=3000, n_pairs=6000, n_pretrain=30000):
    corpus = []
    for _ in range(n_pretrain):
        p = rng.choice(train_prompts)
        corpus.append(f"{p}\n{base_response(p, rng)}\n")
    (out / "pretrain.txt").write_text("\n".join(corpus))
    demos = [{"prompt": p, "response": base_response(p, rng)} for p in rng.choice(train_prompts, n_demos)]
    write_jsonl(out / "demos.jsonl", demos)
    prefs = []
    while len(prefs) < n_pairs:
        p = str(rng.choice(train_prompts))
        a, b = base_response(p, rng), base_response(p, rng)
        sa, sb = true_score(p, a), true_score(p, b)
        if sa != sb:
            prefs.append({"prompt": p, "chosen": a if sa > sb else b, "rejected": b if sa > sb else a})
    write_jsonl(out / "prefs.jsonl", prefs)
    (out / "prompts.txt").write_text("\n".join(train_prompts) + "\n")


# ---------------------------------------------------------------- evaluation
def evaluate(model_dir, sft_dir, rm_dir, prompts, n=192, seed=123, max_new_tokens=40):
    """Mean true score, reward-model score and KL(policy || SFT) of samples (temperature 1) on prompts."""
    import npgpt
    from npgpt.chat import chat_ids, encode_chat, prompt_messages
    from npgpt.ppo import _batch_arrays
    from npgpt.reward import load_reward_model
    from npgpt.sampling import generate
    pol, sft, rm = npgpt.load(model_dir), npgpt.load(sft_dir), load_reward_model(rm_dir)
    end = chat_ids(pol)["<|end|>"]
    rng = np.random.default_rng(seed)
    ps = [str(p) for p in rng.choice(prompts, n)]
    ids = [encode_chat(pol, prompt_messages(p), generation_prompt=True)[0] for p in ps]
    seqs = [[int(t) for t in o] for o in generate(pol, ids, max_new_tokens, temperature=1.0, eos_id=end, seed=seed)]
    plen = [len(i) for i in ids]
    done = [s[-1] == end and len(s) > p for s, p in zip(seqs, plen)]
    texts = [pol.tokenizer.decode(s[p:len(s) - d]) for s, p, d in zip(seqs, plen, done)]
    x, y = _batch_arrays(seqs, plen)
    kl = (pol.logprobs(x, y).astype(np.float64) - sft.logprobs(x, y)).sum(1)
    block = pol.config.block_size
    rew = rm.score([(s if d else s + [end])[-block:] for s, d in zip(seqs, done)])
    scores = [true_score(p, t) for p, t in zip(ps, texts)]
    return {"true_score": float(np.mean(scores)), "true_score_se": float(np.std(scores) / np.sqrt(n)),
            "reward": float(rew.mean()), "kl": float(kl.mean()),
            "tokens": float(np.mean([len(s) - p for s, p in zip(seqs, plen)])), "example": f"{ps[0]} -> {texts[0]}"}


def run_seed(out: Path, seed: int, ppo_iters: int) -> dict:
    """The whole pipeline with one seed (data, initialisation, batches, rollouts) in out/; skipped when
    out/results.json exists, so a campaign over several seeds resumes where it stopped."""
    import npgpt
    from npgpt.dpo import DPOConfig, dpo
    from npgpt.ppo import PPOConfig, ppo
    from npgpt.reward import RewardConfig, train_reward
    from npgpt.sft import SFTConfig, sft
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_prompts, held_prompts = split_prompts(seed)
    make_data(out, train_prompts, rng)
    (out / "heldout_prompts.txt").write_text("\n".join(held_prompts) + "\n")
    times = {}

    t = time.time()
    npgpt.prepare([out / "pretrain.txt"], out / "data", "bpe:384", val_fraction=0.05, force=True)
    npgpt.train(out / "data", out / "pretrained", force=True, quiet=True,
                overrides={"n_layer": 3, "n_head": 4, "n_embd": 96, "block_size": 64, "batch_size": 32,
                           "max_iters": 1500, "learning_rate": 2e-3, "min_lr": 2e-4, "dropout": 0.0,
                           "eval_interval": 500, "seed": seed})
    times["pretrain"] = time.time() - t
    print(f"seed {seed} pretrain: {times['pretrain']:.0f}s", flush=True)

    t = time.time()
    sft(out / "pretrained", out / "demos.jsonl", out / "sft",
        SFTConfig(learning_rate=5e-4, min_lr=5e-5, epochs=3, seed=seed), force=True, quiet=True)
    times["sft"] = time.time() - t

    t = time.time()
    r = train_reward(out / "sft", out / "prefs.jsonl", out / "rm", RewardConfig(learning_rate=3e-4, epochs=2, seed=seed),
                     demos_file=out / "demos.jsonl", force=True, quiet=True)
    times["reward"] = time.time() - t
    print(f"seed {seed} sft: {times['sft']:.0f}s, reward model: {times['reward']:.0f}s, held-out pair accuracy "
          f"{r['best']['val_acc']:.3f}", flush=True)

    rows = {"SFT": out / "sft"}
    for name, d, beta, ptx in (("PPO", "ppo", 0.02, 0.0), ("PPO-ptx", "ppo-ptx", 0.02, 1.0),
                               ("PPO, no KL penalty", "ppo-nokl", 0.0, 0.0)):
        t = time.time()
        d = out / d
        ppo(out / "sft", out / "rm", out / "prompts.txt", d,
            PPOConfig(iterations=ppo_iters, batch_size=32, minibatch_size=8, learning_rate=5e-5, value_lr=1e-4,
                      kl_coef=beta, ptx_coef=ptx, max_new_tokens=40, seed=seed),
            ptx_data=out / "data" if ptx else None, scorer=scorer, force=True, quiet=True)
        times[name] = time.time() - t
        print(f"seed {seed} {name}: {times[name]:.0f}s", flush=True)
        rows[name] = d

    t = time.time()
    dpo(out / "sft", out / "prefs.jsonl", out / "dpo", DPOConfig(learning_rate=3e-5, epochs=1, seed=seed), force=True,
        quiet=True)
    times["DPO"] = time.time() - t
    rows["DPO"] = out / "dpo"

    results = {"seed": seed, "reward_model_val_acc": r["best"]["val_acc"], "seconds": times, "rows": {}}
    for name, d in rows.items():
        results["rows"][name] = evaluate(d, out / "sft", out / "rm", held_prompts)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/rlhf")
    ap.add_argument("--ppo-iters", type=int, default=80)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated; each runs the whole pipeline")
    # BLAS splits the long reductions of the weight gradients differently with another thread count, so the
    # float32 sums (and from there every sampled token) differ: one thread gives the same numbers everywhere
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import npgpt
    npgpt.set_threads(args.threads)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [run_seed(out / f"seed{s}", s, args.ppo_iters) for s in seeds]
    names = list(results[0]["rows"])
    print(f"\n{len(seeds)} seeds; held-out prompts; 192 samples per row and seed at temperature 1; true score 0..3; "
          f"{args.threads} thread(s)")
    accs = ", ".join(f"{r['reward_model_val_acc']:.3f}" for r in results)
    print(f"reward model held-out pair accuracy: {accs}")
    print(f"{'policy':<20} {'true score mean (sd)':>22} {'per seed':>24} {'RM reward':>10} {'KL to SFT':>10}")
    summary = {}
    for name in names:
        col = lambda k: np.array([r["rows"][name][k] for r in results])  # noqa: E731
        ts, rw, kl = col("true_score"), col("reward"), col("kl")
        sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
        summary[name] = {"true_score": ts.tolist(), "reward": rw.tolist(), "kl": kl.tolist()}
        print(f"{name:<20} {ts.mean():>14.3f} ({sd(ts):.3f}) {str(np.round(ts, 3).tolist()):>24} "
              f"{rw.mean():>10.2f} {kl.mean():>10.1f}")
    for name in names:
        print(f"  {name}: {results[0]['rows'][name]['example']}")
    (out / "results.json").write_text(json.dumps({"seeds": seeds, "threads": args.threads, "rows": summary}, indent=2))
    plot(out / f"seed{seeds[0]}", Path(__file__).with_name("rlhf.png"))


def plot(out: Path, png: Path):
    """True score and KL per PPO iteration for the three PPO runs (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, d in (("PPO", "ppo"), ("PPO-ptx", "ppo-ptx"), ("PPO, no KL penalty", "ppo-nokl")):
        recs = [json.loads(ln) for ln in (out / d / "metrics.jsonl").read_text().splitlines()]
        it = [r["iteration"] for r in recs]
        for ax, key in zip(axes, ("true_score", "reward", "kl")):
            ax.plot(it, [r[key] for r in recs], label=name)
    for ax, title in zip(axes, ("true score (hidden rule, 0..3)", "reward model score", "KL to SFT (nats/response)")):
        ax.set_title(title), ax.set_xlabel("PPO iteration"), ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
