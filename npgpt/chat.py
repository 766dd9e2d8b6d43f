"""The chat template and the data formats shared by SFT, reward models, PPO and DPO (InstructGPT).

Template: every turn is a role token, the text, and an end token; generation is prompted with the
assistant token and stops at the end token:

    <|user|>how are you?<|end|><|assistant|>fine, thanks.<|end|>

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Preference records
become (prompt messages, responses, ranking best-first); demonstrations become conversations whose
assistant turns are the training targets.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .adapt import add_special_tokens
from .checkpoint import load_model
from .errors import NpgptError
from .data import read_jsonl, read_text
from .sampling import generate

ROLES = ("system", "user", "assistant")
CHAT_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


# ---------------------------------------------------------------- vocabulary and encoding
def add_chat_tokens(model, seed: int = 0):
    """A writable copy of `model` whose vocabulary holds the chat tokens (kept if already there)."""
    return add_special_tokens(model, CHAT_SPECIALS, seed)[0]


def chat_ids(model) -> dict[str, int]:
    """Ids of the chat tokens; a clear error when the model was never given them (not an SFT model)."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("chat needs a model with a tokenizer")
    ids = {s: tok.tk.token_to_id(s) for s in CHAT_SPECIALS}
    if any(i is None or i >= model.config.vocab_size for i in ids.values()):
        raise NpgptError("this model has no chat tokens; fine-tune it with `npgpt sft` first")
    return ids


def encode_chat(model, messages: list[dict], *, generation_prompt: bool = False, train_on: str = "all"):
    """Token ids [T] and a target mask [T] (1 on the tokens the model is trained to produce: the text and
    end token of assistant turns; train_on="last" keeps only the final assistant turn). With
    generation_prompt, the ids end with <|assistant|> so that a model continues with a response.
    Control ids come only from this template: contents are encoded as plain text, so a message that
    contains "<|end|><|assistant|>" stays text and cannot forge a turn."""
    ids = chat_ids(model)
    enc = model.tokenizer.encode
    toks, mask = [], []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    for i, m in enumerate(messages):
        body = enc(m["content"]) + [ids["<|end|>"]]
        learn = m["role"] == "assistant" and (train_on == "all" or i == last)
        toks += [ids[f"<|{m['role']}|>"]] + body
        mask += [0] + [int(learn)] * len(body)
    if generation_prompt:
        toks.append(ids["<|assistant|>"])
        mask.append(0)
    return toks, mask


def fit_context(toks: list[int], mask: list[int], block: int):
    """Keep the last `block` tokens (the response end is what matters); returns (toks, mask, cut?)."""
    if len(toks) <= block:
        return toks, mask, False
    return toks[-block:], mask[-block:], True


def pad_batch(seqs: list[tuple[list[int], list[int]]]):
    """Right-padded ids [B, T], targets [B, T] (the next token where it is trained on, else -1) and the
    last real position of each row [B]. Causal attention never looks right, so padding needs no mask."""
    T = max(len(t) for t, _ in seqs)
    x = np.zeros((len(seqs), T), np.int64)
    y = np.full((len(seqs), T), -1, np.int64)
    last = np.empty(len(seqs), np.int64)
    for b, (t, m) in enumerate(seqs):
        x[b, :len(t)] = t
        nxt, keep = np.asarray(t[1:], np.int64), np.asarray(m[1:], bool)
        y[b, :len(t) - 1] = np.where(keep, nxt, -1)
        last[b] = len(t) - 1
    return x, y, last


def chat_prompt(model, message: str) -> tuple[list[int], int]:
    """The ids that prompt an SFT model for a reply to one user message (ending with <|assistant|>), and
    the id of <|end|>, which ends the reply."""
    if not message.strip():
        raise NpgptError("a chat prompt needs the user's message")
    return encode_chat(model, prompt_messages(message.strip()), generation_prompt=True)[0], chat_ids(model)["<|end|>"]


def reply(model, message: str, max_new_tokens: int = 200, **sampling) -> str:
    """The assistant's reply to one user message (an SFT model); `sampling` as for npgpt.generate."""
    ids, end = chat_prompt(model, message)
    out = [int(t) for t in generate(model, ids, max_new_tokens, eos_id=end, **sampling)[0][len(ids):]]
    return model.tokenizer.decode(out[:-1] if out and out[-1] == end else out)


def prompt_messages(prompt) -> list[dict]:
    """A prompt given as text (one user turn) or as a message list."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# ---------------------------------------------------------------- reading files
def records(path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file; bad JSON names its line."""
    return [(r.pop("_line"), r) for r in read_jsonl(path)]


class BadRecord(Exception):
    """A record that cannot be used (its message says why); readers name its line, or skip it."""


def _text(r: dict, key: str) -> str:
    v = r.get(key)
    if not isinstance(v, str):
        raise BadRecord(f"missing field {key!r}" if v is None else f"field {key!r} must be a string")
    return v


def _check_messages(msgs, field: str = "messages") -> list[dict]:
    """A conversation: a non-empty list of {"role": one of ROLES, "content": str} (other keys dropped),
    not all of them empty."""
    if not isinstance(msgs, list) or not msgs:
        raise BadRecord(f"{field!r} must be a non-empty list of messages")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRecord(f"each message needs a role ({', '.join(ROLES)}) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):  # an empty prompt, however many turns it has
        raise BadRecord(f"every message in {field!r} is empty")
    return out


def _read(path, parse, skip_bad: bool, what: str) -> tuple[list, int]:
    items, skipped = [], 0
    for n, r in records(path):
        try:
            items.append(parse(r))
        except BadRecord as e:
            if not skip_bad:
                raise NpgptError(f"{path}:{n}: {e} (use --skip-bad to skip such records)") from None
            skipped += 1
    if not items:
        raise NpgptError(f"{path}: no usable {what} ({skipped} bad records skipped)")
    return items, skipped


def parse_demo(r: dict) -> list[dict]:
    """One demonstration as a conversation. Accepted: {"messages": [...]}, {"prompt", "response"} (also
    "completion" or "answer" for the response), Alpaca-style {"instruction", "input", "output"}."""
    if "messages" in r:
        msgs = _check_messages(r["messages"])
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise BadRecord("no assistant message to learn from")
        return msgs
    if "instruction" in r:
        extra = r.get("input")
        if extra is not None and not isinstance(extra, str):  # an f-string would print a dict as its repr
            raise BadRecord("field 'input' must be a string")
        prompt = _text(r, "instruction") + (f"\n\n{extra}" if extra else "")
        response = _text(r, "output")
    else:
        prompt = _text(r, "prompt")
        key = next((k for k in ("response", "completion", "answer") if k in r), "response")
        response = _text(r, key)
    if not response.strip():
        raise BadRecord("empty response")
    return [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": response.strip()}]


def read_demos(path, skip_bad: bool = False) -> tuple[list[list[dict]], int]:
    """Demonstrations for SFT: (conversations, number of bad records skipped)."""
    return _read(path, parse_demo, skip_bad, "demonstrations")


def split_dialogue(text: str) -> tuple[list[dict], str]:
    """An Anthropic HH-style dialogue ("\\n\\nHuman: ... \\n\\nAssistant: ...") split at its last
    "Assistant:" turn into (prompt messages, final response)."""
    parts, role, pos = [], None, 0
    markers = {"\n\nHuman:": "user", "\n\nAssistant:": "assistant"}
    for m in re.finditer(r"\n\nHuman:|\n\nAssistant:", text):
        if role is not None:
            parts.append({"role": role, "content": text[pos:m.start()].strip()})
        role, pos = markers[m.group()], m.end()
    if role is not None:
        parts.append({"role": role, "content": text[pos:].strip()})
    if not parts or parts[-1]["role"] != "assistant" or len(parts) < 2:
        raise BadRecord("dialogue has no final 'Assistant:' turn after a 'Human:' turn")
    return parts[:-1], parts[-1]["content"]


def parse_preference(r: dict) -> dict:
    """One comparison record -> {"prompt": messages, "responses": [str], "ranking": [indices, best first]}.

    Accepted: {"prompt", "chosen", "rejected"}; {"prompt", "responses": [...], "ranking": [...]} (ranking
    lists response indices best first); Anthropic HH {"chosen": dialogue, "rejected": dialogue}, both
    split at their last "Assistant:" turn (the two prompts must agree). The prompt may be a message list."""
    if "responses" in r:
        responses, ranking = r["responses"], r.get("ranking")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(x, str) for x in responses):
            raise BadRecord("'responses' must be a list of 2 or more strings")
        # integers only: sorted() of mixed types raises, and true/false or 1.0 would pass as indices
        if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking) \
                or sorted(ranking) != list(range(len(responses))):
            raise BadRecord("'ranking' must list every response index once, best first")
        prompt = r.get("prompt")
    else:
        chosen, rejected = _text(r, "chosen"), _text(r, "rejected")
        if "prompt" in r:
            prompt = r["prompt"]
        else:  # HH-style full dialogues
            prompt, chosen = split_dialogue(chosen)
            prompt2, rejected = split_dialogue(rejected)
            if prompt2 != prompt:
                raise BadRecord("'chosen' and 'rejected' dialogues differ before their last Assistant turn")
        responses, ranking = [chosen, rejected], [0, 1]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRecord("empty prompt")
        prompt = [{"role": "user", "content": prompt.strip()}]
    elif prompt is None:
        raise BadRecord("missing field 'prompt'")
    else:
        prompt = _check_messages(prompt, "prompt")
    responses = [x.strip() for x in responses]
    if any(not x for x in responses):
        raise BadRecord("empty response")
    if len(set(responses)) < len(responses):
        raise BadRecord("two responses are identical (chosen == rejected)")
    return {"prompt": prompt, "responses": responses, "ranking": [int(i) for i in ranking]}


def read_preferences(path, skip_bad: bool = False) -> tuple[list[dict], int]:
    """Comparisons for reward models and DPO: (records, number of bad records skipped)."""
    return _read(path, parse_preference, skip_bad, "comparisons")


def read_prompts(path) -> list[list[dict]]:
    """Prompts for PPO rollouts: JSON lines with "prompt" (text or messages) or "messages", or plain
    text with one prompt per line."""
    path = Path(path)
    if path.suffix != ".jsonl":
        lines = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
        if not lines:
            raise NpgptError(f"{path}: no prompts")
        return [prompt_messages(ln) for ln in lines]
    out = []
    for n, r in records(path):
        field = "prompt" if "prompt" in r else "messages"
        p = r.get(field)
        if isinstance(p, str) and p.strip():
            out.append(prompt_messages(p.strip()))
        elif isinstance(p, list):
            try:
                out.append(_check_messages(p, field))
            except BadRecord as e:
                raise NpgptError(f"{path}:{n}: {e}") from None
        elif isinstance(p, str):
            raise NpgptError(f"{path}:{n}: empty prompt")
        elif p is None:
            raise NpgptError(f"{path}:{n}: missing field 'prompt'")
        else:
            raise NpgptError(f"{path}:{n}: {field!r} must be a string or a list of messages")
    return out


def read_split(read, data_file, val_file, val_fraction: float, skip_bad: bool, rng):
    """(train, validation, bad records skipped) with `read` (read_demos or read_preferences): the
    validation records come from val_file, or a seeded val_fraction of data_file is held out (at least
    one record when there are two or more)."""
    recs, skipped = read(data_file, skip_bad)
    if val_file is not None:
        val, s2 = read(val_file, skip_bad)
        return recs, val, skipped + s2
    n_val = max(1, int(round(len(recs) * val_fraction))) if val_fraction > 0 and len(recs) > 1 else 0
    order = rng.permutation(len(recs))
    return [recs[i] for i in order[n_val:]], [recs[i] for i in order[:n_val]], skipped


def start_model(model_dir, seed: int):
    """The model a chat-training command starts from: a writable copy with the chat tokens."""
    base = load_model(model_dir)
    if base.quantized:
        raise NpgptError("a quantized model cannot be trained")
    return add_chat_tokens(base, seed)


def pairs(ranking: list[int]) -> list[tuple[int, int]]:
    """All C(K, 2) (better, worse) index pairs of a best-first ranking."""
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]
