"""InstructGPT: chat template, data formats and bad records, SFT, reward model (pairwise loss and its
gradients), PPO math (KL rewards, GAE, clipped objectives) and a bandit where the best action is known,
DPO, and the commands end to end."""
import json
import math
import re

import numpy as np
import pytest

from npgpt.chat import (add_chat_tokens, encode_chat, pad_batch, pairs, parse_demo, parse_preference,
                        read_demos, read_preferences, split_dialogue)
from npgpt.checkpoint import save_checkpoint
from npgpt.config import GPTConfig
from npgpt.dpo import dpo_loss, sequence_logprobs
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.optim import AdamW
from npgpt.params import decay_mask
from npgpt.ppo import clipped_surrogate, clipped_value_loss, gae, kl_rewards, whiten, ValueModel
from npgpt.reward import RewardModel, pairwise_loss
from npgpt.tokenizer import Tokenizer

from conftest import numeric_grad, run_cli

ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.!,"


def chat_model(dtype=np.float32, seed=0, n_embd=16, block=48):
    tok = Tokenizer.train_char([ALPHABET])
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=block, vocab_size=tok.vocab_size),
               seed=seed, dtype=dtype, tokenizer=tok)
    return add_chat_tokens(base)


def write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


# ---------------------------------------------------------------- template and formats
def test_chat_template_masks_and_targets():
    m = chat_model()
    enc = m.tokenizer.encode
    U, A, E = (m.tokenizer.tk.token_to_id(s) for s in ("<|user|>", "<|assistant|>", "<|end|>"))
    conv = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    toks, mask = encode_chat(m, conv)
    assert toks == [U, *enc("ab"), E, A, *enc("cd"), E]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1]
    g, _ = encode_chat(m, conv[:1], generation_prompt=True)
    assert g == [U, *enc("ab"), E, A]
    x, y, last = pad_batch([(toks, mask), (g, [0] * len(g))])
    assert x.shape == (2, 8) and list(last) == [7, 4]
    assert list(y[0]) == [-1, -1, -1, -1, *enc("cd"), E, -1]  # position t predicts token t + 1
    assert np.all(y[1] == -1)
    # multi-turn: every assistant turn is trained on, or only the last one
    conv3 = conv + [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]
    assert sum(encode_chat(m, conv3)[1]) == 3 + 2 and sum(encode_chat(m, conv3, train_on="last")[1]) == 2
    # four new single-id tokens; an SFT model given them again keeps its vocabulary
    assert m.tokenizer.tk.token_to_id("<|end|>") == E and len({U, A, E}) == 3
    assert m.config.vocab_size == Tokenizer.train_char([ALPHABET]).vocab_size + 4
    assert add_chat_tokens(m).config.vocab_size == m.config.vocab_size


def test_demo_and_preference_formats(tmp_path):
    assert parse_demo({"prompt": "q", "response": "a"}) == [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]
    assert parse_demo({"prompt": "q", "answer": "a"})[1]["content"] == "a"  # Dolly-style files
    assert parse_demo({"instruction": "do", "input": "x", "output": "y"})[0]["content"] == "do\n\nx"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert parse_demo({"messages": msgs}) == msgs
    p = parse_preference({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert p == {"prompt": [{"role": "user", "content": "q"}], "responses": ["good", "bad"], "ranking": [0, 1]}
    p = parse_preference({"prompt": "q", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]})
    assert pairs(p["ranking"]) == [(2, 0), (2, 1), (0, 1)]
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: sure, gladly",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me\n\nAssistant: no"}
    p = parse_preference(hh)
    assert p["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "help me"}]
    assert p["responses"] == ["sure, gladly", "no"]
    assert split_dialogue("\n\nHuman: a\n\nAssistant: b")[1] == "b"


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "q", "chosen": "a"}', r":2: missing field 'rejected'"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', r":2: two responses are identical"),
    ('{"prompt": "q", "chosen": " ", "rejected": "a"}', r":2: empty response"),
    ('{"chosen": "no dialogue", "rejected": "x"}', r":2: dialogue has no final 'Assistant:'"),
    ('{"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}', r":2: 'ranking' must list"),
    ('{"prompt": "q", "chosen": "a", "rejected": ', r":2: not valid JSON"),
])
def test_bad_preference_records_name_the_line_or_are_skipped(tmp_path, line, match):
    good = '{"prompt": "q", "chosen": "a", "rejected": "b"}'
    f = write_jsonl(tmp_path / "p.jsonl", [good, line, good])
    with pytest.raises(NpgptError, match=match):
        read_preferences(f)
    if "JSON" not in match:
        recs, skipped = read_preferences(f, skip_bad=True)
        assert len(recs) == 2 and skipped == 1


def test_bad_demo_records(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "q", "response": "a"}', '{"prompt": "q", "response": ""}'])
    with pytest.raises(NpgptError, match=r":2: empty response"):
        read_demos(f)
    assert read_demos(f, skip_bad=True)[1] == 1
    with pytest.raises(NpgptError, match="no records"):
        read_demos(write_jsonl(tmp_path / "e.jsonl", []))


# ---------------------------------------------------------------- reward model
def test_pairwise_loss_hand_computed_and_gradient():
    r = np.array([1.0, 0.0, 2.0, -1.0])
    groups = [[(0, 1)], [(2, 3), (2, 0), (0, 3)]]  # prompt 2 has a ranking of three: C(3,2) pairs
    loss, dr, acc = pairwise_loss(r, groups)
    sp = lambda d: math.log1p(math.exp(-d))  # noqa: E731  (-log sigmoid d)
    expect = (sp(1.0) + (sp(3.0) + sp(1.0) + sp(2.0)) / 3) / 2
    assert loss == pytest.approx(expect, rel=1e-12) and acc == 1.0
    num = numeric_grad(lambda: pairwise_loss(r, groups)[0], r)
    np.testing.assert_allclose(dr, num, atol=1e-8)
    assert pairwise_loss(np.array([0.0, 1.0]), [[(0, 1)]])[2] == 0.0


def test_reward_model_head_and_body_gradient_matches_finite_differences():
    m = chat_model(np.float64, seed=1, n_embd=8, block=16)
    rm = RewardModel(m, seed=2)
    rm.head.flat[:] = np.random.default_rng(0).standard_normal(rm.head.flat.size)
    prompt = [{"role": "user", "content": "ab"}]
    seqs = [rm.encode(prompt, "cd"), rm.encode(prompt, "c"), rm.encode(prompt, "xyz")]
    groups = [[(0, 1), (0, 2), (1, 2)]]

    def f():
        return pairwise_loss(rm.forward(seqs)[0], groups)[0]

    m.zero_grad()
    rm.head.grad.fill(0)
    r, backward = rm.forward(seqs)
    backward(pairwise_loss(r, groups)[1])
    for flat, grad in ((rm.head.flat, rm.head.grad), (m.flat, m.grad)):
        coords = np.random.default_rng(3).choice(flat.size, min(flat.size, 60), replace=False)
        num = numeric_grad(f, flat, coords)
        np.testing.assert_allclose(grad[coords], num, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- DPO
def test_dpo_loss_hand_computed_and_gradient():
    pw, pl, rw, rl = np.array([-3.0, -5.0]), np.array([-4.0, -2.0]), np.array([-3.5, -4.0]), np.array([-3.5, -3.0])
    beta = 0.5
    loss, gw, gl, acc = dpo_loss(pw, pl, rw, rl, beta)
    # z = beta * ((pw - rw) - (pl - rl)) = [0.5 * (0.5 + 0.5), 0.5 * (-1 - 1)] = [0.5, -1]
    assert loss == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.0))) / 2, rel=1e-12)
    assert acc == 0.5
    np.testing.assert_allclose(gw, numeric_grad(lambda: dpo_loss(pw, pl, rw, rl, beta)[0], pw), atol=1e-9)
    np.testing.assert_allclose(gl, numeric_grad(lambda: dpo_loss(pw, pl, rw, rl, beta)[0], pl), atol=1e-9)


def test_dpo_whole_model_gradient_matches_finite_differences():
    m = chat_model(np.float64, seed=4, n_embd=8, block=16)
    seqs = [encode_chat(m, [{"role": "user", "content": "a"}, {"role": "assistant", "content": x}], train_on="last")
            for x in ("bc", "d")]
    ref = sequence_logprobs(m, seqs)[0] + np.array([0.3, -0.2])

    def f():
        pi = sequence_logprobs(m, seqs)[0]
        return dpo_loss(pi[[0]], pi[[1]], ref[[0]], ref[[1]], 0.7)[0]

    m.zero_grad()
    pi, y = sequence_logprobs(m, seqs)
    _, gw, gl, _ = dpo_loss(pi[[0]], pi[[1]], ref[[0]], ref[[1]], 0.7)
    m.backward(dlogp=np.array([gw[0], gl[0]])[:, None] * (y >= 0))
    coords = np.random.default_rng(5).choice(m.flat.size, 80, replace=False)
    np.testing.assert_allclose(m.grad[coords], numeric_grad(f, m.flat, coords), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- PPO math
def test_kl_rewards_and_gae_hand_computed():
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], float)
    logp = np.array([[0, -1.0, -2.0, -0.5, 0], [0, 0, -1.0, -1.0, -1.0]])
    ref = np.array([[0, -1.5, -2.0, -1.0, 0], [0, 0, -1.0, -2.0, -0.5]])
    r, kl = kl_rewards(logp, ref, mask, np.array([1.0, -1.0]), beta=0.1)
    np.testing.assert_allclose(kl, [0.5 + 0.5, 1.0 - 0.5])
    np.testing.assert_allclose(r[0], [0, -0.05, 0, -0.05 + 1.0, 0])
    np.testing.assert_allclose(r[1], [0, 0, 0, -0.1, 0.05 - 1.0])
    values = np.array([[9, 0.5, 0.2, 0.4, 9], [9, 9, 0.1, 0.3, -0.2]])
    adv, ret = gae(r, values, mask, gamma=0.9, lam=0.8)
    # row 0 by hand, from the last response token back (the value after it is 0)
    d3 = r[0, 3] + 0 - 0.4
    d2 = r[0, 2] + 0.9 * 0.4 - 0.2
    d1 = r[0, 1] + 0.9 * 0.2 - 0.5
    a3 = d3
    a2 = d2 + 0.9 * 0.8 * a3
    a1 = d1 + 0.9 * 0.8 * a2
    np.testing.assert_allclose(adv[0], [0, a1, a2, a3, 0])
    np.testing.assert_allclose(ret[0], [0, a1 + 0.5, a2 + 0.2, a3 + 0.4, 0])
    assert adv[1, 0] == adv[1, 1] == 0
    w = whiten(adv, mask)
    assert abs(w[mask > 0].mean()) < 1e-12 and abs(w[mask > 0].std() - 1) < 1e-6 and np.all(w[mask == 0] == 0)


def test_clipped_surrogate_values_gradient_and_clip():
    lp_old = np.array([[-1.0, -1.0, -1.0, -1.0]])
    adv = np.array([[1.0, 1.0, -1.0, -1.0]])
    mask = np.ones((1, 4))
    # ratios 1.1 (inside), 1.5 (clipped, A > 0), 0.5 (clipped, A < 0), 1.5 (A < 0: unclipped term is the min)
    lp = lp_old + np.log([[1.1, 1.5, 0.5, 1.5]])
    loss, dlogp, clipfrac = clipped_surrogate(lp, lp_old, adv, mask, clip=0.2)
    assert loss == pytest.approx(-(1.1 + 1.2 - 0.8 - 1.5) / 4)
    assert clipfrac == 0.75
    assert dlogp[0, 1] == 0 and dlogp[0, 2] == 0  # the clip holds the objective flat
    np.testing.assert_allclose(dlogp, numeric_grad(lambda: clipped_surrogate(lp, lp_old, adv, mask, 0.2)[0], lp),
                               atol=1e-8)
    assert dlogp[0, 0] < 0  # positive advantage: raising logp lowers the loss


def test_clipped_value_loss_gradient():
    v_old = np.array([[0.0, 0.0, 0.0]])
    ret = np.array([[1.0, 1.0, -1.0]])
    v = np.array([[0.1, 0.5, 0.5]])  # inside the clip; outside and moving toward R; outside and away
    mask = np.ones((1, 3))
    loss, dv = clipped_value_loss(v, v_old, ret, mask, clip=0.2)
    l = [max((0.1 - 1) ** 2, (0.1 - 1) ** 2), max((0.5 - 1) ** 2, (0.2 - 1) ** 2), max((0.5 + 1) ** 2, (0.2 + 1) ** 2)]
    assert loss == pytest.approx(0.5 * np.mean(l))
    np.testing.assert_allclose(dv, numeric_grad(lambda: clipped_value_loss(v, v_old, ret, mask, 0.2)[0], v), atol=1e-8)
    assert dv[0, 1] == 0  # the clipped term rules and is flat in v


def test_value_model_gradient_matches_finite_differences():
    m = chat_model(np.float64, seed=6, n_embd=8, block=16)
    from npgpt.finetune import TaskHead
    vm = ValueModel(m, TaskHead(8, 1, seed=1, dtype=np.float64))
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    u = np.random.default_rng(7).standard_normal((2, 4))
    m.zero_grad()
    vm.head.grad.fill(0)
    v, back = vm.values(x)
    back(u)
    f = lambda: float((vm.values(x)[0] * u).sum())  # noqa: E731
    np.testing.assert_allclose(vm.head.grad, numeric_grad(f, vm.head.flat), rtol=1e-6, atol=1e-8)
    coords = np.random.default_rng(8).choice(m.flat.size, 60, replace=False)
    np.testing.assert_allclose(m.grad[coords], numeric_grad(f, m.flat, coords), rtol=1e-5, atol=1e-8)


def test_policy_gradient_sign_on_a_bandit():
    """One prompt, the first response token is the action; action 'a' pays 1, the rest 0. PPO's clipped
    surrogate with advantages r - mean must drive p(a) from chance to nearly 1."""
    m = chat_model(seed=9, n_embd=16)
    good = m.tokenizer.encode("a")[0]
    prompt = encode_chat(m, [{"role": "user", "content": "pick"}], generation_prompt=True)[0]
    x = np.array([prompt])
    p0 = float(np.exp(m.forward(x)[0, -1] - np.logaddexp.reduce(m.forward(x)[0, -1]))[good])
    opt = AdamW(m.flat, decay_mask(m.config), weight_decay=0.0)
    rng = np.random.default_rng(0)
    for _ in range(60):
        logits = m.forward(np.repeat(x, 16, 0))[:, -1].astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        acts = np.array([rng.choice(len(q), p=q) for q in p])
        r = (acts == good).astype(float)
        adv = (r - r.mean())[:, None]
        xs = np.concatenate([np.repeat(x, 16, 0), acts[:, None]], 1)
        ys = np.full_like(xs, -1)
        ys[:, len(prompt) - 1] = acts
        mask = (ys >= 0).astype(float)
        lp_old = m.logprobs(xs, ys).astype(np.float64)
        for _ in range(2):
            m.zero_grad()
            lp = m.logprobs(xs, ys).astype(np.float64)
            _, dlogp, _ = clipped_surrogate(lp, lp_old, adv * mask, mask, 0.2)
            m.backward(dlogp=dlogp)
            opt.step(m.grad, 3e-3)
    logits = m.forward(x)[0, -1].astype(np.float64)
    p1 = float(np.exp(logits[good] - np.logaddexp.reduce(logits)))
    assert p0 < 0.1 and p1 > 0.9, (p0, p1)


# ---------------------------------------------------------------- the commands end to end
@pytest.fixture(scope="module")
def rlhf_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rlhf")
    tok = Tokenizer.train_char([ALPHABET])
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=tok.vocab_size), seed=0,
               tokenizer=tok)
    save_checkpoint(d / "base", base)
    words = ["cat", "dog", "sun", "tree"]
    write_jsonl(d / "demos.jsonl", [{"prompt": f"about {w}", "response": f"the {w} is nice."} for w in words * 16])
    write_jsonl(d / "prefs.jsonl", [{"prompt": f"about {w}", "chosen": f"yes {w}?", "rejected": f"no {w}."}
                                    for w in words * 8])
    (d / "prompts.txt").write_text("".join(f"about {w}\n" for w in words))
    return d


def test_sft_learns_the_responses_and_chat_generates_them(rlhf_files, tmp_path):
    d = rlhf_files
    r = run_cli("sft", "--model", d / "base", "--data", d / "demos.jsonl", "--out", tmp_path / "sft",
                "--learning_rate", "3e-3", "--epochs", "8", "--batch_size", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "sft" / "config.json").read_text())
    hist = cfg["sft"]["history"]
    assert hist[-1]["val_loss"] < 0.3 * hist[0]["train_loss"]
    g = run_cli("generate", "--chat", "about dog", "--model", tmp_path / "sft", "-t", "0", "-n", "30")
    # the reply alone, in the demonstrations' shape, ended by <|end|> (which is not printed)
    assert g.returncode == 0 and re.fullmatch(r"the (cat|dog|sun|tree) is nice\.", g.stdout.strip()), g


def test_reward_ppo_dpo_commands(rlhf_files, tmp_path):
    d = rlhf_files
    assert run_cli("sft", "--model", d / "base", "--data", d / "demos.jsonl", "--out", tmp_path / "sft",
                   "--learning_rate", "3e-3", "--epochs", "2", "--quiet").returncode == 0
    r = run_cli("reward", "train", "--model", tmp_path / "sft", "--data", d / "prefs.jsonl", "--out", tmp_path / "rm",
                "--demos", d / "demos.jsonl", "--learning_rate", "1e-3", "--epochs", "3", "--batch_size", "4")
    assert r.returncode == 0, r.stderr
    assert "val pair accuracy" in r.stdout
    s = run_cli("reward", "score", "--model", tmp_path / "rm", d / "demos.jsonl")
    rewards = [json.loads(ln)["reward"] for ln in s.stdout.splitlines()]
    assert len(rewards) == 64 and abs(np.mean(rewards)) < 1e-3  # InstructGPT's normalisation
    s = run_cli("reward", "score", "--model", tmp_path / "rm", d / "prefs.jsonl")
    pair = [json.loads(ln)["rewards"] for ln in s.stdout.splitlines()]
    assert np.mean([a > b for a, b in pair]) > 0.9
    r = run_cli("ppo", "--policy", tmp_path / "sft", "--reward", tmp_path / "rm", "--prompts", d / "prompts.txt",
                "--out", tmp_path / "ppo", "--iterations", "2", "--batch_size", "4", "--minibatch_size", "2",
                "--max_new_tokens", "12", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(ln) for ln in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and {"reward", "kl", "entropy", "clipfrac", "value_loss"} <= recs[0].keys()
    assert (tmp_path / "ppo" / "value" / "head.safetensors").is_file()
    r = run_cli("dpo", "--model", tmp_path / "sft", "--data", d / "prefs.jsonl", "--out", tmp_path / "dpo",
                "--learning_rate", "1e-3", "--epochs", "2", "--quiet")
    assert r.returncode == 0 and "implicit reward accuracy" in r.stdout, r.stderr
    hist = json.loads((tmp_path / "dpo" / "config.json").read_text())["dpo"]["history"]
    assert hist[-1]["train_reward_acc"] > 0.75, hist  # DPO learns the preferences, not just runs


def test_ppo_ptx_mixes_the_pretraining_loss(rlhf_files, sft_and_rm, tmp_path):
    """PPO-ptx's LM term does its job: the pretraining text's loss falls under the policy updates with it,
    and not (or much less) without it."""
    from npgpt.checkpoint import load_model
    from npgpt.data import TokenData, prepare
    from npgpt.ppo import PPOConfig, ppo
    d, m = rlhf_files, sft_and_rm
    (tmp_path / "text.txt").write_text("the cat and the dog sat in the sun under a tree. " * 40)
    prepare([tmp_path / "text.txt"], tmp_path / "ptx", Tokenizer.load(d / "base", "char"), val_fraction=0.2)
    data = TokenData(tmp_path / "ptx")
    x, y = data.batch("val", 8, 48, np.random.default_rng(0))
    cfg = dict(iterations=3, batch_size=4, minibatch_size=4, max_new_tokens=8, learning_rate=1e-3)
    losses = {}
    for coef in (0.0, 5.0):
        out = tmp_path / f"ppo{coef}"
        r = ppo(m / "sft", m / "rm", d / "prompts.txt", out, PPOConfig(**cfg, ptx_coef=coef),
                ptx_data=tmp_path / "ptx" if coef else None, quiet=True)
        assert ("ptx_loss" in r["iterations"][0]) == bool(coef)
        losses[coef] = load_model(out).loss(x, y)
    before = load_model(m / "sft").loss(x, y)
    assert losses[5.0] < before - 0.3 and losses[5.0] < losses[0.0] - 0.3, (before, losses)


def test_command_errors_are_one_line(rlhf_files, tmp_path):
    d = rlhf_files
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "q", "chosen": "a", "rejected": "b"}',
                                              '{"prompt": "q", "chosen": "a", "rejected": "a"}'])
    r = run_cli("dpo", "--model", d / "base", "--data", bad, "--out", tmp_path / "x")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "bad.jsonl:2" in r.stderr
    r = run_cli("dpo", "--model", d / "base", "--data", bad, "--out", tmp_path / "x", "--skip-bad", "--quiet",
                "--val_fraction", "0")
    assert r.returncode == 0 and "skipped 1 bad records" in r.stderr, r.stderr
    r = run_cli("ppo", "--policy", d / "base", "--reward", d / "base", "--prompts", d / "prompts.txt", "--out", tmp_path / "y")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    r = run_cli("generate", "--chat", "hi", "--model", d / "base")
    assert r.returncode == 1 and "no chat tokens" in r.stderr


# ---------------------------------------------------------------- reliability of the RL jobs
PPO_TINY = dict(iterations=4, batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=6, ckpt_interval=2)


@pytest.fixture(scope="module")
def sft_and_rm(rlhf_files, tmp_path_factory):
    from npgpt.reward import RewardConfig, train_reward
    from npgpt.sft import SFTConfig, sft
    d = tmp_path_factory.mktemp("sftrm")
    sft(rlhf_files / "base", rlhf_files / "demos.jsonl", d / "sft", SFTConfig(epochs=1), quiet=True)
    train_reward(d / "sft", rlhf_files / "prefs.jsonl", d / "rm", RewardConfig(), quiet=True)
    return d


def ppo_records(out):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def test_ppo_killed_at_any_point_resumes_exactly(rlhf_files, sft_and_rm, tmp_path):
    import os
    import signal
    import npgpt.files as F
    from npgpt.ppo import PPOConfig, ppo
    d, m = rlhf_files, sft_and_rm
    cfg = PPOConfig(**PPO_TINY, temperature=0.8)
    run = lambda out, **kw: ppo(m / "sft", m / "rm", d / "prompts.txt", out, cfg, quiet=True, **kw)  # noqa: E731
    run(tmp_path / "ref")
    ref = ppo_records(tmp_path / "ref")
    ref_w = npgpt_load(tmp_path / "ref").flat
    os.environ["NPGPT_CRASH_AT"] = "1000000000"
    F._crash_count = 0
    try:
        run(tmp_path / "count")
        points = F._crash_count
    finally:
        del os.environ["NPGPT_CRASH_AT"]
    for n in np.random.default_rng(1).integers(2, points + 1, size=6):
        out = tmp_path / f"k{n}"
        pid = os.fork()
        if pid == 0:
            try:
                os.environ["NPGPT_CRASH_AT"] = str(n)
                F._crash_count = 0
                run(out)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if (out / "state.json").exists() or (out / F.COMMIT).exists():
            run(out, resume=True)
        else:  # killed before the first checkpoint: nothing to resume, start again
            with pytest.raises(NpgptError, match="nothing to resume"):
                run(out, resume=True)
            run(out, force=True)
        assert ppo_records(out) == ref, n
        np.testing.assert_array_equal(npgpt_load(out).flat, ref_w)
        assert (out / "value" / "head.safetensors").is_file()


def npgpt_load(path):
    from npgpt.checkpoint import load_model
    return load_model(path)


def test_ppo_refuses_ptx_data_of_another_tokenizer(rlhf_files, sft_and_rm, tmp_path):
    from npgpt.data import prepare
    from npgpt.ppo import PPOConfig, ppo
    (tmp_path / "text.txt").write_text("ZYXW vuts 0123 " * 200)
    prepare([tmp_path / "text.txt"], tmp_path / "ptx", "char")
    with pytest.raises(NpgptError, match="not tokenized with the policy's tokenizer"):
        ppo(sft_and_rm / "sft", sft_and_rm / "rm", rlhf_files / "prompts.txt", tmp_path / "ppo",
            PPOConfig(**PPO_TINY, ptx_coef=1.0), ptx_data=tmp_path / "ptx", quiet=True)


def test_logprobs_at_a_temperature_and_their_gradient():
    tok = Tokenizer.train_char([ALPHABET])
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=tok.vocab_size), seed=0,
                dtype=np.float64)
    x = np.array([[1, 2, 3, 4, 5]])
    y = np.array([[2, 3, -1, 5, 6]])
    T = 0.7
    lp = model.logprobs(x, y, temperature=T)
    z = model.forward(x)[0] / T
    ref = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(lp[0], np.where(y[0] >= 0, ref[np.arange(5), np.maximum(y[0], 0)], 0), atol=1e-12)
    w = np.array([[0.3, -1.0, 0.0, 2.0, 0.5]])
    model.zero_grad()
    model.logprobs(x, y, temperature=T)
    model.backward(dlogp=w)
    coords = [0, 7, 40, model.flat.size - 1]
    num = numeric_grad(lambda: float((model.logprobs(x, y, temperature=T) * w).sum()), model.flat, coords)
    np.testing.assert_allclose(model.grad[coords], num, rtol=1e-6, atol=1e-9)


def test_dpo_policy_runs_without_dropout_so_equal_weights_give_log_2(rlhf_files, tmp_path):
    from npgpt.checkpoint import load_model
    from npgpt.dpo import DPOConfig, dpo
    base = load_model(rlhf_files / "base")
    dropped = GPT(GPTConfig(**{**base.config.__dict__, "dropout": 0.3}), np.array(base.flat), tokenizer=base.tokenizer)
    save_checkpoint(tmp_path / "base", dropped)
    r = dpo(tmp_path / "base", rlhf_files / "prefs.jsonl", tmp_path / "dpo",
            DPOConfig(learning_rate=1e-12, min_lr=0.0, val_fraction=0), quiet=True)
    assert abs(r["epochs"][0]["train_loss"] - math.log(2)) < 1e-5
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["model"]["dropout"] == 0.3


def test_reward_model_never_saved_with_a_nan_and_ppo_stops_on_one(rlhf_files, sft_and_rm, tmp_path, monkeypatch):
    from npgpt import reward
    from npgpt.tensorfile import write_safetensors
    from npgpt.ppo import PPOConfig, ppo
    import shutil
    demos = write_jsonl(tmp_path / "d.jsonl", ['{"messages": [{"role": "assistant", "content": "hail"}, '
                                               '{"role": "user", "content": "hi"}]}'])
    with pytest.raises(NpgptError, match="no demonstration ends with an assistant message"):
        reward.train_reward(sft_and_rm / "sft", rlhf_files / "prefs.jsonl", tmp_path / "rm1", demos_file=demos,
                            quiet=True)
    assert not (tmp_path / "rm1").exists()
    real = reward.pairwise_loss
    monkeypatch.setattr(reward, "pairwise_loss", lambda r, g: (float("nan"),) + real(r, g)[1:])
    with pytest.raises(NpgptError, match="loss became nan"):
        reward.train_reward(sft_and_rm / "sft", rlhf_files / "prefs.jsonl", tmp_path / "rm2", quiet=True)
    assert not (tmp_path / "rm2" / "model.safetensors").exists()
    monkeypatch.undo()
    # a reward model with a NaN bias (written by hand: npgpt refuses to write one) stops PPO at once
    shutil.copytree(sft_and_rm / "rm", tmp_path / "rm3")
    head = reward.load_reward_model(tmp_path / "rm3").head
    head.params["head.bias"][0] = np.nan
    write_safetensors(tmp_path / "rm3" / "head.safetensors", [(n, head.params[n]) for n, _ in head.shapes])
    with pytest.raises(NpgptError, match="reward became nan at iteration 1"):
        ppo(sft_and_rm / "sft", tmp_path / "rm3", rlhf_files / "prompts.txt", tmp_path / "ppo",
            PPOConfig(**PPO_TINY), quiet=True)
    assert not (tmp_path / "ppo" / "model.safetensors").exists()


@pytest.mark.parametrize("cmd, args, match", [
    ("sft", ["--epochs", "0"], "epochs must be an integer >= 1"),
    ("sft", ["--batch_size", "0"], "batch_size must be an integer >= 1"),
    ("dpo", ["--epochs", "0"], "epochs must be an integer >= 1"),
    ("dpo", ["--beta", "nan"], "beta must be a finite number > 0"),
    ("reward", ["--epochs", "0"], "epochs must be an integer >= 1"),
    ("reward", ["--min_lr", "-1"], "min_lr must be a finite number >= 0"),
    ("ppo", ["--iterations", "0"], "iterations must be an integer >= 1"),
    ("ppo", ["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1"),
    ("ppo", ["--temperature", "inf"], "temperature must be a finite number > 0"),
    ("ppo", ["--grad_clip", "nan"], "grad_clip must be a finite number >= 0"),
])
def test_bad_job_settings_are_one_line_errors(rlhf_files, sft_and_rm, tmp_path, cmd, args, match):
    d, m = rlhf_files, sft_and_rm
    base = {"sft": ["sft", "--model", d / "base", "--data", d / "demos.jsonl"],
            "dpo": ["dpo", "--model", m / "sft", "--data", d / "prefs.jsonl"],
            "reward": ["reward", "train", "--model", m / "sft", "--data", d / "prefs.jsonl"],
            "ppo": ["ppo", "--policy", m / "sft", "--reward", m / "rm", "--prompts", d / "prompts.txt"]}[cmd]
    r = run_cli(*base, "--out", tmp_path / "out", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert match in r.stderr
    assert not (tmp_path / "out").exists()


def test_library_reply_equals_the_cli_chat(rlhf_files, sft_and_rm):
    from npgpt.chat import reply
    from npgpt.checkpoint import load_model
    text = reply(load_model(sft_and_rm / "sft"), "about dog", 30, temperature=0)
    g = run_cli("generate", "--chat", "about dog", "--model", sft_and_rm / "sft", "-t", "0", "-n", "30")
    assert g.returncode == 0 and g.stdout.rstrip("\n") == text
    with pytest.raises(NpgptError, match="needs the user's message"):
        reply(load_model(sft_and_rm / "sft"), "  ")
