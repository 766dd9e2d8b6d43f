"""npgpt's GPT-2 tokenizer is exact: same ids as tiktoken's BPE on the same vocabulary, lossless
round trips, and no crash when a token prefix cuts a multi-byte character.

The fixture tests need only the JSON file (regenerate it with tests/make_tokenizer_fixtures.py); the
live test rebuilds tiktoken's Encoding from weights/gpt2 and skips when tiktoken is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from npgpt.tokenizer import EOT, Tokenizer

from conftest import require

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "gpt2_tokenizer.json"
ROWS = json.loads(FIXTURE.read_text(encoding="utf-8"))

ASCII = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-_()[]{}\"/\\@#$%&*+=<>|~`^"
WHITESPACE = [" ", " ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000"]
DIGITS = "0123456789"
APOSTROPHE = ["'", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "’"]
ACCENTED = "éèêëàâäçîïôöùûüÿñÉÀÇÑåøæœßĳłşğıžčŕΩπЖжяأבש"
CJK = "日本語中文字漢한국어テキストのは、。「」"
EMOJI = ["😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "🏳️\u200d🌈", "1️⃣", "🧑\u200d💻", "\u2764\ufe0f"]
COMBINING = [chr(c) for c in range(0x0300, 0x0370)] + ["\u0489", "\u20dd", "\u3099"]


def _token(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.30:
        return "".join(rng.choice(ASCII) for _ in range(rng.randint(1, 8)))
    if r < 0.45:
        return rng.choice(WHITESPACE)
    if r < 0.55:
        return "".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 12)))
    if r < 0.65:
        return rng.choice(APOSTROPHE)
    if r < 0.75:
        return "".join(rng.choice(ACCENTED) for _ in range(rng.randint(1, 5)))
    if r < 0.85:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(1, 5)))
    return rng.choice(EMOJI)


def mixed_strings(seed: int, n: int) -> list[str]:
    """`n` seeded random strings from words, whitespace runs, digit runs, contractions, accented
    letters, CJK and emoji, glued with no separators so every kind of boundary occurs."""
    rng = random.Random(seed)
    return ["".join(_token(rng) for _ in range(rng.randint(0, 25))) for _ in range(n)]


def _code_point(rng: random.Random) -> str:
    while True:
        c = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x3000)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def wild_strings(seed: int, n: int) -> list[str]:
    """`n` seeded strings of arbitrary (surrogate-free) code points mixed with lone combining marks,
    \\r, \\x00 and other control characters."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 20)):
            r = rng.random()
            if r < 0.4:
                parts.append(_code_point(rng))
            elif r < 0.6:
                parts.append(rng.choice(COMBINING))
            elif r < 0.75:
                parts.append(rng.choice(["\r", "\x00", "\x01", "\x1b", "\x7f", "\x85", "\u2028", "\ufeff"]))
            else:
                parts.append(_token(rng))
        out.append("".join(parts))
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


# ------------------------------------------------------------------ (a) fixture ids
def test_fixture_corpus_is_varied():
    texts = [r["text"] for r in ROWS]
    assert len(texts) >= 40 and "" in texts and " " in texts
    assert any("<|endoftext|>" in t and t != "<|endoftext|>" for t in texts)


def with_special(tok, text: str) -> list[int]:
    """The ids of `text` with every "<|endoftext|>" taken as the control token and the pieces between
    encoded as plain text: what tiktoken's encode(allowed_special="all") does, which the fixture holds."""
    ids = []
    for i, piece in enumerate(text.split(EOT)):
        ids += ([50256] if i else []) + tok.encode(piece)
    return ids


@pytest.mark.parametrize("row", ROWS, ids=[f"{i}:{r['text'][:20]!r}" for i, r in enumerate(ROWS)])
def test_fixture_ids_and_roundtrip(tok, row):
    text = row["text"]
    assert with_special(tok, text) == row["ids"]
    if EOT not in text:
        assert tok.encode(text) == row["ids"]
    assert tok.decode(row["ids"]) == text
    assert tok.decode(tok.encode(text)) == text


def test_endoftext_text_is_never_the_special_id(tok):
    # A12: user text must not turn into control tokens; only templates insert eot_id (50256)
    assert tok.eot_id == 50256
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert 50256 not in tok.encode("a<|endoftext|>b") + tok.encode_corpus("x\n<|endoftext|>\ny", chunk_chars=1)


# ------------------------------------------------------------------ (b) live comparison with tiktoken
def _tiktoken_encoding():
    require("tiktoken")
    spec = importlib.util.spec_from_file_location("make_tokenizer_fixtures", HERE / "make_tokenizer_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gpt2_encoding()


def test_ids_equal_tiktoken(tok):
    enc = _tiktoken_encoding()
    texts = [r["text"] for r in ROWS] + mixed_strings(1234, 400) + wild_strings(99, 200)
    texts += [t + EOT + t for t in texts[-50:]]
    mismatches = []
    for s in texts:
        # plain text as tiktoken with special tokens disallowed-as-text (GPT-2's reference for data),
        # and the fixture's mode (allowed_special="all") via the template-side split
        ours, ref = tok.encode(s), enc.encode(s, disallowed_special=())
        if ours != ref or ref != enc.encode_ordinary(s):
            mismatches.append((s, ours, ref))
        ours, ref = with_special(tok, s), enc.encode(s, allowed_special="all")
        if ours != ref:
            mismatches.append((s, ours, ref))
    assert not mismatches, "\n".join(f"{s!r}:\n  npgpt    {a}\n  tiktoken {b}" for s, a, b in mismatches[:10])
    # the fixture file is what tiktoken says today
    assert [enc.encode(r["text"], allowed_special="all") for r in ROWS] == [r["ids"] for r in ROWS]


# ------------------------------------------------------------------ (c) lossless round trip
def test_roundtrip_random_strings(tok):
    bad = [s for s in mixed_strings(7, 300) + wild_strings(8, 300) if tok.decode(tok.encode(s)) != s]
    assert not bad, [repr(s) for s in bad[:10]]


# ------------------------------------------------------------------ (d) prefixes that cut characters
def test_decoding_every_prefix_never_raises(tok):
    s = "Emoji 👨\u200d👩\u200d👧\u200d👦🇯🇵😀 and CJK 日本語のテキスト, 한국어, cafe\u0301 — done."
    ids = tok.encode(s)
    cut = 0
    for k in range(len(ids) + 1):
        d = tok.decode(ids[:k])
        assert isinstance(d, str)
        # a byte prefix decodes to a prefix of the text, plus at most one U+FFFD for a cut character
        whole = d.rstrip("\ufffd")
        assert s.startswith(whole) and len(d) - len(whole) <= 1, (k, d)
        cut += whole != d
    assert cut > 0  # some prefix really did end inside a multi-byte character
    assert tok.decode(ids) == s


# ------------------------------------------------------------------ (e) parallel corpus encoding
def test_encode_corpus_equals_encode_on_mixed_text(tok):
    rng = random.Random(5)
    lines = []
    for i, s in enumerate(mixed_strings(11, 150) + [r["text"] for r in ROWS]):
        indent = rng.choice(["", "", " ", "    ", "\t", "\n"])
        lines.append(indent + s + ("<|endoftext|>" if i % 17 == 0 else ""))
    text = "\n".join(lines)
    assert len(text) > 10_000
    want = tok.encode(text)
    for chunk in (64, 1000, 1 << 20):
        assert tok.encode_corpus(text, chunk_chars=chunk) == want, chunk


@pytest.mark.parametrize("text", ["a\n\nb", "a\n\n\n\nb", "x = 1\n\ny = 2\n"])
def test_encode_corpus_cut_after_blank_line(tok, text):
    # a chunk cut after the second "\n" of a blank line would glue "\n\n" into one token (628),
    # where encode() gives "\n", "\n" (198, 198) because the line after it starts a new word
    assert tok.encode_corpus(text, chunk_chars=1) == tok.encode(text)
