"""Regenerate tests/fixtures/gpt2_tokenizer.json: GPT-2 token ids computed by tiktoken.

The tiktoken Encoding is built from the files npgpt ships (weights/gpt2/vocab.json and merges.txt), not
downloaded, so the fixture pins npgpt's tokenizer to an independent BPE implementation working from the
same vocabulary. Run from the repo root with the `ref` extras installed:

    .venv/bin/python tests/make_tokenizer_fixtures.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_DIR = ROOT / "weights" / "gpt2"
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2_tokenizer.json"

EOT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenization regex (as in OpenAI's encoder.py, with the contraction alternatives grouped).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table: bytes that are already printable Latin-1
    characters stand for themselves, the other 68 bytes are given code points 256, 257, ... in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def mergeable_ranks(directory: Path = GPT2_DIR) -> dict[bytes, int]:
    """vocab.json's token strings mapped back to raw bytes, with their ids as BPE ranks. Checks that the
    rank order equals the merges.txt order (merge i creates token 256 + i), so rank-based BPE (tiktoken)
    and merge-list BPE (npgpt) are the same algorithm on these files."""
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    to_byte = {c: b for b, c in byte_alphabet().items()}
    ranks = {}
    for token, idx in vocab.items():
        if token == EOT:
            assert idx == EOT_ID, idx
            continue
        ranks[bytes(to_byte[c] for c in token)] = idx
    assert len(ranks) == EOT_ID and sorted(ranks.values()) == list(range(EOT_ID)), "ids are not 0..50255"
    assert {ranks[bytes([b])] for b in range(256)} == set(range(256)), "byte tokens are not ids 0..255"
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    assert len(merges) == EOT_ID - 256, len(merges)
    for i, line in enumerate(merges):
        left, right = line.split(" ")
        assert vocab[left] < 256 + i and vocab[right] < 256 + i, (i, line)
        assert vocab[left + right] == 256 + i, f"merge {i} ({line!r}) makes id {vocab[left + right]}"
    return ranks


def gpt2_encoding(directory: Path = GPT2_DIR):
    """A tiktoken Encoding for GPT-2 built purely from the shipped files."""
    import tiktoken
    ranks = mergeable_ranks(directory)
    enc = tiktoken.Encoding(name="gpt2_from_shipped_files", pat_str=GPT2_PATTERN,
                            mergeable_ranks=ranks, special_tokens={EOT: EOT_ID})
    # every token's id is its rank: a token decodes to exactly the bytes vocab.json spells
    for token_bytes, idx in ranks.items():
        assert enc.decode_single_token_bytes(idx) == token_bytes
    assert enc.n_vocab == EOT_ID + 1
    return enc


CORPUS = [
    "",
    " ",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    # contractions: GPT-2 splits lowercase 's 't 're 've 'm 'll 'd only
    "It's, don't, they're, we've, I'm, you'll, he'd.",
    "IT'S, DON'T, THEY'RE, WE'VE, I'M, YOU'LL, HE'D -- It'S, don'T, they'Re",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D ''s '''ll 'x 'sd",
    "the dog's bone and the dogs' bones, rock'n'roll, O'Neill's",
    "‘curly’ quotes: it’s and ‘tis, “double”",
    # code with indentation
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "class A:\n\tdef __init__(self):\n\t\tself.a = {'k': [1, 2, 3]}\n\n\n",
    "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n    return 0;\n}\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] >> 2; }  // comment\n",
    # whitespace runs
    "a  b   c    d     e",
    "trailing spaces   ",
    "   leading spaces",
    "tabs\t\tand\t\t\ttabs\t",
    "\n\n\nnewlines\n\n",
    " \n \n\t \r\n\r\n  x",
    "line one\r\nline two\r\n",
    "\u00a0non-breaking\u00a0space\u2003em\u3000ideographic",
    # numbers
    "0 1 12 123 1234 12345 123456 1234567",
    "3.14159265358979323846264338327950288419716939937510",
    "Call 555-0199 or +1 (800) 123-4567 on 2026-01-31 at 12:30:59.",
    "99999999999999999999999999999999999999999999",
    "Roman Ⅻ, superscript x² and ½, Arabic-Indic ٣٤٥",
    # punctuation
    "?!?!... ---- ==== ((())) [[]] {{}} <<>> ;;; ::: ,,, ...",
    "$$$ %%% ^^^ &&& *** @@@ ### ~~~ ``` |||  \\\\ //",
    "!@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    # emoji, including ZWJ sequences, skin tones and flags
    "😀😃😄 emoji 🎉",
    "family: 👨\u200d👩\u200d👧\u200d👦, technologist 🧑🏽\u200d💻, rainbow flag 🏳️\u200d🌈",
    "flags 🇫🇷🇯🇵🇺🇸 and keycap 1️⃣ #️⃣",
    # scripts
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "العربية نص تجريبي، مرحبا بالعالم",
    "עברית: שלום עולם",
    "Русский текст, Ελληνικά, Türkçe, Tiếng Việt",
    # accents / combining marks
    "café naïve résumé Ångström",
    "cafe\u0301 nai\u0308ve Z\u0351\u0305a\u0364\u0350l\u036cg\u0489o\u0336",
    "\u0301 lone combining mark at start",
    # control chars
    "null\x00byte bell\x07 escape\x1b[31m del\x7f",
    # special token
    "before<|endoftext|>after",
    "<|endoftext|>",
    "end of doc.<|endoftext|>\n\nNext doc starts here <|endoftext|> and <|endoftext|><|endoftext|>",
    "almost special: <|endoftext| <endoftext|> <|EndOfText|>",
    # a long paragraph
    ("Byte-level BPE starts from the 256 possible byte values, so every string can be encoded; "
     "frequent pairs are merged greedily in the order they were learned. The pre-tokenizer first cuts "
     "text into words, numbers, punctuation runs and whitespace, and merges never cross those cuts. "
     "A long run of spaces before a word keeps all but the last space as its own token, which is why "
     "Python indentation costs a few tokens per line; GPT-2 has no special tokens for indentation. ") * 4,
]


def main() -> None:
    enc = gpt2_encoding()
    rows = [{"text": s, "ids": enc.encode(s, allowed_special="all")} for s in CORPUS]
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r, ensure_ascii=True) for r in rows)  # one string per line
    FIXTURE.write_text("[\n" + body + "\n]\n", encoding="utf-8")
    print(f"wrote {len(rows)} strings, {sum(len(r['ids']) for r in rows)} tokens to {FIXTURE}")


if __name__ == "__main__":
    main()
