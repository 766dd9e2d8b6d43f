"""safetensors reading/writing (validated, memory-mapped) and checkpoint dirs."""
import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from npgpt.checkpoint import load_model, save_checkpoint
from npgpt.files import atomic_open
from npgpt.tensorfile import load_flat, load_safetensors, write_safetensors
from npgpt.config import preset
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.params import param_shapes
from npgpt.tokenizer import Tokenizer


def test_writer_is_readable_by_the_safetensors_library(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([1, 2, 3], np.int64)
    write_safetensors(tmp_path / "x.safetensors", [("a", a), ("b", b)], {"k": "v"})
    got = safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    n = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert n % 8 == 0


def test_reader_reads_library_files_and_bf16(tmp_path):
    x = np.array([1.5, -2.25, 3.0], np.float32)
    safetensors.numpy.save_file({"f16": x.astype(np.float16), "f32": x}, str(tmp_path / "y.safetensors"))
    t, _ = load_safetensors(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(t["f16"], x.astype(np.float16))
    # hand-made bf16: the top 16 bits of each float32
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    hdr = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bf.tobytes())
    t, _ = load_safetensors(tmp_path / "bf.safetensors")
    np.testing.assert_array_equal(t["w"], x)  # these values are exact in bf16


def _raw(path, header, data):
    hdr = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + data)
    return path


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "do not match"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
    ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
])
def test_reader_rejects_corrupt_files(tmp_path, header, data, match):
    with pytest.raises(NpgptError, match=match):
        load_safetensors(_raw(tmp_path / "bad.safetensors", header, data))


def test_reader_rejects_garbage(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(NpgptError):
        load_safetensors(tmp_path / "g.safetensors")


def test_checkpoint_roundtrip_is_memory_mapped(tmp_path):
    cfg = preset("nano")
    m = GPT(cfg, seed=1, tokenizer=Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz012345"]))
    save_checkpoint(tmp_path / "ck", m)
    m2 = load_model(tmp_path / "ck")
    assert isinstance(m2.flat, np.memmap) and not m2.flat.flags.writeable
    np.testing.assert_array_equal(m2.flat, m.flat)
    assert m2.config == cfg and m2.tokenizer.decode(m.tokenizer.encode("ab")) == "ab"
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(m2.forward(idx), m.forward(idx))
    m3 = load_model(tmp_path / "ck", mmap=False)
    assert m3.flat.flags.writeable


def test_load_flat_reorders_and_widens(tmp_path):
    cfg = preset("nano")
    m = GPT(cfg, seed=2)
    tensors = {n: m.params[n].astype(np.float16) for n, _ in reversed(m.shapes)}
    write_safetensors(tmp_path / "r.safetensors", tensors)
    flat, _ = load_flat(tmp_path / "r.safetensors", param_shapes(cfg))
    np.testing.assert_array_equal(flat, m.flat.astype(np.float16).astype(np.float32))


def test_tensors_not_matching_config(tmp_path):
    m = GPT(preset("nano"), seed=0)
    save_checkpoint(tmp_path / "ck", m)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["n_embd"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpgptError, match="shape"):
        load_model(tmp_path / "ck")


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
