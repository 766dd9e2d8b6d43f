"""Evaluation: perplexity with a sliding window (as the GPT-2 paper and transformers' docs evaluate).

Windows of the full context slide over the tokens `stride` at a time; each token is scored once, by
the window in which it is new, so with a stride shorter than the context every scored token (after the
first window) sees at least block_size - stride tokens of context.
"""
from __future__ import annotations

import math

import numpy as np

from .errors import NpgptError
from .model import GPT


def sliding_windows(n_tokens: int, block: int, stride: int):
    """Yield (begin, end, first_scored): the window ids[begin:end] scores targets ids[j] for
    first_scored <= j < end (each j >= 1 exactly once over all windows)."""
    prev_end, begin = 0, 0
    while True:
        end = min(begin + block, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        if end == n_tokens:
            return
        prev_end, begin = end, begin + stride


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows with target >= 0 of -log softmax(logits)[target]; logits [N, V], targets [N]."""
    keep = targets >= 0
    z = logits[keep].astype(np.float64)
    mx = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - mx).sum(-1)) + mx[:, 0]
    return float((lse - z[np.arange(len(z)), targets[keep]]).sum())


def perplexity(model: GPT, text: str | None = None, ids=None, stride: int | None = None) -> dict:
    """Perplexity of `text` (or token `ids`) under `model`.

    Returns {"perplexity", "nll" (mean, nats per token), "bits_per_byte" (when text is given), "tokens"
    (number scored), "bytes", "stride", "context"}.
    """
    block = model.config.block_size
    stride = stride or block
    if not 0 < stride <= block:
        raise NpgptError(f"stride must be in 1..{block}, got {stride}")
    if ids is None:
        if model.tokenizer is None:
            raise NpgptError("this model has no tokenizer; pass token ids")
        ids = model.tokenizer.encode(text)
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2:
        raise NpgptError("need at least 2 tokens to measure perplexity")
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), block, stride):
        x = ids[begin:end - 1]
        targets = ids[begin + 1:end].copy()
        targets[: first - (begin + 1)] = -1  # already scored by an earlier window
        n = int((targets >= 0).sum())
        total += nll_sum(model.forward(x[None])[0], targets)
        count += n
    nll = total / count
    out = {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "stride": stride, "context": block}
    if text is not None:
        nbytes = len(text.encode("utf-8"))
        out.update(bytes=nbytes, bits_per_byte=total / math.log(2) / nbytes)
    return out


# ---------------------------------------------------------------- data files
def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """JSON-lines records; a bad line or a missing field is an error naming the line number."""
    import json
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"data file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise NpgptError(f"{path}:{n}: not valid JSON") from None
            if not isinstance(rec, dict):
                raise NpgptError(f"{path}:{n}: expected a JSON object")
            missing = [k for k in required if k not in rec]
            if missing:
                raise NpgptError(f"{path}:{n}: missing field {missing[0]!r}")
            rec["_line"] = n
            items.append(rec)
    if not items:
        raise NpgptError(f"{path}: no records")
    return items


# ---------------------------------------------------------------- scoring continuations
def continuation_logprobs(model: GPT, prefix: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
    """log p(token) of every token of each continuation given `prefix` (ids). The prefix runs through the
    model once; each continuation reuses its keys and values from the KV cache."""
    from .model import KVCache
    block = model.config.block_size
    longest = max(len(c) for c in continuations)
    if longest == 0:
        raise NpgptError("an empty continuation cannot be scored")
    prefix = list(prefix)[-(block - longest):] if len(prefix) + longest > block else list(prefix)
    if not prefix:
        raise NpgptError("a continuation fills the whole context; nothing is left for the prompt")
    cache = KVCache(model.config, 1, length=len(prefix) + longest)
    last = log_softmax(model.forward(np.array([prefix]), kv=cache, last_only=True)[0, -1])
    out = []
    for cont in continuations:
        cache.length = len(prefix)
        lp = np.empty(len(cont))
        lp[0] = last[cont[0]]
        if len(cont) > 1:
            logits = model.forward(np.array([cont[:-1]]), kv=cache)[0]
            lp[1:] = log_softmax(logits)[np.arange(len(cont) - 1), cont[1:]]
        out.append(lp)
    return out


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def stderr_of_mean(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


# ---------------------------------------------------------------- multiple choice (GPT-2 / GPT-3 style)
DEFAULT_TEMPLATE = "{context}{choice}"
UNCONDITIONAL_PREFIX = "Answer:"

TEMPLATES = {  # the GPT-2 paper's zero-shot prompt formats (fields filled per item)
    "tldr": "{context}\nTL;DR:{choice}",
    "qa": "Q: {context}\nA:{choice}",
    "translate": "{context} ={choice}",
}


def _split_template(template: str) -> tuple[str, str]:
    template = TEMPLATES.get(template, template)
    if "{context}" not in template or template.count("{choice}") != 1:
        raise NpgptError("a template needs one {context} and exactly one {choice} field")
    before, after = template.split("{choice}")
    return before, after


def choice_scores(lps: list[np.ndarray], choices: list[str], uncond: list[np.ndarray] | None = None) -> dict:
    """The four normalisations' scores of each choice: sum of log-probs, per token, per character
    (UTF-8 bytes, as lm-evaluation-harness), and unconditional (GPT-3: minus the choice's log-prob after
    a neutral "Answer:" prompt)."""
    out = {"sum": [float(lp.sum()) for lp in lps],
           "per_token": [float(lp.mean()) for lp in lps],
           "per_char": [float(lp.sum()) / max(1, len(c.encode("utf-8"))) for lp, c in zip(lps, choices)]}
    if uncond is not None:
        out["unconditional"] = [float(lp.sum() - u.sum()) for lp, u in zip(lps, uncond)]
    return out


def eval_choice(model: GPT, items: list[dict], *, shots: int = 0, demos: list[dict] | None = None, seed: int = 0,
                template: str = DEFAULT_TEMPLATE, separator: str = "\n\n", unconditional: bool = True,
                limit: int | None = None) -> dict:
    """Zero-/few-shot multiple choice: each item {"context", "choices", "label"} is scored by the
    log-likelihood of each choice after the (demonstrations +) context; accuracy under each
    normalisation with its standard error. Demonstrations are drawn (seeded) from the item's own
    "demos" list when it has one (tasks whose rule changes per prompt), else from `demos`, else from the
    other items."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer")
    before, after = _split_template(template)
    for it in items:
        ch = it.get("choices")
        if "context" not in it or not isinstance(ch, list) or len(ch) < 2 or "label" not in it:
            raise NpgptError(f"line {it.get('_line', '?')}: an item needs context, choices (2 or more) and label")
        if not isinstance(it["label"], int) or not 0 <= it["label"] < len(ch):
            raise NpgptError(f"line {it.get('_line', '?')}: label {it['label']!r} is out of range")
    rng = np.random.default_rng(seed)
    items = items[:limit] if limit else items
    pool = demos if demos is not None else items
    correct = {k: [] for k in ("sum", "per_token", "per_char", "unconditional")}
    uncond_prefix, skipped = None, None
    if unconditional:
        try:
            uncond_prefix = tok.encode(UNCONDITIONAL_PREFIX)
        except NpgptError:  # e.g. a character vocabulary without those letters
            skipped = f"unconditional normalisation skipped: the tokenizer cannot encode {UNCONDITIONAL_PREFIX!r}"
    for i, it in enumerate(items):
        shot_text = ""
        if shots:
            candidates = it["demos"] if "demos" in it else [d for d in pool if d is not it]
            if len(candidates) < shots:
                raise NpgptError(f"{shots} shots requested but only {len(candidates)} demonstrations available")
            picks = rng.choice(len(candidates), shots, replace=False)
            shot_text = separator.join(
                before.format(context=candidates[j]["context"]) + candidates[j]["choices"][candidates[j]["label"]]
                + after.format(context=candidates[j]["context"]) for j in picks) + separator
        prefix = tok.encode(shot_text + before.format(context=it["context"]))
        conts = [tok.encode(c + after.format(context=it["context"])) for c in it["choices"]]
        lps = continuation_logprobs(model, prefix, conts)
        unc = continuation_logprobs(model, uncond_prefix, conts) if uncond_prefix is not None else None
        scores = choice_scores(lps, it["choices"], unc)
        for k, v in scores.items():
            correct[k].append(float(int(np.argmax(v)) == it["label"]))
    result = {"task": "choice", "n": len(items), "shots": shots, "seed": seed, "template": template,
              "separator": separator}
    if skipped:
        result["note"] = skipped
    for k, v in correct.items():
        if v:
            result[f"acc_{k}"] = float(np.mean(v))
            result[f"acc_{k}_stderr"] = stderr_of_mean(v)
    return result


# ---------------------------------------------------------------- LAMBADA (GPT-2 zero-shot)
def eval_lambada(model: GPT, items: list[dict], limit: int | None = None) -> dict:
    """Last-word prediction: the target is the passage's final word (with its leading space). Accuracy
    counts an item when greedy decoding reproduces every token of the word; perplexity is
    exp(-mean over items of the word's log-likelihood)."""
    tok = model.tokenizer
    hits, lls = [], []
    for it in items[:limit] if limit else items:
        text = it.get("text")
        if not isinstance(text, str) or " " not in text.strip():
            raise NpgptError(f"line {it.get('_line', '?')}: a LAMBADA item needs a text of several words")
        text = text.rstrip()
        cut = text.rfind(" ")
        ctx, word = text[:cut], text[cut:]
        cids, wids = tok.encode(ctx), tok.encode(word)
        ids = (cids + wids)[-(model.config.block_size + 1):]
        lp = log_softmax(model.forward(np.array([ids[:-1]]))[0, -len(wids):])
        lls.append(float(lp[np.arange(len(wids)), wids].sum()))
        hits.append(float(np.array_equal(lp.argmax(-1), wids)))
    return {"task": "lambada", "n": len(hits), "acc": float(np.mean(hits)), "acc_stderr": stderr_of_mean(hits),
            "perplexity": float(math.exp(-np.mean(lls))), "protocol": "greedy whole-word match, no stop-word filter"}


# ---------------------------------------------------------------- generation (exact match / F1)
def normalize_answer(s: str) -> str:
    """SQuAD-style: lower case, drop punctuation, articles and extra whitespace."""
    import re
    import string
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, ref: str) -> float:
    from collections import Counter
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def eval_generate(model: GPT, items: list[dict], *, shots: int = 0, seed: int = 0, template: str = "qa",
                  separator: str = "\n\n", max_new_tokens: int = 32, limit: int | None = None) -> dict:
    """Items {"context" (or "question"), "answers": [...]}: greedy generation stopped at a newline,
    scored by exact match and token F1 against the best reference."""
    from .sampling import cut_at_stop
    tok = model.tokenizer
    before, after = _split_template(template)
    for it in items:
        it.setdefault("context", it.get("question"))
        if it["context"] is None or not isinstance(it.get("answers"), list) or not it["answers"]:
            raise NpgptError(f"line {it.get('_line', '?')}: an item needs context (or question) and answers")
    rng = np.random.default_rng(seed)
    ems, f1s = [], []
    for it in items[:limit] if limit else items:
        demo = ""
        if shots:
            others = [d for d in items if d is not it]
            demo = separator.join(before.format(context=others[j]["context"]) + " " + others[j]["answers"][0]
                                  for j in rng.choice(len(others), shots, replace=False)) + separator
        ids = tok.encode(demo + before.format(context=it["context"]))
        out = model.generate(ids, max_new_tokens, temperature=0, stop=["\n"])[0]
        pred = cut_at_stop(tok.decode(out[len(ids):]), ["\n"]).strip()
        ems.append(max(float(normalize_answer(pred) == normalize_answer(a)) for a in it["answers"]))
        f1s.append(max(token_f1(pred, a) for a in it["answers"]))
    return {"task": "generate", "n": len(ems), "shots": shots, "seed": seed, "template": template,
            "exact_match": float(np.mean(ems)), "exact_match_stderr": stderr_of_mean(ems),
            "f1": float(np.mean(f1s)), "f1_stderr": stderr_of_mean(f1s), "stop": "\\n"}
