"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seed, streaming.

With the cache each new token costs one position through the model, not the whole prefix. Once the
sequence fills the context, the window slides: the cache is rebuilt from the last block_size tokens, so
cached and uncached generation see exactly the same context and give the same tokens.
"""
from __future__ import annotations

import math
import sys

import numpy as np

from .errors import NpgptError
from .model import GPT, KVCache
from .tokenizer import check_text


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   repetition_penalty: float = 1.0, stop: list[str] | None = None, seed: int | None = None):
    """Refuse sampling settings that cannot mean anything, with one line each. NaN passes every `<`
    check (and then made every draw token 0), so finiteness is tested explicitly."""
    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise NpgptError(f"{name} must be a finite number, got {v!r}")

    real("temperature", temperature)
    if temperature < 0:
        raise NpgptError(f"temperature must be >= 0, got {temperature}")
    real("repetition_penalty", repetition_penalty)
    if repetition_penalty <= 0:
        raise NpgptError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if top_p is not None:
        real("top_p", top_p)
        if not 0 < top_p <= 1:
            raise NpgptError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise NpgptError(f"top_k must be an integer >= 1, got {top_k!r}")
    for s in stop or []:
        if not isinstance(s, str) or not s:  # "" is in every text: it would stop after one token
            raise NpgptError(f"stop strings must be non-empty strings, got {s!r}")
        check_text(s)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise NpgptError(f"seed must be an integer >= 0, got {seed!r}")


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, seen: np.ndarray | None = None,
                repetition_penalty: float = 1.0) -> np.ndarray:
    """logits [B, V] -> next token ids [B]. temperature 0 is greedy (argmax).

    top_k keeps exactly the k most likely tokens (a tie at the k-th value goes to the lower ids);
    top_p keeps the smallest set of most likely tokens whose mass reaches top_p (1 keeps all).
    repetition_penalty > 1 (as in CTRL and transformers) divides positive and multiplies negative logits
    of the tokens marked in seen [B, V] (those already in the row's sequence). Logits may hold -inf
    (masked tokens); NaN or +inf logits raise NpgptError."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    z = np.array(logits, np.float64)  # a copy: edited in place below
    if z.ndim != 2 or z.shape[1] == 0:
        raise NpgptError(f"logits must be [B, V] with V >= 1, got shape {z.shape}")
    if repetition_penalty != 1.0 and seen is not None:
        # an extreme penalty must not turn a finite logit into +-inf (NaN later): clip at the largest
        # float; a masked (-inf) logit stays masked
        big = np.finfo(np.float64).max
        with np.errstate(over="ignore"):
            pen = np.clip(np.where(z > 0, z / repetition_penalty, z * repetition_penalty), -big, big)
        z = np.where(seen & np.isfinite(z), pen, z)
    top = z.max(axis=-1, keepdims=True)
    if np.isnan(z).any() or not np.isfinite(top).all():
        raise NpgptError("logits are NaN or infinite (a row needs a finite logit; are the model's weights finite?)")
    if temperature == 0:
        return z.argmax(axis=-1)
    # subtract the max before dividing: a tiny temperature then gives -inf, never inf - inf = NaN
    with np.errstate(over="ignore"):  # overflow gives -inf: probability 0, as intended
        z = (z - top) / temperature
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        z = np.where(_top_k_mask(z, int(top_k)), z, -np.inf)
    probs = np.exp(z)  # the max is exp(0) = 1, so every row has mass
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")  # ties: lower ids first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        csum = np.cumsum(sorted_p, axis=-1)
        drop_sorted = csum - sorted_p >= top_p * csum[:, -1:]
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
    # inverse CDF on the unnormalised mass: u * total < total, so the index is < V and the token drawn
    # always has probability > 0 (even for u == 0, or a sum that rounds below u)
    csum = np.cumsum(probs, axis=-1)
    u = rng.random((probs.shape[0], 1)) * csum[:, -1:]
    return (csum <= u).sum(axis=-1)


def _top_k_mask(z: np.ndarray, k: int) -> np.ndarray:
    """[B, V] bool: exactly the k largest of each row of z [B, V]; ties at the k-th value are broken by
    the lower index (np.partition alone would keep every tied value, so more than k)."""
    kth = np.partition(z, -k, axis=-1)[:, -k][:, None]
    keep = z > kth
    ties = z == kth
    room = k - keep.sum(axis=-1, keepdims=True)  # >= 1: the k-th value itself is tied
    return keep | (ties & (np.cumsum(ties, axis=-1) <= room))


def _rows(model: GPT, prompt, num_samples: int) -> list[np.ndarray]:
    """Any accepted prompt form -> a list of 1-D int64 id arrays."""
    def enc(p):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise NpgptError("this model has no tokenizer; pass token ids")
            return np.asarray(model.tokenizer.encode(p), np.int64)
        return np.asarray(p, np.int64).reshape(-1)

    if isinstance(prompt, np.ndarray) and prompt.ndim == 2:
        rows = [enc(r) for r in prompt]
    elif isinstance(prompt, str) or isinstance(prompt, np.ndarray) or \
            all(isinstance(t, (int, np.integer)) for t in prompt):
        rows = [enc(prompt)] * num_samples  # one prompt
    else:
        rows = [enc(p) for p in prompt]  # a batch
    if not rows or any(len(r) == 0 for r in rows):
        raise NpgptError("the prompt is empty; give at least one token")
    return rows


def generate(model: GPT, prompt, max_new_tokens: int = 100, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, repetition_penalty: float = 1.0, stop: list[str] | None = None,
             eos_id: int | None = None, seed: int | None = None, num_samples: int = 1, use_cache: bool = True,
             on_token=None) -> list[np.ndarray]:
    """Continue prompts with a KV cache; returns one 1-D id array per sequence (prompt + continuation).

    prompt: a str or a list of ids (one prompt, repeated num_samples times), or a list of str / id lists /
    a 2-D id array (a batch; lengths may differ: rows are left-padded and the padding is masked).
    A prompt longer than the context is cropped from the left with a warning. When a row's window is
    full, its older half is dropped: its newest block_size // 2 tokens are encoded afresh and decoding
    continues from the cache (llama.cpp's context shift; positions are learned, so a cache cannot slide
    by one token, and re-encoding a full window for every token is 10-20x slower). Every token thus
    sees between block_size // 2 and block_size tokens; use_cache=False follows the same windows.
    A row stops early when it emits eos_id or its decoded continuation contains one of the `stop` strings (the returned ids then
    end with the token that completed it; decode and cut at the stop string for text). `on_token(ids [B])`
    is called with every new column of tokens, for streaming. Settings are checked (check_sampling) and
    prompts encoded before any token is made; a str prompt is plain text (see Tokenizer.encode).
    """
    check_sampling(temperature, top_k, top_p, repetition_penalty, stop, seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise NpgptError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if stop and model.tokenizer is None:
        raise NpgptError("stop strings need a model with a tokenizer")
    rows = _rows(model, prompt, num_samples)
    block = model.config.block_size
    if max(len(r) for r in rows) > block:
        print(f"warning: prompt of {max(len(r) for r in rows)} tokens is longer than the context ({block}); "
              f"keeping the last {block}", file=sys.stderr)
        rows = [r[-block:] for r in rows]
    B, L = len(rows), max(len(r) for r in rows)
    pad = np.array([L - len(r) for r in rows], np.int64)
    out = np.zeros((B, L + max_new_tokens), np.int64)
    for b, r in enumerate(rows):
        out[b, pad[b]:L] = r
    seen = None
    if repetition_penalty != 1.0:
        seen = np.zeros((B, model.config.vocab_size), bool)
        for b, r in enumerate(rows):
            seen[b, r] = True
    rng = np.random.default_rng(seed)
    end = np.full(B, L + max_new_tokens)
    done = np.zeros(B, bool)
    n = L
    keep = max(1, block // 2)  # what a full window keeps
    start = pad.copy()         # each row's window: out[b, start[b]:n]
    cache = KVCache(model.config, B, length=L + max_new_tokens) if use_cache else None
    logits = _prefill(model, out[:, :n], pad, cache)
    for i in range(max_new_tokens):
        nxt = sample_next(logits, rng, temperature, top_k, top_p, seen, repetition_penalty)
        out[:, n] = nxt
        n += 1
        if seen is not None:
            seen[np.arange(B), nxt] = True
        if on_token is not None:
            on_token(nxt)
        for b in np.flatnonzero(~done):
            if (eos_id is not None and nxt[b] == eos_id) or stop_reached(model.tokenizer, out[b, L:n], stop):
                done[b], end[b] = True, n
        if done.all() or i == max_new_tokens - 1:
            break
        full = n - start > block
        if cache is None or full.any():
            start[full] = n - keep  # rows shift on their own count, so a batch equals its rows run alone
            w0 = start.min()
            logits = _prefill(model, out[:, w0:n], start - w0, cache)
        else:
            logits = model.forward(out[:, n - 1:n], kv=cache)[:, -1]
    return [out[b, pad[b]:min(end[b], n)] for b in range(B)]


def stop_reached(tokenizer, new, stop: list[str] | None) -> bool:
    """Whether the continuation `new` (the ids generated so far) holds a stop string. Called after every
    token, so a new one must end in the last token; a string of m characters spans at most 4m byte-level
    tokens, so decoding that tail suffices (decoding all would be quadratic)."""
    if not stop:
        return False
    text = tokenizer.decode(new[-(4 * max(map(len, stop)) + 1):])
    return any(s in text for s in stop)


def _prefill(model: GPT, idx, pad, cache: KVCache | None):
    """Logits [B, V] of the last column of idx, (re)filling the cache from scratch."""
    pad = pad if pad.any() else None
    if cache is not None:
        cache.length, cache.pad = 0, pad
        return model.forward(idx, kv=cache, last_only=True)[:, -1]
    return model.forward(idx, last_only=True, pad=pad)[:, -1]


def start_ids(model: GPT) -> tuple[list[int], str]:
    """The prompt of an unconditional sample, and the text it stands for: <|endoftext|> where the
    vocabulary has it (GPT-2, trained BPEs; shown as nothing), else a newline (char models)."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("this model has no tokenizer; pass token ids")
    return ([tok.eot_id], "") if tok.eot_id is not None else (tok.encode("\n"), "\n")


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """text up to (not including) the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop or []) if i >= 0), default=len(text))
    return text[:cut]


class TextStream:
    """An on_token callback for `generate` that writes the decoded continuation of row 0 to `out`
    (stdout) as it is produced. It holds back an incomplete multi-byte character and any tail that could
    still become a stop string, and writes nothing from the first stop string on. Call close() at the
    end to write what was held back."""

    def __init__(self, model: GPT, out=None, stop: list[str] | None = None):
        self.tok, self.out = model.tokenizer, out or sys.stdout
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def __call__(self, nxt):
        if self.stopped:
            return
        self.ids.append(int(nxt[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        safe = cut_at_stop(text, self.stop)
        if len(safe) < len(text):
            self.stopped = True
        else:  # hold back a tail that is a prefix of a stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = text[:len(text) - hold]
        self._write(safe)

    def close(self):
        if not self.stopped:
            self._write(cut_at_stop(self.tok.decode(self.ids), self.stop))

    def _write(self, text):
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)
