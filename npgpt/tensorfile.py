"""The safetensors format, read and written here (never pickle).

Layout: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape, data_offsets: [begin,
end]}} (offsets relative to the data area), then the data area. Because the writer stores tensors
contiguously in the given order and pads the header to a multiple of 8, the whole data area of a float32
checkpoint written in flat-buffer order *is* the flat parameter buffer, so loading is one np.memmap: no
copy. The reader validates every header field before it trusts it: a file from a user is data, not code.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from .errors import NpgptError
from .files import atomic_open

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "BOOL": np.bool_}
ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in DTYPES.items()}, "BF16": 2}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


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


# Limits on what a header may describe. MAX_HEADER_BYTES and MAX_JSON_DEPTH are the safetensors
# library's own (serde_json gives up at 128 levels of nesting), so both accept the same headers. The shape
# caps keep even a zero-size tensor (which holds no data, so the file size does not bound it) from making
# numpy fail: [0, 2**40, 2**40] overflows numpy's size computation, more than 32 dims numpy 1.x's limit.
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_DEPTH = 127
MAX_NDIM = 32
MAX_ELEMENTS = 2 ** 40  # each dimension, and the product of the non-zero ones


def _short(s: str, n: int = 60) -> str:
    """repr of a tensor name or key, cut to `n` characters: an error message stays one short line."""
    r = repr(s)
    return r if len(r) <= n else r[:n - 3] + "..."


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):  # 1e999: serde_json calls this "number out of range"
        raise ValueError("number out of range")
    return v


def _json_int(s: str):
    """A JSON integer read as serde_json (the safetensors library's parser) reads it: "-0" and integers
    outside 64 bits become floats, which no integer field of the header accepts."""
    if s == "-0" or len(s) > 20:
        return _finite_float(s)
    v = int(s)
    return v if -2 ** 63 <= v < 2 ** 64 else _finite_float(s)


def _no_constant(s: str):
    raise ValueError(f"{s} is not JSON")  # NaN, Infinity, -Infinity: Python's json accepts them


def _is_count(x) -> bool:
    """A non-negative JSON integer (Python's bool is an int; JSON's true is not a number)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_header(raw: bytes, path: Path):
    """Header bytes -> JSON value. Strict UTF-8, no duplicate keys at any level, no NaN/Infinity or
    numbers beyond a double, at most MAX_JSON_DEPTH levels of nesting, no lone surrogates (\\ud800)."""
    def bad(why: str) -> NpgptError:
        return NpgptError(f"{path}: safetensors header {why}")

    def unique(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):  # Python's json would silently keep the last value
            seen: set = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise bad(f"repeats the key {_short(dup)}")
        return d

    try:
        text = raw.decode("utf-8")  # explicit: json.loads(bytes) would also take UTF-16 and UTF-32
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    if "\0" in text:  # never valid in JSON text; UTF-16 puts one next to every ASCII character
        raise bad("is not UTF-8 JSON (it holds NUL bytes: UTF-16?)")
    try:
        value = json.loads(text, object_pairs_hook=unique, parse_int=_json_int, parse_float=_finite_float,
                           parse_constant=_no_constant)
    except RecursionError:
        raise bad(f"is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:
        raise bad("is not valid JSON") from None
    stack = [(value, 1)]  # one walk, no recursion: nesting depth and strings that are not valid Unicode
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad("holds a lone surrogate (\\ud800-\\udfff), which is not Unicode") from None
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad(f"is nested more than {MAX_JSON_DEPTH} levels deep")
            stack.extend((x, depth + 1) for x in ([*v, *v.values()] if isinstance(v, dict) else v))
    return value


def _tensor_entry(path: Path, name: str, e, data_size: int) -> tuple[int, int, str, str, tuple]:
    """Check one header entry {"dtype", "shape", "data_offsets"} against a data area of `data_size`
    bytes; return (begin, end, name, dtype, shape)."""
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(e, dict):
        raise NpgptError(f"{where}: entry is not a JSON object")
    lacking = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if lacking:
        raise NpgptError(f"{where}: entry lacks {', '.join(lacking)}")
    dt, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dt, str):
        raise NpgptError(f"{where}: dtype must be a string")
    if dt not in ITEMSIZE:
        raise NpgptError(f"{where} has unsupported dtype {_short(dt)}")
    if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
        raise NpgptError(f"{where}: shape must be a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise NpgptError(f"{where}: shape has {len(shape)} dimensions, at most {MAX_NDIM} are supported")
    if math.prod(s for s in shape if s) > MAX_ELEMENTS:
        raise NpgptError(f"{where}: shape is too large (more than 2**40 elements)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise NpgptError(f"{where}: data_offsets must be two non-negative integers")
    a, b = offsets
    if b > data_size:  # a tensor can never be larger than the file
        raise NpgptError(f"{where} ends at byte {b} of a {data_size}-byte data area (truncated?)")
    if a > b or b - a != math.prod(shape) * ITEMSIZE[dt]:
        raise NpgptError(f"{where} has offsets that do not match its shape and dtype")
    return a, b, name, dt, tuple(shape)


def read_safetensors_header(path: str | Path) -> tuple[dict, dict, int]:
    """Validate a safetensors file; return (tensor entries in data order, metadata, data-area offset).

    Accepts exactly what the safetensors library accepts, less what npgpt cannot or will not read
    (tests/test_safetensors.py checks this): dtypes outside ITEMSIZE, duplicate keys, entries that are
    JSON arrays, and shapes beyond MAX_NDIM / MAX_ELEMENTS. Anything wrong raises NpgptError, one line
    naming the file: bad lengths, types, sizes that don't match shape x itemsize, gaps and overlaps."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NpgptError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise NpgptError(f"{path}: truncated or corrupt safetensors header")
            raw = f.read(n)
    except OSError as e:
        raise NpgptError(f"cannot read {path}: {e.strerror or e}") from None
    header = _parse_header(raw, path)
    if not isinstance(header, dict):
        raise NpgptError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise NpgptError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    entries = sorted(_tensor_entry(path, name, e, size - data_start) for name, e in header.items())
    pos = 0
    for a, b, name, *_ in entries:
        if a != pos:
            raise NpgptError(f"{path}: tensor {_short(name)} {'overlaps another' if a < pos else 'leaves a gap'}")
        pos = b
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


def load_safetensors(path: str | Path, mmap: bool = True, header=None) -> tuple[dict[str, np.ndarray], dict]:
    """All tensors of a file as arrays (memory-mapped read-only views when mmap and aligned, else copies)
    plus the metadata dict. `header`: what read_safetensors_header(path) returned, if already read."""
    entries, meta, start = header or read_safetensors_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, dtype=np.uint8)
    out = {}
    for name, e in entries.items():
        buf = raw[start + e["begin"]: start + e["end"]]
        if (start + e["begin"]) % ITEMSIZE[e["dtype"]]:
            buf = np.array(buf)  # unaligned data: copy before viewing as a wider dtype
        out[name] = _as_array(buf, e["dtype"], e["shape"])
    return out, meta


def load_flat(path: str | Path, shapes, mmap: bool = True, header=None) -> tuple[np.ndarray, dict]:
    """The flat float32 parameter buffer from a safetensors file holding exactly the tensors `shapes`
    names. If the file is float32 in flat order with aligned data, the buffer is a read-only memmap of the
    file (mmap=True) or one read (mmap=False); otherwise tensors are copied into place. `header`: what
    read_safetensors_header(path) returned, if already read."""
    entries, meta, start = header = header or read_safetensors_header(path)
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
    tensors, meta = load_safetensors(path, mmap=True, header=header)
    flat = np.empty(n, np.float32)
    off = 0
    for name, shape in shapes:
        k = math.prod(shape)
        flat[off:off + k] = tensors[name].reshape(-1)
        off += k
    return flat, meta
