"""Tokenizers on the `tokenizers` library: character-level, byte-level BPE trained on your corpus, and
GPT-2's own BPE (vocab.json + merges.txt). Every kind is saved as one `tokenizer.json` that travels
inside the checkpoint dir, next to `config.json` which records the kind.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from .assets import weights_dir
from .errors import NpgptError
from .files import atomic_write_bytes
from .malloc import release_free_memory

EOT = "<|endoftext|>"
KINDS = ("char", "bpe", "gpt2")


class Tokenizer:
    """text <-> token ids. `kind` is "char", "bpe" or "gpt2"; `eot_id` is the id of <|endoftext|> or None."""

    def __init__(self, tk: tokenizers.Tokenizer, kind: str):
        if kind not in KINDS:
            raise NpgptError(f"unknown tokenizer kind {kind!r}")
        self.tk = _plain_text_only(tk)
        self.kind = kind
        self.eot_id = self.tk.token_to_id(EOT)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def same_vocab(self, other: "Tokenizer | None") -> bool:
        """Whether `other` maps every token to the same id (data prepared with it fits a model with this)."""
        return other is not None and self.tk.get_vocab() == other.tk.get_vocab()

    def encode(self, text: str) -> list[int]:
        """str -> list of ids, always as plain text: a special token's string in the text ("<|endoftext|>",
        "<|end|>", ...) becomes ordinary tokens, never the control id (as tiktoken's encode_ordinary), so
        data can never forge a template. Control ids are inserted by the templates (chat.encode_chat,
        finetune.encode_example). Characters a char-level vocabulary lacks, and text that is not valid
        Unicode (lone surrogates, e.g. from undecodable bytes in argv), raise NpgptError."""
        check_text(text)
        if self.kind == "char":
            missing = sorted(set(text) - self.tk.get_vocab().keys())
            if missing:
                shown = ", ".join(repr(c) for c in missing[:5])
                raise NpgptError(f"text has characters the model's vocabulary lacks: {shown}")
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_corpus(self, text: str, chunk_chars: int = 1 << 20) -> list[int]:
        """Encode a large text in parallel chunks. Chunks are cut after a newline that has a non-space
        character on both sides: the GPT-2 pre-tokenizer makes that newline a piece of its own, so the ids
        equal encode(text). (A newline after another one would not do: "\n\n" is a single token.)
        Like encode, special-token strings in the corpus are plain text."""
        check_text(text)
        pieces, start = [], 0
        cut = re.compile(r"(?<=\S)\n(?=\S)")
        while start < len(text):
            end = min(start + chunk_chars, len(text))
            if end < len(text):
                m = cut.search(text, end)
                end = m.end() if m else len(text)
            pieces.append(text[start:end])
            start = end
        if self.kind == "char":
            missing = sorted(set(text) - self.tk.get_vocab().keys())
            if missing:
                raise NpgptError(f"text has characters the vocabulary lacks: {', '.join(map(repr, missing[:5]))}")
        out: list[int] = []
        for enc in self.tk.encode_batch(pieces, add_special_tokens=False):
            out.extend(enc.ids)
        return out

    def encode_documents(self, docs) -> list[int]:
        """Encode documents in parallel, each followed by the <|endoftext|> control id (plain text
        otherwise, as encode)."""
        if self.eot_id is None:
            raise NpgptError("this tokenizer has no <|endoftext|> to separate documents")
        for d in docs:
            check_text(d)
        out: list[int] = []
        for enc in self.tk.encode_batch(list(docs), add_special_tokens=False):
            out.extend(enc.ids)
            out.append(self.eot_id)
        return out

    def decode(self, ids) -> str:
        """ids -> str. Byte-level tokens that split a multi-byte character decode to U+FFFD, never crash."""
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_bytes(path, self.tk.to_str().encode())
        return path

    @classmethod
    def load(cls, directory: str | Path, kind: str) -> "Tokenizer":
        path = Path(directory) / "tokenizer.json"
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on any parse problem
            raise NpgptError(f"cannot read tokenizer {path}: {e}") from None
        release_free_memory()
        return cls(tk, kind)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def train_char(cls, texts) -> "Tokenizer":
        """One token per distinct character of `texts`, ids in sorted character order (as nanoGPT)."""
        chars = sorted(set().union(*(set(t) for t in texts)))
        if not chars:
            raise NpgptError("cannot build a character vocabulary from empty text")
        tk = tokenizers.Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="\ufffe"))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Fuse()
        return cls(tk, "char")

    @classmethod
    def train_bpe(cls, texts, vocab_size: int) -> "Tokenizer":
        """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) with `vocab_size` tokens including
        the 256 byte tokens and <|endoftext|>."""
        if vocab_size < 257:
            raise NpgptError(f"a byte-level BPE needs vocab_size >= 257, got {vocab_size}")
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, "bpe")

    @classmethod
    def gpt2(cls, directory: str | Path | None = None) -> "Tokenizer":
        """GPT-2's tokenizer from vocab.json + merges.txt (default: the copy shipped in weights/gpt2)."""
        d = Path(directory) if directory else weights_dir() / "gpt2"
        vocab, merges = d / "vocab.json", d / "merges.txt"
        for f in (vocab, merges):
            if not f.is_file():
                raise NpgptError(f"GPT-2 tokenizer file missing: {f}")
        try:
            tk = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise NpgptError(f"cannot read GPT-2 tokenizer files in {d}: {e}") from None
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        if EOT in json.loads(vocab.read_text()):
            tk.add_special_tokens([EOT])
        return cls(tk, "gpt2")


def check_text(text) -> None:
    """Refuse what is not a valid Unicode str: the tokenizers library raises a TypeError on other types,
    and a lone surrogate (how Python hands over undecodable bytes of argv or a surrogateescape stream)
    has no UTF-8 form."""
    if not isinstance(text, str):
        raise NpgptError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"undecodable byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise NpgptError(f"text is not valid UTF-8: {what} at character {e.start}") from None


def _plain_text_only(tk: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """`tk` set to encode every added token's string as plain text.

    The library matches added tokens in the input before the model sees it. encode_special_tokens=True
    turns that off for *special* added tokens (it is a runtime flag, not saved in tokenizer.json); a
    non-special added token (possible in a tokenizer.json from elsewhere) would still match, so any such
    token is made special first. Decoding is unaffected: decode keeps special tokens."""
    if any(not t.special for t in tk.get_added_tokens_decoder().values()):
        d = json.loads(tk.to_str())
        for t in d["added_tokens"]:
            t["special"] = True
        tk = tokenizers.Tokenizer.from_str(json.dumps(d))
    tk.encode_special_tokens = True
    return tk


def load_tokenizer_dir(path: str | Path) -> Tokenizer:
    """The tokenizer.json of any npgpt dir, with its kind: from meta.json (a data dir, or `npgpt tokenizer
    train` output) or config.json (a checkpoint dir); a bare tokenizer.json is taken for a byte-level BPE."""
    d = Path(path)
    kind = "bpe"
    for name, read in (("meta.json", lambda j: j.get("tokenizer")),
                       ("config.json", lambda j: (j.get("tokenizer") or {}).get("kind"))):
        if (d / name).is_file():
            try:
                found = read(json.loads((d / name).read_text()))
            except (ValueError, UnicodeDecodeError, AttributeError):
                raise NpgptError(f"{d / name} is not valid JSON of an npgpt dir") from None
            kind = found if isinstance(found, str) else kind
            break
    return Tokenizer.load(d, kind)


def make_tokenizer(spec: str, texts) -> Tokenizer:
    """Build a tokenizer from a spec: "char", "gpt2", "bpe:N" (train a byte-level BPE of N tokens), or a
    dir holding a tokenizer.json (a data, tokenizer or checkpoint dir: reuse its vocabulary; the names
    above win over a dir of the same name, write ./gpt2 for that)."""
    spec = str(spec)
    if spec == "char":
        return Tokenizer.train_char(texts)
    if spec == "gpt2":
        return Tokenizer.gpt2()
    m = re.fullmatch(r"bpe:(\d+)", spec)
    if m:
        return Tokenizer.train_bpe(texts, int(m.group(1)))
    if Path(spec).is_dir():
        return load_tokenizer_dir(spec)
    raise NpgptError(f"unknown tokenizer {spec!r}; use char, gpt2, bpe:N or a dir holding a tokenizer.json")
