"""Corpora -> token files, and seeded random-window batches from them.

A data dir holds train.bin and val.bin (raw little-endian uint16, or uint32 when the vocabulary has more
than 65,536 tokens), meta.json and tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import NpgptError
from .files import atomic_open, atomic_write_json, claim_out, current, file_set
from .tokenizer import Tokenizer, make_tokenizer


def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped) with newlines normalised (\r\n and bare \r
    become \n). Missing, unreadable or undecodable files are an NpgptError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"input file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NpgptError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise NpgptError(f"{path}:{line}: not valid UTF-8 (undecodable byte at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path, required: tuple[str, ...] = ()) -> list[dict]:
    """JSON-lines records, each with its line number as "_line". Every problem a file can have (not
    UTF-8, not JSON, too deeply nested, not an object, a missing field, a lone surrogate in a string)
    is an NpgptError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"data file not found: {path}")
    items = []
    try:
        with open(path, "rb") as f:  # bytes: a bad UTF-8 sequence is reported with its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise NpgptError(f"{path}:{n}: not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except RecursionError:
                    raise NpgptError(f"{path}:{n}: JSON nested too deeply") from None
                except ValueError:
                    raise NpgptError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(rec, dict):
                    raise NpgptError(f"{path}:{n}: expected a JSON object")
                if not _all_text_encodable(rec):
                    raise NpgptError(f"{path}:{n}: a string holds a lone surrogate (\\ud800-\\udfff), not text")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise NpgptError(f"{path}:{n}: missing field {missing[0]!r}")
                rec["_line"] = n
                items.append(rec)
    except OSError as e:
        raise NpgptError(f"cannot read {path}: {e.strerror or e}") from None
    if not items:
        raise NpgptError(f"{path}: no records")
    return items


def _all_text_encodable(obj) -> bool:
    """False when some string (key or value) anywhere in a parsed JSON value has no UTF-8 form, i.e. a
    "\\ud800"-style escape without its pair. Iterative: the nesting may be as deep as the parser allows."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def read_documents(path: str | Path) -> list[str]:
    """The "text" field of every record of a JSON-lines file: one document per line."""
    docs = []
    for rec in read_jsonl(path, required=("text",)):
        if not isinstance(rec["text"], str):
            raise NpgptError(f"{path}:{rec['_line']}: \"text\" must be a string")
        docs.append(rec["text"])
    return docs


def prepare(inputs, out: str | Path, tokenizer: str | Tokenizer = "char", val_fraction: float = 0.1,
            force: bool = False) -> dict:
    """Tokenize the input files (joined in order) into `out`/train.bin and val.bin: the first
    (1 - val_fraction) of the tokens train, the rest validate. Returns the meta dict.

    A .jsonl input is a set of documents (one {"text": ...} per line), each followed by <|endoftext|>
    so that the model learns where one ends (GPT-2's convention); other inputs are plain text."""
    if not inputs:
        raise NpgptError("no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise NpgptError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    parts = [read_documents(p) if Path(p).suffix == ".jsonl" else read_text(p) for p in inputs]
    for p, t in zip(inputs, parts):
        if not t:
            raise NpgptError(f"input file is empty: {p}")
    texts = [t for part in parts for t in (part if isinstance(part, list) else [part])]
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else make_tokenizer(tokenizer, texts)
    if tok.eot_id is None and any(isinstance(part, list) for part in parts):
        raise NpgptError("documents (.jsonl inputs) are separated by <|endoftext|>, which this tokenizer lacks; "
                         "use a BPE tokenizer (bpe:N or gpt2)")
    chunks, plain = [], []  # consecutive plain files are one text, as if concatenated
    for part in parts + [None]:
        if isinstance(part, str):
            plain.append(part)
            continue
        if plain:
            chunks.append(np.array(tok.encode_corpus("".join(plain)), dtype=np.int64))
            plain = []
        if part is not None:
            chunks.append(np.array(tok.encode_documents(part), dtype=np.int64))
    ids = np.concatenate(chunks)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    n_val = int(len(ids) * val_fraction)
    n_train = len(ids) - n_val
    if n_train < 2 or (val_fraction > 0 and n_val < 2):
        raise NpgptError(f"corpus too small: {len(ids)} tokens")
    meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": int(n_train), "val_tokens": int(n_val),
            "inputs": [str(p) for p in inputs], "val_fraction": val_fraction}
    # token files, tokenizer and meta.json are one set: ids never sit next to another tokenizer's vocabulary
    with claim_out(out, "data", force), file_set(out) as stage:
        for name, part in (("train.bin", ids[:n_train]), ("val.bin", ids[n_train:])):
            with atomic_open(stage / name) as f:
                f.write(part.astype(dtype).tobytes())
        tok.save(stage)
        atomic_write_json(stage / "meta.json", meta)
    return meta


def save_tokenizer(tok: Tokenizer, out: str | Path, force: bool = False):
    """A tokenizer dir (`npgpt tokenizer train`): tokenizer.json and meta.json, which `prepare
    --tokenizer DIR` reads. Refuses to write into any other kind of dir."""
    with claim_out(out, "tokenizer", force), file_set(out) as stage:
        tok.save(stage)
        atomic_write_json(stage / "meta.json", {"tokenizer": tok.kind, "vocab_size": tok.vocab_size})


class TokenData:
    """A prepared data dir. `batch(split, B, T, rng)` draws B random windows of T + 1 tokens.

    The memmap is opened per batch rather than kept: a long-lived map lets touched pages pile up in
    resident memory over a long run; a fresh map per batch keeps RSS flat at negligible cost.
    """

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not current(d, "meta.json").is_file():
            raise NpgptError(f"{d} is not a prepared data dir (no meta.json); run `npgpt prepare` first")
        self.dir = d
        try:
            self.meta = meta = json.loads(current(d, "meta.json").read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NpgptError(f"{d}/meta.json is not valid JSON") from None
        if not (isinstance(meta, dict) and meta.get("dtype") in ("uint16", "uint32")
                and isinstance(meta.get("vocab_size"), int) and not isinstance(meta["vocab_size"], bool)
                and meta["vocab_size"] > 0 and isinstance(meta.get("tokenizer"), str)):
            raise NpgptError(f"{d} is not a prepared data dir (meta.json lacks a token dtype, vocab_size or "
                             f"tokenizer); run `npgpt prepare` first")
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size = meta["vocab_size"]
        self.tokenizer = Tokenizer.load(current(d, "tokenizer.json").parent, meta["tokenizer"])
        if self.tokenizer.vocab_size > self.vocab_size:
            raise NpgptError(f"{d}: the tokenizer has {self.tokenizer.vocab_size} tokens, meta.json says "
                             f"{self.vocab_size}")
        self.paths, self.sizes = {}, {}
        for split in ("train", "val"):
            p = self.paths[split] = current(d, f"{split}.bin")
            if not p.is_file():
                raise NpgptError(f"{d / (split + '.bin')} is missing")
            self.sizes[split] = p.stat().st_size // self.dtype.itemsize

    def tokens(self, split: str) -> np.ndarray:
        """A fresh read-only memmap of a split's tokens."""
        if self.sizes[split] == 0:
            raise NpgptError(f"{self.dir}: the {split} split is empty")
        return np.memmap(self.paths[split], dtype=self.dtype, mode="r")

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator):
        """-> (x, y) int64 [B, T]: y is x shifted by one token."""
        data = self.tokens(split)
        if len(data) <= block_size:
            raise NpgptError(f"the {split} split has {len(data)} tokens, fewer than block_size + 1 "
                             f"({block_size + 1}); lower block_size or add data")
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        w = np.stack([np.asarray(data[s:s + block_size + 1], dtype=np.int64) for s in starts])
        del data
        return w[:, :-1], w[:, 1:]
