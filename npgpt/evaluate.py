"""Evaluation: perplexity with a sliding window (as the GPT-2 paper and transformers' docs evaluate).

A window is block_size + 1 tokens: the model reads the first block_size and predicts the last
block_size. Windows start every `stride` tokens; each token after the first is scored once, by the
first window that predicts it. With stride == block_size the windows tile the text and every token
is scored (the first of each window is the last target of the one before it); a shorter stride gives
every token after the first window at least block_size - stride + 1 tokens of context.
"""
from __future__ import annotations

import math
import re
import string
import sys
from collections import Counter

import numpy as np

from .data import read_jsonl
from .errors import NpgptError
from .model import GPT, KVCache
from .sampling import cut_at_stop, generate


def sliding_windows(n_tokens: int, block: int, stride: int):
    """Yield (begin, end, first_scored): inputs ids[begin:end-1] (at most block of them) predict
    targets ids[begin+1:end]; the window scores the targets j with first_scored <= j < end. Over all
    windows every j in 1..n_tokens-1 is scored exactly once."""
    prev_end, begin = 1, 0
    while True:
        end = min(begin + block + 1, n_tokens)
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


def _exp(x: float) -> float:
    """exp that gives inf instead of raising OverflowError (a perplexity of a very bad model)."""
    return math.exp(x) if x < 709.0 else math.inf


def token_bytes(tok, i: int) -> int:
    """UTF-8 length of token i's text. A byte-level BPE token is a string of byte symbols, one per byte
    (decoding it alone could split a character); char tokens and added tokens are plain text."""
    s = tok.tk.id_to_token(int(i))
    if s is None:
        raise NpgptError(f"token id {i} is not in the vocabulary")
    if tok.kind in ("bpe", "gpt2") and int(i) not in tok.tk.get_added_tokens_decoder():
        return len(s)
    return len(s.encode("utf-8"))


def perplexity(model: GPT, text: str | None = None, ids=None, stride: int | None = None) -> dict:
    """Perplexity of `text` (or token `ids`) under `model`; every token but the first is scored (there
    is no BOS to predict the first from).

    Returns {"perplexity", "nll" (mean, nats per token), "tokens" (number scored = len(ids) - 1),
    "stride", "context"} and, when text is given, "bytes" (UTF-8 bytes of the scored tokens, i.e. the
    text without its first token) and "bits_per_byte" (total NLL in bits / those bytes).
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
        total += nll_sum(model.forward(x[None])[0], targets)
        count += int((targets >= 0).sum())
    nll = total / count
    out = {"perplexity": _exp(nll), "nll": nll, "tokens": count, "stride": stride, "context": block}
    if text is not None:
        # bits/byte over the bytes that were scored: the first token's bytes have no prediction
        nbytes = len(text.encode("utf-8")) - token_bytes(model.tokenizer, ids[0])
        out.update(bytes=nbytes, bits_per_byte=total / math.log(2) / max(1, nbytes))
    return out


def _where(it: dict, path=None) -> str:
    """How an error names a record: file:line when the file is known, else its line."""
    n = it.get("_line", "?")
    return f"{path}:{n}" if path is not None else f"line {n}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not the index 1


def check_choice_item(it: dict, where: str, *, with_demos: bool = True) -> None:
    """A multiple-choice item is {"context": str, "choices": [2 or more non-empty str], "label": index},
    optionally with its own "demos": [items]."""
    if not isinstance(it, dict):
        raise NpgptError(f"{where}: expected an object")
    for k in ("context", "choices", "label"):
        if k not in it:
            raise NpgptError(f"{where}: missing field {k!r}")
    if not isinstance(it["context"], str):
        raise NpgptError(f"{where}: 'context' must be a string")
    ch = it["choices"]
    if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) for c in ch):
        raise NpgptError(f"{where}: 'choices' must be a list of 2 or more strings")
    if not all(ch):
        raise NpgptError(f"{where}: choice {ch.index('')} is empty")
    if not _is_int(it["label"]):
        raise NpgptError(f"{where}: label must be an integer index, got {it['label']!r}")
    if not 0 <= it["label"] < len(ch):
        raise NpgptError(f"{where}: label {it['label']!r} is out of range")
    if with_demos and "demos" in it:
        if not isinstance(it["demos"], list):
            raise NpgptError(f"{where}: 'demos' must be a list of items")
        for k, d in enumerate(it["demos"]):
            check_choice_item(d, f"{where}: demo {k}", with_demos=False)


def generate_context(it: dict) -> str:
    """The text a generation item is prompted with: "context", else "question"."""
    return it["context"] if "context" in it else it["question"]


def check_generate_item(it: dict, where: str) -> None:
    """A generation item is {"context" or "question": str, "answers": [1 or more str]}."""
    if not isinstance(it, dict):
        raise NpgptError(f"{where}: expected an object")
    if "context" not in it and "question" not in it:
        raise NpgptError(f"{where}: missing field 'context' (or 'question')")
    if not isinstance(generate_context(it), str):
        raise NpgptError(f"{where}: '{'context' if 'context' in it else 'question'}' must be a string")
    ans = it.get("answers")
    if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
        raise NpgptError(f"{where}: 'answers' must be a non-empty list of strings")


def check_lambada_item(it: dict, where: str) -> None:
    """A LAMBADA item is {"text": str of two or more words}."""
    text = it.get("text") if isinstance(it, dict) else None
    if not isinstance(text, str) or " " not in text.strip():
        raise NpgptError(f"{where}: a LAMBADA item needs a text of several words")


def read_choice_items(path) -> list[dict]:
    """Validated multiple-choice items of a JSON-lines file (see check_choice_item)."""
    items = read_jsonl(path)
    for it in items:
        check_choice_item(it, _where(it, path))
    return items


def read_generate_items(path) -> list[dict]:
    """Validated generation items of a JSON-lines file (see check_generate_item)."""
    items = read_jsonl(path)
    for it in items:
        check_generate_item(it, _where(it, path))
    return items


def read_lambada_items(path) -> list[dict]:
    """Validated LAMBADA items of a JSON-lines file."""
    items = read_jsonl(path)
    for it in items:
        check_lambada_item(it, _where(it, path))
    return items


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def decode_escapes(s: str, what: str = "--separator") -> str:
    """Backslash escapes \\n \\t \\r \\0 \\\\ \\xHH \\uHHHH \\UHHHHHHHH decoded; every other character,
    non-ASCII included, is kept as it is (a bytes round trip through "unicode_escape" would not: it
    reads UTF-8 bytes as Latin-1). A bad or unknown escape is an NpgptError."""
    out, i = [], 0
    while i < len(s):
        if s[i] != "\\":
            out.append(s[i])
            i += 1
            continue
        kind = s[i + 1:i + 2]
        if kind in _ESCAPES:
            out.append(_ESCAPES[kind])
            i += 2
            continue
        if kind not in _HEX_DIGITS:
            raise NpgptError(f"{what}: unknown escape {s[i:i + 2]!r} in {s!r}; use \\n, \\t, \\r, \\0, \\\\, "
                             "\\xHH, \\uHHHH or \\UHHHHHHHH")
        digits = s[i + 2:i + 2 + _HEX_DIGITS[kind]]
        code = int(digits, 16) if len(digits) == _HEX_DIGITS[kind] and \
            all(c in "0123456789abcdefABCDEF" for c in digits) else -1
        if not (0 <= code <= 0x10FFFF) or 0xD800 <= code <= 0xDFFF:
            raise NpgptError(f"{what}: bad escape {s[i:i + 2 + len(digits)]!r} in {s!r}: \\{kind} needs "
                             f"{_HEX_DIGITS[kind]} hex digits of a Unicode character")
        out.append(chr(code))
        i += 2 + len(digits)
    text = "".join(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NpgptError(f"{what}: not valid UTF-8 text") from None
    return text


# ---------------------------------------------------------------- scoring continuations
def continuation_logprobs(model: GPT, prefix: list[int], continuations: list[list[int]]) -> list[np.ndarray]:
    """log p(token) of every token of each continuation given `prefix` (ids). The prefix runs through the
    model once; each continuation reuses its keys and values from the KV cache.

    A prefix longer than block_size - (longest continuation) is cropped from the left (eval_choice
    counts such items); a continuation needs at least one prefix token before it."""
    block = model.config.block_size
    if not continuations or min(len(c) for c in continuations) == 0:
        raise NpgptError("an empty continuation cannot be scored")
    longest = max(len(c) for c in continuations)
    if longest >= block:  # else prefix[-(block - longest):] would be prefix[-0:], the whole prefix
        raise NpgptError(f"a continuation of {longest} tokens does not fit the context ({block}) after a prompt")
    prefix = list(prefix)[-(block - longest):]
    if not prefix:
        raise NpgptError("the prompt is empty: there is nothing to condition the continuation on")
    cache = KVCache(model.config, 1, length=len(prefix) + longest, ring=False)  # rewound per continuation
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


def _fit_prompt(tok, demos: list[str], question: str, room: int) -> tuple[list[int], int]:
    """Token ids of "".join(demos) + question (each demo carries its separator) cut to at most `room`
    tokens: the earliest demonstrations are dropped first, whole, and only a question that does not fit
    on its own is cropped from the left. Returns (ids, length of the full prompt in tokens)."""
    full = None
    for k in range(len(demos) + 1):
        ids = tok.encode("".join(demos[k:]) + question)
        full = len(ids) if full is None else full
        if len(ids) <= room:
            return ids, full
    return ids[-room:], full


class _CropWarning:
    """Counts prompts that did not fit the context; warns on stderr at the first one (as generate does),
    since a cropped prompt changes the numbers."""

    def __init__(self, how: str = "its earliest demonstrations are dropped, whole, then its text is cropped "
                                  "from the left"):
        self.count, self.how = 0, how

    def __call__(self, where: str, n_tokens: int, room: int, block: int):
        if self.count == 0:
            print(f"warning: {where}: a prompt of {n_tokens} tokens does not fit the context ({block} tokens, "
                  f"{room} of them for the prompt): {self.how}; such items are counted in 'cropped'",
                  file=sys.stderr)
        self.count += 1


def _check_seed(seed) -> None:
    if not _is_int(seed) or seed < 0:
        raise NpgptError(f"seed must be an integer >= 0, got {seed!r}")


# ---------------------------------------------------------------- multiple choice (GPT-2 / GPT-3 style)
DEFAULT_TEMPLATE = "{context}{choice}"
UNCONDITIONAL_PREFIX = "Answer:"

TEMPLATES = {  # the GPT-2 paper's zero-shot prompt formats (fields filled per item)
    "tldr": "{context}\nTL;DR:{choice}",
    "qa": "Q: {context}\nA:{choice}",
    "translate": "{context} ={choice}",
}


def _split_template(template: str) -> tuple[str, str]:
    """(before, after): the format strings on either side of the one {choice} field of a template whose
    other fields are all {context}; literal braces are written {{ and }}. Both halves take
    .format(context=...)."""
    name = template
    template = TEMPLATES.get(template, template)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:  # an unbalanced { or }
        raise NpgptError(f"bad template {name!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    halves, fields = ([], []), []
    for literal, field, spec, conv in parts:
        side = halves[1 if "choice" in fields else 0]
        side.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field not in ("context", "choice") or spec or conv:
            raise NpgptError(f"bad template {name!r}: unknown field {{{field}{'!' + conv if conv else ''}"
                             f"{':' + spec if spec else ''}}}; the fields are {{context}} and {{choice}}")
        fields.append(field)
        if field == "context":
            side.append("{context}")
    if "context" not in fields or fields.count("choice") != 1:
        raise NpgptError(f"bad template {name!r}: it needs a {{context}} field and exactly one {{choice}} field")
    return "".join(halves[0]), "".join(halves[1])


def choice_scores(lps: list[np.ndarray], texts: list[str], uncond: list[np.ndarray] | None = None) -> dict:
    """The four normalisations' scores of each choice, from the log-probs of its scored tokens and the
    text they spell (the choice plus any template suffix after it): sum of log-probs, per token, per
    character (len of that text, as lm-evaluation-harness's acc_norm; characters, not UTF-8 bytes), and
    unconditional (GPT-3: minus the same tokens' log-prob after a neutral "Answer:" prompt)."""
    out = {"sum": [float(lp.sum()) for lp in lps],
           "per_token": [float(lp.mean()) for lp in lps],
           "per_char": [float(lp.sum()) / max(1, len(t)) for lp, t in zip(lps, texts)]}
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
    other items. A prompt that does not fit the context before the longest choice is cropped from the
    left (as lm-evaluation-harness does); "cropped" counts those items (with a warning on stderr)."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer")
    _check_seed(seed)
    before, after = _split_template(template)
    for it in items:
        check_choice_item(it, _where(it))
    for d in demos or []:
        check_choice_item(d, f"demonstration {_where(d)}", with_demos=False)
    rng = np.random.default_rng(seed)
    items = items[:limit] if limit else items
    pool = demos if demos is not None else items
    block = model.config.block_size
    correct = {k: [] for k in ("sum", "per_token", "per_char", "unconditional")}
    uncond_prefix, skipped = None, None
    if unconditional:
        try:
            uncond_prefix = tok.encode(UNCONDITIONAL_PREFIX)
        except NpgptError:  # e.g. a character vocabulary without those letters
            skipped = f"unconditional normalisation skipped: the tokenizer cannot encode {UNCONDITIONAL_PREFIX!r}"
    crop = _CropWarning("its text is cropped from the left")
    for it in items:
        where = _where(it)
        shot_texts = []
        if shots:
            candidates = it["demos"] if "demos" in it else [d for d in pool if d is not it]
            if len(candidates) < shots:
                raise NpgptError(f"{where}: {shots} shots requested but only {len(candidates)} demonstrations "
                                 "available")
            picks = rng.choice(len(candidates), shots, replace=False)
            shot_texts = [before.format(context=candidates[j]["context"]) + candidates[j]["choices"][candidates[j]["label"]]
                          + after.format(context=candidates[j]["context"]) + separator for j in picks]
        texts = [c + after.format(context=it["context"]) for c in it["choices"]]  # what is scored
        conts = [tok.encode(t) for t in texts]
        longest = max(len(c) for c in conts)
        if longest >= block:
            raise NpgptError(f"{where}: a choice of {longest} tokens does not fit the context ({block}) after a prompt")
        prefix = tok.encode("".join(shot_texts) + before.format(context=it["context"]))
        if not prefix:
            raise NpgptError(f"{where}: the prompt is empty; there is nothing to condition the choices on")
        if len(prefix) > block - longest:  # continuation_logprobs keeps the prompt's last tokens
            crop(where, len(prefix), block - longest, block)
        lps = continuation_logprobs(model, prefix, conts)
        unc = continuation_logprobs(model, uncond_prefix, conts) if uncond_prefix is not None else None
        scores = choice_scores(lps, texts, unc)
        for k, v in scores.items():
            correct[k].append(float(int(np.argmax(v)) == it["label"]))
    result = {"task": "choice", "n": len(items), "shots": shots, "seed": seed, "template": template,
              "separator": separator, "cropped": crop.count}
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
    exp(-mean over items of the word's log-likelihood). A passage longer than the context keeps its
    last block_size + 1 tokens; "cropped" counts those items."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer")
    for it in items:
        check_lambada_item(it, _where(it))
    block = model.config.block_size
    crop = _CropWarning("its text is cropped from the left")
    hits, lls = [], []
    for it in items[:limit] if limit else items:
        text = it["text"].rstrip()
        cut = text.rfind(" ")
        ctx, word = text[:cut], text[cut:]
        cids, wids = tok.encode(ctx), tok.encode(word)
        if len(wids) > block:
            raise NpgptError(f"{_where(it)}: the last word is {len(wids)} tokens, longer than the context ({block})")
        if not cids:
            raise NpgptError(f"{_where(it)}: the passage before the last word is empty")
        ids = cids + wids
        if len(ids) > block + 1:
            crop(_where(it), len(ids) - len(wids), block + 1 - len(wids), block)
            ids = ids[-(block + 1):]
        lp = log_softmax(model.forward(np.array([ids[:-1]]))[0, -len(wids):])
        lls.append(float(lp[np.arange(len(wids)), wids].sum()))
        hits.append(float(np.array_equal(lp.argmax(-1), wids)))
    return {"task": "lambada", "n": len(hits), "acc": float(np.mean(hits)), "acc_stderr": stderr_of_mean(hits),
            "perplexity": _exp(-float(np.mean(lls))), "cropped": crop.count,
            "protocol": "greedy whole-word match, no stop-word filter"}


# ---------------------------------------------------------------- generation (exact match / F1)
def normalize_answer(s: str) -> str:
    """SQuAD-style: lower case, drop punctuation, articles and extra whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, ref: str) -> float:
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
    scored by exact match and token F1 against the best reference.

    The prompt gets block_size - min(max_new_tokens, block_size // 2) tokens, so that the answer is
    generated with the whole prompt in view; a longer prompt loses its earliest demonstrations, then is
    cropped from the left ("cropped" counts those items, with a warning on stderr)."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer")
    _check_seed(seed)
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise NpgptError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    before, after = _split_template(template)
    for it in items:
        check_generate_item(it, _where(it))
    rng = np.random.default_rng(seed)
    block = model.config.block_size
    room = block - min(max_new_tokens, block // 2)
    crop = _CropWarning() if shots else _CropWarning("its text is cropped from the left")
    ems, f1s = [], []
    for it in items[:limit] if limit else items:
        where = _where(it)
        demos = []
        if shots:
            others = [d for d in items if d is not it]
            if len(others) < shots:
                raise NpgptError(f"{where}: {shots} shots requested but only {len(others)} demonstrations available")
            demos = [before.format(context=generate_context(others[j])) + " " + others[j]["answers"][0] + separator
                     for j in rng.choice(len(others), shots, replace=False)]
        ids, full = _fit_prompt(tok, demos, before.format(context=generate_context(it)), room)
        if not ids:
            raise NpgptError(f"{where}: the prompt is empty")
        if full > room:
            crop(where, full, room, block)
        out = generate(model, ids, max_new_tokens, temperature=0, stop=["\n"])[0]
        # ids fit the context, so generate returned them whole: the answer is what follows them
        pred = cut_at_stop(tok.decode(out[len(ids):]), ["\n"]).strip()
        ems.append(max(float(normalize_answer(pred) == normalize_answer(a)) for a in it["answers"]))
        f1s.append(max(token_f1(pred, a) for a in it["answers"]))
    return {"task": "generate", "n": len(ems), "shots": shots, "seed": seed, "template": template,
            "cropped": crop.count, "exact_match": float(np.mean(ems)), "exact_match_stderr": stderr_of_mean(ems),
            "f1": float(np.mean(f1s)), "f1_stderr": stderr_of_mean(f1s), "stop": "\\n"}
