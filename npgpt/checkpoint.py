"""Checkpoint dirs and the safetensors format, read and written here (never pickle).

A checkpoint dir holds:
  config.json        {"model": GPTConfig, "tokenizer": {"kind": ...}, "train": TrainConfig?, "provenance": ...}
  model.safetensors  HF GPT-2 tensor names, (in, out) layout, written in flat-buffer order
  tokenizer.json
  optim.safetensors  Adam m and v (training runs only)
  state.json         step, RNG state, metrics (training runs only; written last)

safetensors layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets relative to the data area), then the data area. Because the writer
stores tensors contiguously in flat-buffer order and pads the header to a multiple of 8, the whole data
area of a float32 checkpoint *is* the flat parameter buffer, so loading is one np.memmap: no copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .config import GPTConfig, config_from_dict
from .errors import NpgptError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "BOOL": np.bool_}
ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in DTYPES.items()}, "BF16": 2}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


# ---------------------------------------------------------------- atomic files
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path):
    """Write a file atomically: a temp file in the same dir, fsync, rename over `path`. On any error the
    temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def atomic_write_bytes(path: str | Path, data: bytes):
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------- safetensors
def write_safetensors(path: str | Path, tensors, metadata: dict[str, str] | None = None):
    """Write [(name, array), ...] (or a dict) atomically, in the given order, contiguous, header padded
    to a multiple of 8 with spaces."""
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr in items:
        dt = NAMES.get(arr.dtype)
        if dt is None:
            raise ValueError(f"cannot store dtype {arr.dtype} in safetensors")
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + arr.nbytes]}
        off += arr.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).data)


def read_safetensors_header(path: str | Path) -> tuple[dict, dict, int]:
    """Validate a safetensors file; return (tensor entries in data order, metadata, data-area offset).
    Rejects bad lengths, unknown dtypes, sizes that don't match shape x itemsize, gaps and overlaps."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NpgptError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise NpgptError(f"{path}: truncated or corrupt safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise NpgptError(f"cannot read {path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise NpgptError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise NpgptError(f"{path}: safetensors header is not an object")
    meta = header.pop("__metadata__", None) or {}
    entries = []
    for name, e in header.items():
        try:
            dt, shape, (a, b) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NpgptError(f"{path}: malformed entry for tensor {name!r}") from None
        if dt not in ITEMSIZE:
            raise NpgptError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        if any(s < 0 for s in shape) or not (0 <= a <= b) or b - a != math.prod(shape) * ITEMSIZE[dt]:
            raise NpgptError(f"{path}: tensor {name!r} has offsets that do not match its shape and dtype")
        entries.append((a, b, name, dt, tuple(shape)))
    entries.sort()
    pos = 0
    for a, b, name, *_ in entries:
        if a != pos:
            raise NpgptError(f"{path}: tensor {name!r} {'overlaps another' if a < pos else 'leaves a gap'}")
        pos = b
    data_start = 8 + n
    if data_start + pos != size:
        raise NpgptError(f"{path}: file is {size} bytes, header describes {data_start + pos} (truncated?)")
    ordered = {name: {"dtype": dt, "shape": shape, "begin": a, "end": b} for a, b, name, dt, shape in entries}
    return ordered, meta, data_start


def _as_array(buf: np.ndarray, dt: str, shape) -> np.ndarray:
    """Bytes (uint8) -> array of the stored dtype; BF16 is widened into the top half of a float32."""
    if dt == "BF16":
        u = buf.view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    return buf.view(DTYPES[dt]).reshape(shape)


def load_safetensors(path: str | Path, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of a file as arrays (memory-mapped read-only views when mmap and aligned, else copies)
    plus the metadata dict."""
    entries, meta, start = read_safetensors_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, e in entries.items():
        buf = raw[start + e["begin"]: start + e["end"]]
        if (start + e["begin"]) % ITEMSIZE[e["dtype"]]:
            buf = np.array(buf)  # unaligned data: copy before viewing as a wider dtype
        out[name] = _as_array(buf, e["dtype"], e["shape"])
    return out, meta


def load_flat(path: str | Path, shapes, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """The flat float32 parameter buffer from a safetensors file holding exactly the tensors `shapes`
    names. If the file is float32 in flat order with aligned data, the buffer is a read-only memmap of the
    file (mmap=True) or one read (mmap=False); otherwise tensors are copied into place."""
    entries, meta, start = read_safetensors_header(path)
    want = {name: shape for name, shape in shapes}
    have = {name: e["shape"] for name, e in entries.items()}
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
        raise NpgptError(f"{path}: tensors do not match the config ({'; '.join(parts)})")
    for name, shape in shapes:
        if tuple(have[name]) != tuple(shape):
            raise NpgptError(f"{path}: tensor {name} has shape {tuple(have[name])}, config needs {tuple(shape)}")
    n = sum(math.prod(s) for _, s in shapes)
    in_order = list(entries) == [name for name, _ in shapes]
    if in_order and all(e["dtype"] == "F32" for e in entries.values()) and start % 4 == 0:
        if mmap:
            return np.memmap(path, dtype=np.float32, mode="r", offset=start, shape=(n,)), meta
        with open(path, "rb") as f:
            f.seek(start)
            return np.fromfile(f, dtype=np.float32, count=n), meta
    tensors, meta = load_safetensors(path, mmap=True)
    flat = np.empty(n, np.float32)
    off = 0
    for name, shape in shapes:
        k = math.prod(shape)
        flat[off:off + k] = tensors[name].reshape(-1)
        off += k
    return flat, meta


# ---------------------------------------------------------------- checkpoint dirs
def save_checkpoint(directory: str | Path, model, *, train_config=None, optimizer=None, state: dict | None = None,
                    provenance: dict | None = None):
    """Write a checkpoint dir. Each file is atomic; state.json (the resume record) is written last and
    names the step that model.safetensors and optim.safetensors carry in their metadata."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    step = str(state["step"]) if state else "0"
    if optimizer is not None:
        write_safetensors(d / "optim.safetensors", [("m", optimizer.m), ("v", optimizer.v)],
                          {"step": step, "t": str(optimizer.t)})
    write_safetensors(d / "model.safetensors", [(n, model.params[n]) for n, _ in model.shapes],
                      {"format": "pt", "step": step})
    if model.tokenizer is not None:
        model.tokenizer.save(d)
    cfg = {"model": dataclasses.asdict(model.config),
           "tokenizer": {"kind": model.tokenizer.kind} if model.tokenizer is not None else None}
    if train_config is not None:
        cfg["train"] = dataclasses.asdict(train_config)
    if provenance:
        cfg["provenance"] = provenance
    atomic_write_json(d / "config.json", cfg)
    if state is not None:
        atomic_write_json(d / "state.json", state)


def read_config(directory: str | Path) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise NpgptError(f"model dir not found: {d}")
    path = d / "config.json"
    if not path.is_file():
        raise NpgptError(f"{d} is not an npgpt checkpoint (no config.json)")
    try:
        cfg = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise NpgptError(f"{path} is not valid JSON") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise NpgptError(f"{path} has no \"model\" section")
    return cfg


def load_model(directory: str | Path, *, mmap: bool = True):
    """Load a checkpoint dir into a GPT (weights memory-mapped read-only by default; mmap=False gives a
    private, writable copy for training)."""
    from .model import GPT
    from .params import param_shapes
    from .tokenizer import Tokenizer
    d = Path(directory)
    cfg = read_config(d)
    config: GPTConfig = config_from_dict(cfg["model"])
    if not (d / "model.safetensors").is_file():
        raise NpgptError(f"{d} has no model.safetensors")
    quant = cfg.get("quantization")
    if quant:
        from .quant import SCHEME, load_quantized_params
        if quant.get("scheme") != SCHEME:
            raise NpgptError(f"{d}: unknown quantization scheme {quant.get('scheme')!r}")
        params = load_quantized_params(d / "model.safetensors", param_shapes(config))
    else:
        flat, _ = load_flat(d / "model.safetensors", param_shapes(config), mmap=mmap)
    tok = None
    if cfg.get("tokenizer"):
        tok = Tokenizer.load(d, cfg["tokenizer"]["kind"])
        if tok.vocab_size > config.vocab_size:
            raise NpgptError(f"{d}: tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    return GPT(config, params=params, tokenizer=tok) if quant else GPT(config, flat, tokenizer=tok)
