"""Write tests/fixtures/corrupt/*.safetensors: small, hand-built broken safetensors files.

    python tests/make_corrupt_fixtures.py     # rewrites the directory from CASES

Each case is (name, file bytes, regex its NpgptError message must match, library_accepts). The last is
True only for files the safetensors library reads but npgpt refuses on purpose (duplicate keys, dims
numpy cannot build, ...; see DIFFERENCES in test_safetensors.py); the library refuses all the others.
test_safetensors.py checks the committed files against this list and reads every one of them.
"""
import json
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "fixtures" / "corrupt"


def framed(header, data: bytes = b"") -> bytes:
    """8-byte little-endian header length + header (a dict, or raw bytes as is) + data."""
    hb = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(hb)) + hb + data


def one(**fields) -> dict:
    """A header with one tensor "w": F32, shape [1], offsets [0, 4], with `fields` replaced."""
    return {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **fields}}


F4 = b"\0\0\x80\x3f"  # 1.0f: the 4 data bytes of one()
OK_TEXT = json.dumps(one(), separators=(",", ":"))
OK_BYTES = OK_TEXT.encode()

CASES = [
    # framing: the 8-byte length and the file size
    ("empty", b"", "too short", False),
    ("seven_bytes", b"\x08\0\0\0\0\0\0", "too short", False),
    ("length_beyond_file", struct.pack("<Q", 1000) + OK_BYTES + F4, "truncated or corrupt", False),
    ("length_2_63", struct.pack("<Q", 2 ** 63) + OK_BYTES + F4, "truncated or corrupt", False),
    ("length_zero", struct.pack("<Q", 0) + OK_BYTES + F4, "not valid JSON", False),
    ("length_too_short", struct.pack("<Q", 20) + OK_BYTES + F4, "not valid JSON", False),
    ("header_cut_short", framed(one(), F4)[:30], "truncated or corrupt", False),
    ("data_truncated", framed(one(shape=[2], data_offsets=[0, 8]), F4), "truncated", False),
    ("data_extra_bytes", framed(one(), F4 + b"\0" * 4), "header describes", False),
    # the header text
    ("not_json", framed(b"this is not json"), "not valid JSON", False),
    ("top_level_array", framed(b"[]"), "not a JSON object", False),
    ("top_level_string", framed(b'"w"'), "not a JSON object", False),
    ("non_utf8", framed(OK_BYTES.replace(b'"w"', b'"\xff"'), F4), "not UTF-8", False),
    ("utf16", framed(OK_TEXT.encode("utf-16-le"), F4), "NUL bytes", False),
    ("utf8_bom", framed(b"\xef\xbb\xbf" + OK_BYTES, F4), "not valid JSON", False),
    ("trailing_junk", framed(OK_BYTES + b"}", F4), "not valid JSON", False),
    ("raw_control_char", framed(OK_BYTES.replace(b'"w"', b'"\x01"'), F4), "not valid JSON", False),
    ("lone_surrogate", framed(OK_BYTES.replace(b'"w"', b'"\\ud800"'), F4), "lone surrogate", False),
    ("nan", framed(OK_BYTES.replace(b"[1]", b"[NaN]"), F4), "not valid JSON", False),
    ("infinity", framed(OK_BYTES.replace(b"[1]", b"[Infinity]"), F4), "not valid JSON", False),
    ("huge_float_extra", framed(OK_BYTES[:-2] + b',"x":1e999}}', F4), "not valid JSON", False),
    ("huge_int_offset", framed(OK_BYTES.replace(b"[0,4]", b"[0,1" + b"0" * 400 + b"]"), F4),
     "not valid JSON", False),
    ("nested_3000", framed(b"[" * 3000 + b"]" * 3000), "nested more than", False),
    ("nested_128", framed(OK_BYTES[:-2] + b',"x":' + b"[" * 126 + b"]" * 126 + b"}}", F4), "nested more than",
     False),
    ("duplicate_tensor", framed(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + OK_BYTES[1:], F4),
     "repeats the key 'w'", True),
    ("duplicate_field", framed(OK_BYTES.replace(b'"dtype":"F32"', b'"dtype":"F32","dtype":"F32"'), F4),
     "repeats the key 'dtype'", False),
    ("duplicate_metadata_key", framed(b'{"__metadata__":{"k":"a","k":"b"},' + OK_BYTES[1:], F4),
     "repeats the key 'k'", True),
    # __metadata__
    ("metadata_list", framed({"__metadata__": [1, 2], **one()}, F4), "__metadata__ must map", False),
    ("metadata_int_value", framed({"__metadata__": {"step": 5}, **one()}, F4), "__metadata__ must map", False),
    ("metadata_string", framed({"__metadata__": "x", **one()}, F4), "__metadata__ must map", False),
    # a tensor entry
    ("entry_number", framed({"w": 5}), "entry is not a JSON object", False),
    ("entry_null", framed({"w": None}), "entry is not a JSON object", False),
    ("entry_array_form", framed({"w": ["F32", [1], [0, 4]]}, F4), "entry is not a JSON object", True),
    ("entry_lacks_dtype", framed({"w": {"shape": [1], "data_offsets": [0, 4]}}, F4), "lacks dtype", False),
    ("dtype_list", framed(one(dtype=["F32"]), F4), "dtype must be a string", False),
    ("dtype_null", framed(one(dtype=None), F4), "dtype must be a string", False),
    ("dtype_unknown", framed(one(dtype="Q4"), F4), "unsupported dtype 'Q4'", False),
    ("dtype_lowercase", framed(one(dtype="f32"), F4), "unsupported dtype 'f32'", False),
    ("shape_string", framed(one(shape="1"), F4), "shape must be a list", False),
    ("shape_float", framed(one(shape=[1.9]), F4), "shape must be a list", False),
    ("shape_integral_float", framed(OK_BYTES.replace(b"[1]", b"[1.0]"), F4), "shape must be a list", False),
    ("shape_bool", framed(one(shape=[True]), F4), "shape must be a list", False),
    ("shape_negative", framed(one(shape=[-1]), F4), "shape must be a list", False),
    ("shape_minus_zero", framed(OK_BYTES.replace(b"[1]", b"[-0]"), F4), "shape must be a list", False),
    ("shape_nested", framed(one(shape=[[1]]), F4), "shape must be a list", False),
    ("shape_beyond_64_bits", framed(one(shape=[0, 2 ** 70], data_offsets=[0, 0])), "shape must be a list", False),
    ("shape_zero_huge", framed(one(shape=[0, 2 ** 50], data_offsets=[0, 0])), "more than 2\\*\\*40", True),
    ("shape_zero_overflow", framed(one(shape=[0, 2 ** 40, 2 ** 40], data_offsets=[0, 0])), "more than 2\\*\\*40",
     True),
    ("shape_40_dims", framed(one(shape=[1] * 40), F4), "40 dimensions", True),
    ("shape_lies_about_size", framed(one(shape=[2]), F4), "do not match its shape", False),
    ("shape_huge_with_data", framed(one(shape=[2 ** 30], data_offsets=[0, 2 ** 32]), F4), "truncated", False),
    # data_offsets
    ("offsets_string", framed(one(data_offsets="ab"), F4), "data_offsets must be", False),
    ("offsets_float", framed(one(data_offsets=[0.0, 4.0]), F4), "data_offsets must be", False),
    ("offsets_bool", framed(one(data_offsets=[False, 4]), F4), "data_offsets must be", False),
    ("offsets_three", framed(one(data_offsets=[0, 4, 8]), F4), "data_offsets must be", False),
    ("offsets_negative", framed(one(shape=[0], data_offsets=[-4, -4])), "data_offsets must be", False),
    ("offsets_null", framed(one(data_offsets=None), F4), "data_offsets must be", False),
    ("offsets_reversed", framed(one(shape=[0], data_offsets=[4, 0]), F4), "do not match its shape", False),
    ("offsets_beyond_data", framed(one(data_offsets=[4, 8]), F4), "truncated", False),
    ("offsets_gap", framed(one(data_offsets=[4, 8]), F4 + F4), "leaves a gap", False),
    ("offsets_overlap", framed({**one(), "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, F4),
     "overlaps", False),
    ("offsets_overlap_partial", framed({"v": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F4 + F4),
     "overlaps", False),
]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.safetensors"):
        old.unlink()
    for name, blob, _, _ in CASES:
        (OUT / f"{name}.safetensors").write_bytes(blob)
    print(f"wrote {len(CASES)} files to {OUT}")


if __name__ == "__main__":
    main()
