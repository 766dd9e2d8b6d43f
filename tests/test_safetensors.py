"""The safetensors reader on broken and adversarial files.

1. The corpus: hand-built corrupt files in tests/fixtures/corrupt (made by make_corrupt_fixtures.py),
   each refused with a one-line NpgptError naming the file, also through the CLI.
2. Property-based (hypothesis): generated headers, valid and mutated (random JSON in every field, random
   bytes, truncations, lying lengths), compared with the safetensors library. npgpt accepts exactly what
   the library accepts, less the refusals listed in DIFFERENCES, and never raises anything but
   NpgptError. The quick test runs in the normal suite; `make fuzz` runs the long one.
"""
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, strategies as st

from conftest import run_cli
from fuzzing import campaign, fuzz_settings, quick_settings
from make_corrupt_fixtures import CASES, OUT as CORPUS, framed
from npgpt.tensorfile import ITEMSIZE, load_safetensors, read_safetensors_header
from npgpt.errors import NpgptError

try:
    import safetensors
    from safetensors import safe_open
except ImportError:  # a hard dependency of npgpt, but keep the no-crash half of the property without it
    safetensors = None

# Files the safetensors library (0.8) reads and npgpt refuses on purpose, by the message that says so.
DIFFERENCES = {
    "has unsupported dtype": "dtypes npgpt does not load: U32, U64, C64, F8_*, F4, ...",
    "repeats the key": "duplicate keys, at any level: the library keeps the last value of a tensor name or "
                       "metadata key, silently",
    "entry is not a JSON object": "an entry written as a JSON array [dtype, shape, offsets]: serde reads a "
                                  "struct from a sequence, the format is defined with objects",
    "dimensions, at most": "more than 32 dimensions (numpy 1.x cannot build the array)",
    r"more than 2\*\*40 elements": "zero-size tensors whose other dimensions multiply past 2**40 "
                                   "([0, 2**40, 2**40] makes numpy fail; no real tensor is that large)",
}
DIFFERENCE = re.compile("|".join(DIFFERENCES))
EXPECT = {name: match for name, _, match, _ in CASES}


def npgpt_reads(path: Path):
    """(entries, metadata, data start, arrays) or the NpgptError message; any other exception escapes."""
    try:
        entries, meta, start = read_safetensors_header(path)
        arrays, meta2 = load_safetensors(path)
    except NpgptError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None, msg
    assert meta2 == meta and isinstance(meta, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    return (entries, meta, start, arrays), None


def library_reads(blob: bytes):
    """{name: {"dtype", "shape", "data"}} when the safetensors library accepts the bytes, else None.
    deserialize runs the header checks of safe_open/load_file without building numpy arrays (numpy has
    no BF16 or F8, and cannot build [0, 2**40, 2**40]: load_file's verdict is numpy's there)."""
    try:
        return {name: view for name, view in safetensors.deserialize(blob)}
    except Exception:  # SafetensorError, and whatever else it raises for a refusal
        return None


def as_stored_bytes(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":  # npgpt widens bf16 into the top half of a float32
        return (np.ascontiguousarray(arr).view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return np.ascontiguousarray(arr).tobytes()


def check_against_library(blob: bytes, path: Path):
    """The property: npgpt's verdict on `blob` (written at `path`) agrees with the library's."""
    path.unlink(missing_ok=True)  # a new inode: never rewrite a file an old memmap may still map
    path.write_bytes(blob)
    ours, why = npgpt_reads(path)
    if safetensors is None:
        return
    theirs = library_reads(blob)
    if ours is None:
        assert theirs is None or DIFFERENCE.search(why), f"npgpt refuses a file the library reads: {why}"
        return
    assert theirs is not None, "npgpt reads a file the safetensors library refuses"
    entries, meta, start, arrays = ours
    assert set(entries) == set(theirs)
    for name, e in entries.items():
        t = theirs[name]
        assert (e["dtype"], list(e["shape"])) == (t["dtype"], list(t["shape"]))
        data = blob[start + e["begin"]: start + e["end"]]
        assert data == bytes(t["data"])
        assert arrays[name].shape == tuple(e["shape"]) and as_stored_bytes(arrays[name], e["dtype"]) == data
    with safe_open(str(path), framework="numpy") as f:
        assert (f.metadata() or {}) == meta


# ---------------------------------------------------------------- 1. the corpus
def test_corpus_is_what_the_generator_writes():
    assert len(CASES) >= 30
    assert sorted(p.stem for p in CORPUS.glob("*.safetensors")) == sorted(name for name, *_ in CASES)
    for name, blob, _, _ in CASES:
        assert (CORPUS / f"{name}.safetensors").read_bytes() == blob, f"run tests/make_corrupt_fixtures.py ({name})"
        assert len(blob) <= 8192, name


@pytest.mark.parametrize("name,match,library_accepts", [(n, m, a) for n, _, m, a in CASES], ids=[c[0] for c in CASES])
def test_corrupt_file_is_refused(name, match, library_accepts):
    path = CORPUS / f"{name}.safetensors"
    with pytest.raises(NpgptError, match=match) as e:
        load_safetensors(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    if safetensors is not None:  # the library agrees, except where npgpt is stricter on purpose
        assert (library_reads(path.read_bytes()) is not None) == library_accepts
        assert not library_accepts or DIFFERENCE.search(str(e.value))


def test_very_deep_nesting_is_refused(tmp_path):
    """100k levels: Python's json would raise RecursionError."""
    path = tmp_path / "deep.safetensors"
    path.write_bytes(framed(b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(NpgptError, match="nested more than 127 levels"):
        read_safetensors_header(path)


def test_long_names_are_cut_in_messages(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(framed({"w" * 10_000: {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    with pytest.raises(NpgptError, match="unsupported dtype") as e:
        read_safetensors_header(path)
    assert len(str(e.value)) < len(str(path)) + 150


def tiny_checkpoint(d: Path, weights: bytes):
    """A checkpoint dir whose config.json is a valid nano model and whose model.safetensors is `weights`."""
    from npgpt.config import GPTConfig
    import dataclasses
    d.mkdir()
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=4, vocab_size=8)
    (d / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg), "tokenizer": None}))
    (d / "model.safetensors").write_bytes(weights)


@pytest.mark.parametrize("name", ["offsets_bool", "metadata_int_value", "nested_3000", "utf16", "shape_zero_overflow"])
def test_cli_generate_with_corrupt_weights_is_one_line(tmp_path, name):
    tiny_checkpoint(tmp_path / "m", (CORPUS / f"{name}.safetensors").read_bytes())
    r = run_cli("generate", "a", "--model", tmp_path / "m", "-n", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and re.search(EXPECT[name], lines[0]), r.stderr


@pytest.mark.parametrize("name", ["dtype_list", "duplicate_tensor", "shape_huge_with_data"])
def test_cli_convert_weights_with_corrupt_file_is_one_line(tmp_path, name):
    src = tmp_path / "hf"
    src.mkdir()
    fix = Path(__file__).resolve().parent / "fixtures" / "hf" / "l2h4c32"
    (src / "config.json").write_bytes((fix / "config.json").read_bytes())
    (src / "model.safetensors").write_bytes((CORPUS / f"{name}.safetensors").read_bytes())
    r = run_cli("convert-weights", src, tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and re.search(EXPECT[name], lines[0]), r.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------- valid edge cases both sides read
F4 = b"\0\0\x80\x3f"
W = b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize("blob", [
    framed(b"{}"),
    framed(b"{}      "),                                              # npgpt's own padding
    framed(b" \t\r\n{" + W + b"} \n", F4),                            # JSON whitespace both sides
    framed(b'{"__metadata__":null,' + W + b"}", F4),
    framed(b'{"__metadata__":{"k":"v","":""},' + W + b"}", F4),
    framed(b'{"__metadata__":{}}'),
    framed(b'{"w":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', F4),           # a scalar
    framed(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[1,{"a":null}]}}', F4),
    framed(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":-0,"y":1e308,"z":123456789012345678901234}}', F4),
    framed(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + b"[" * 125 + b"]" * 125 + b"}}", F4),
    framed(b'{"\\ud83d\\ude00 \\u0000":{"d\\u0074ype":"F\\u0033\\u0032","shape":[1],"data_offsets":[0,4]}}', F4),
    framed(b'{"":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', F4),
    framed(b'{"e":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]},"f":{"dtype":"I8","shape":[0],'
           b'"data_offsets":[0,0]},' + W + b',"g":{"dtype":"BOOL","shape":[2,0],"data_offsets":[4,4]}}', F4),
    framed(b'{"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"h":{"dtype":"F16","shape":[1],'
           b'"data_offsets":[4,6]},"d":{"dtype":"F64","shape":[1],"data_offsets":[6,14]}}', bytes(range(14))),
    framed(json.dumps({"w": {"dtype": "F32", "shape": [1] * 32, "data_offsets": [0, 4]}}).encode(), F4),
    framed(json.dumps({"w": {"dtype": "U8", "shape": [0, 2 ** 40], "data_offsets": [0, 0]}}).encode()),
], ids=["empty", "padded", "whitespace", "null_metadata", "metadata", "only_metadata", "scalar", "extra_field",
        "extra_numbers", "nesting_127", "escapes", "empty_name", "empty_tensors", "bf16_f16_f64", "32_dims",
        "zero_2_40"])
def test_valid_edge_cases_are_read(tmp_path, blob):
    path = tmp_path / "ok.safetensors"
    check_against_library(blob, path)
    ours, why = npgpt_reads(path)
    assert ours is not None, why


# ---------------------------------------------------------------- 2. generated files
LIBRARY_ONLY = {"U32": 4, "U64": 8, "C64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
NPGPT_DTYPES = sorted(ITEMSIZE)
SIZE = {**ITEMSIZE, **LIBRARY_ONLY}
FIELDS = ("dtype", "shape", "data_offsets")
TOKENS = ["-0", "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "1.0", "4.0", "true", "null",
          "18446744073709551615", "18446744073709551616", "9223372036854775808", "1" + "0" * 400,
          '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\u0000"', "[" * 125 + "]" * 125,
          "[" * 126 + "]" * 126, "[" * 2000 + "]" * 2000, '{"a":1,"a":2}', "01", "[1,]", "{,}"]
COUNTS = st.sampled_from([0, 1, 2, 3, 4, 8, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 41, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -1])
SCALARS = (st.none() | st.booleans() | COUNTS | st.integers(-2 ** 70, 2 ** 70) | st.floats()
           | st.text(max_size=6) | st.sampled_from(NPGPT_DTYPES + list(LIBRARY_ONLY) + ["f32", "", "Q4"]))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=3), kids,
                                                                                       max_size=3), max_leaves=10)
MARK = "\x01@mark@\x01"  # a string placeholder, swapped for a raw JSON token after json.dumps


@st.composite
def valid_files(draw):
    """A valid header dict and its data: 0-4 tensors of small shapes, stored in any order."""
    names = draw(st.lists(st.text(max_size=4), max_size=4, unique=True).filter(lambda ns: "__metadata__" not in ns))
    dtypes = st.sampled_from(NPGPT_DTYPES) if draw(st.integers(0, 7)) else st.sampled_from(sorted(LIBRARY_ONLY))
    specs = [(n, draw(dtypes), draw(st.lists(st.integers(0, 3), max_size=3))) for n in names]
    offsets, off = {}, 0
    for i in draw(st.permutations(range(len(specs)))):
        n, dt, shape = specs[i]
        offsets[n] = [off, off + math.prod(shape) * SIZE[dt]]
        off += math.prod(shape) * SIZE[dt]
    header = {n: {"dtype": dt, "shape": shape, "data_offsets": offsets[n]} for n, dt, shape in specs}
    if draw(st.booleans()):
        meta = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
        header = {"__metadata__": meta, **header} if draw(st.booleans()) else {**header, "__metadata__": meta}
    return header, draw(st.binary(min_size=off, max_size=off))


def mutate_header(draw, header: dict) -> dict:
    """One structural change: a field set to random JSON, dropped or nudged; an extra field; an entry
    or the metadata replaced; a raw token (NaN, -0, 1e999, deep nesting ...) placed somewhere."""
    names = [k for k, e in header.items()  # entries that an earlier mutation left whole
             if k != "__metadata__" and isinstance(e, dict) and all(f in e for f in FIELDS)]
    how = draw(st.sampled_from(["field", "drop", "extra", "entry", "array_entry", "meta", "nudge", "token",
                                "copy_offsets", "top"]))
    if how == "top":
        return draw(JSON)
    if how == "meta":
        header["__metadata__"] = draw(JSON)
        return header
    if not names:
        header[draw(st.text(max_size=3))] = draw(JSON)
        return header
    name = draw(st.sampled_from(names))
    e = header[name]
    if how == "entry":
        header[name] = draw(JSON)
    elif how == "array_entry":
        header[name] = [e["dtype"], e["shape"], e["data_offsets"]]
    elif how == "copy_offsets":
        header[name]["data_offsets"] = list(header[draw(st.sampled_from(names))]["data_offsets"])
    elif how == "drop":
        del e[draw(st.sampled_from(FIELDS))]
    elif how == "extra":
        e[draw(st.text(max_size=3))] = draw(JSON)
    elif how == "nudge":
        field = draw(st.sampled_from(["shape", "data_offsets"]))
        if isinstance(e[field], list) and e[field] and all(isinstance(x, int) for x in e[field]):
            i = draw(st.integers(0, len(e[field]) - 1))
            e[field][i] = max(0, e[field][i] + draw(st.integers(-4, 4))) if draw(st.booleans()) else draw(COUNTS)
    elif how == "token":
        where = draw(st.sampled_from(FIELDS + ("extra", "shape_item")))
        if where == "shape_item" and isinstance(e["shape"], list) and e["shape"]:
            e["shape"][0] = MARK
        else:
            e[where if where in FIELDS else "x"] = MARK
    else:  # "field"
        e[draw(st.sampled_from(FIELDS))] = draw(JSON | st.lists(COUNTS, max_size=3))
    return header


@st.composite
def any_files(draw) -> bytes:
    """Bytes of a safetensors file: valid, or broken in the header dict, the header text, the header
    length, the data area or the byte stream; sometimes plain random bytes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=64))
    header, data = draw(valid_files())
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        header = mutate_header(draw, header) if isinstance(header, dict) else draw(JSON)
    text = json.dumps(header, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), None])))
    if json.dumps(MARK) in text:  # the control characters keep it escaped whatever ensure_ascii says
        text = text.replace(json.dumps(MARK), draw(st.sampled_from(TOKENS)))
    how = draw(st.sampled_from(["none"] * 12 + ["duplicate", "whitespace", "junk"]))
    if how == "duplicate" and isinstance(header, dict) and header and text.startswith("{"):
        k = draw(st.sampled_from(sorted(header)))
        text = "{" + json.dumps(k) + ":" + json.dumps(header[k]) + "," + text[1:]
    elif how == "whitespace":
        ws = st.text(alphabet=" \t\r\n\x0c\x00", max_size=3)
        text = draw(ws) + text + draw(ws)
    elif how == "junk":
        text += draw(st.text(max_size=3))
    hb = text.encode(draw(st.sampled_from(["utf-8"] * 18 + ["utf-16-le", "utf-8-sig"])), "surrogatepass")
    if draw(st.integers(0, 19)) == 0 and hb:  # damage one byte of the header
        i = draw(st.integers(0, len(hb) - 1))
        hb = hb[:i] + bytes([draw(st.sampled_from(b'{}[]",:-.019eE\\ \xff\x80') | st.integers(0, 255))]) + hb[i + 1:]
    n = len(hb)
    lie = draw(st.sampled_from(["none"] * 15 + ["length", "data", "cut"]))
    if lie == "length":
        n = draw(st.integers(0, len(hb) + 16) | st.sampled_from([2 ** 63, 2 ** 64 - 1, 100_000_001]))
    elif lie == "data":
        data = data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data + draw(st.binary(min_size=1, max_size=8))
    blob = struct.pack("<Q", n) + hb + data
    if lie == "cut":
        blob = blob[:draw(st.integers(0, len(blob)))]
    return blob


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("st") / "f.safetensors"


def test_generated_files_agree_with_the_library(scratch):
    quick_settings(250)(given(any_files())(lambda blob: check_against_library(blob, scratch)))()


def test_generated_valid_files_are_read(scratch):
    """Unmutated headers with npgpt's dtypes: npgpt must read every one (the check above also passes
    when both refuse, so this one pins down acceptance)."""
    @quick_settings(100)
    @given(valid_files())
    def check(file):
        header, data = file
        if any(e["dtype"] not in ITEMSIZE for k, e in header.items() if k != "__metadata__"):
            return
        blob = framed(json.dumps(header).encode(), data)
        check_against_library(blob, scratch)
        assert npgpt_reads(scratch)[0] is not None
    check()


@pytest.mark.fuzz
def test_generated_files_agree_with_the_library_fuzz(scratch):
    campaign(fuzz_settings()(given(any_files())(lambda blob: check_against_library(blob, scratch))))
