"""Corpora -> token files, and seeded random-window batches from them.

A data dir holds train.bin and val.bin (raw little-endian uint16, or uint32 when the vocabulary has more
than 65,536 tokens), meta.json and tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import atomic_open, atomic_write_json
from .errors import NpgptError
from .tokenizer import Tokenizer, make_tokenizer


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with newlines normalised (\\r\\n and bare \\r become \\n)."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"input file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NpgptError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def prepare(inputs, out: str | Path, tokenizer: str | Tokenizer = "char", val_fraction: float = 0.1,
            force: bool = False) -> dict:
    """Tokenize the input files (joined in order) into `out`/train.bin and val.bin: the first
    (1 - val_fraction) of the tokens train, the rest validate. Returns the meta dict."""
    if not inputs:
        raise NpgptError("no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise NpgptError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if (out / "meta.json").exists() and not force:
        raise NpgptError(f"{out} already holds prepared data; use --force to overwrite it")
    texts = [read_text(p) for p in inputs]
    for p, t in zip(inputs, texts):
        if not t:
            raise NpgptError(f"input file is empty: {p}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else make_tokenizer(tokenizer, texts)
    ids = np.array(tok.encode_corpus("".join(texts)), dtype=np.int64)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    n_val = int(len(ids) * val_fraction)
    n_train = len(ids) - n_val
    if n_train < 2 or (val_fraction > 0 and n_val < 2):
        raise NpgptError(f"corpus too small: {len(ids)} tokens")
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.bin", ids[:n_train]), ("val.bin", ids[n_train:])):
        with atomic_open(out / name) as f:
            f.write(part.astype(dtype).tobytes())
    tok.save(out)
    meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "train_tokens": int(n_train), "val_tokens": int(n_val),
            "inputs": [str(p) for p in inputs], "val_fraction": val_fraction}
    atomic_write_json(out / "meta.json", meta)
    return meta


class TokenData:
    """A prepared data dir. `batch(split, B, T, rng)` draws B random windows of T + 1 tokens.

    The memmap is opened per batch rather than kept: a long-lived map lets touched pages pile up in
    resident memory over a long run; a fresh map per batch keeps RSS flat at negligible cost.
    """

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not (d / "meta.json").is_file():
            raise NpgptError(f"{d} is not a prepared data dir (no meta.json); run `npgpt prepare` first")
        self.dir = d
        self.meta = json.loads((d / "meta.json").read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer = Tokenizer.load(d, self.meta["tokenizer"])
        self.sizes = {}
        for split in ("train", "val"):
            p = d / f"{split}.bin"
            if not p.is_file():
                raise NpgptError(f"{p} is missing")
            self.sizes[split] = p.stat().st_size // self.dtype.itemsize

    def tokens(self, split: str) -> np.ndarray:
        """A fresh read-only memmap of a split's tokens."""
        if self.sizes[split] == 0:
            raise NpgptError(f"{self.dir}: the {split} split is empty")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")

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
