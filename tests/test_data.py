"""prepare -> token files; seeded random-window batches."""
import json

import numpy as np
import pytest

from npgpt.data import TokenData, prepare, read_text
from npgpt.errors import NpgptError


def test_prepare_char_split_and_meta(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 100)
    meta = prepare([src], tmp_path / "d", "char", val_fraction=0.1)
    assert meta["train_tokens"] == 900 and meta["val_tokens"] == 100 and meta["dtype"] == "uint16"
    d = TokenData(tmp_path / "d")
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    assert d.tokenizer.decode(train[:10]) == "abcdefghij"
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["vocab_size"] == 10


def test_prepare_joins_inputs_and_normalises_newlines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    assert read_text(tmp_path / "a.txt") == "one\ntwo\nthree\n"
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "d", "char", val_fraction=0.0)
    d = TokenData(tmp_path / "d")
    assert d.tokenizer.decode(d.tokens("train")) == "one\ntwo\nthree\nfour\n"


def test_prepare_jsonl_documents_end_in_endoftext(tmp_path):
    """A .jsonl input is documents: each is followed by the <|endoftext|> control id, a document's own
    "<|endoftext|>" text stays plain text, and plain files around it are joined as before."""
    docs = ["first review.\n\nIt was fine.", "second <|endoftext|> one", "third"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in docs))
    (tmp_path / "a.txt").write_text("plain text here\n" * 20)
    prepare([tmp_path / "a.txt", tmp_path / "d.jsonl"], tmp_path / "d", "bpe:300", val_fraction=0.0)
    d = TokenData(tmp_path / "d")
    ids = d.tokens("train").tolist()
    eot = d.tokenizer.eot_id
    assert ids.count(eot) == 3 and ids[-1] == eot
    first = ids.index(eot)
    assert d.tokenizer.decode(ids[:first]) == "plain text here\n" * 20 + docs[0]
    rest = ids[first + 1:]
    parts, cur = [], []
    for i in rest:
        if i == eot:
            parts.append(d.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert parts == docs[1:]


@pytest.mark.parametrize("content, match", [
    ('{"text": 3}\n', r"d\.jsonl:1: \"text\" must be a string"),
    ('{"body": "x"}\n', r"d\.jsonl:1: missing field 'text'"),
    ('not json\n', r"d\.jsonl:1: not valid JSON"),
])
def test_prepare_bad_jsonl_documents(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(NpgptError, match=match):
        prepare([tmp_path / "d.jsonl"], tmp_path / "d", "bpe:300")
    assert not (tmp_path / "d").exists()


def test_prepare_jsonl_needs_an_endoftext_token(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises(NpgptError, match="<\\|endoftext\\|>"):
        prepare([tmp_path / "d.jsonl"], tmp_path / "d", "char")


def test_prepare_uint32_for_large_vocab(tmp_path):
    from npgpt.tokenizer import Tokenizer
    src = tmp_path / "a.txt"
    src.write_text("hello world " * 100)
    tok = Tokenizer.train_char(["".join(chr(0x20000 + i) for i in range(70000)) + "hello world "])
    meta = prepare([src], tmp_path / "d", tok)
    assert meta["dtype"] == "uint32"
    d = TokenData(tmp_path / "d")
    assert d.tokenizer.decode(d.tokens("train")[:11]) == "hello world"


def test_batches_are_seeded_windows(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("".join(chr(97 + i % 26) for i in range(2000)))
    prepare([src], tmp_path / "d", "char")
    d = TokenData(tmp_path / "d")
    x1, y1 = d.batch("train", 4, 16, np.random.default_rng(0))
    x2, y2 = d.batch("train", 4, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == (4, 16) and x1.dtype == np.int64
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    assert np.all((y1 - x1) % 26 == 1)  # consecutive letters: y is x shifted by one


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"ok\xff\xfe", "not valid UTF-8")])
def test_bad_corpus(tmp_path, content, match):
    src = tmp_path / "a.txt"
    src.write_bytes(content)
    with pytest.raises(NpgptError, match=match):
        prepare([src], tmp_path / "d", "char")
    assert not (tmp_path / "d").exists()


def test_missing_corpus_and_existing_out(tmp_path):
    with pytest.raises(NpgptError, match="not found"):
        prepare([tmp_path / "nope.txt"], tmp_path / "d")
    src = tmp_path / "a.txt"
    src.write_text("abc" * 100)
    prepare([src], tmp_path / "d")
    with pytest.raises(NpgptError, match="--force"):
        prepare([src], tmp_path / "d")
    prepare([src], tmp_path / "d", force=True)


def _rss_kb():
    """File-backed resident memory of this process (mapped pages of files such as token files)."""
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssFile"))


def test_sampling_does_not_grow_resident_memory(tmp_path):
    """Many batches over a 64 MB token file: touched pages must not pile up in this process's RSS."""
    d = tmp_path / "d"
    d.mkdir()
    n = 32 * 1024 * 1024
    np.arange(n, dtype=np.uint32).astype(np.uint16).tofile(d / "train.bin")
    np.zeros(1000, np.uint16).tofile(d / "val.bin")
    from npgpt.tokenizer import Tokenizer
    Tokenizer.train_char(["ab"]).save(d)
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": 65536, "dtype": "uint16"}))
    data = TokenData(d)
    rng = np.random.default_rng(0)
    data.batch("train", 64, 1024, rng)
    before = _rss_kb()
    for _ in range(3000):  # ~200k windows of 512 bytes: would touch most of the file's pages
        data.batch("train", 64, 1024, rng)
    grew = _rss_kb() - before
    assert grew < 8 * 1024, grew  # far below the 64 MB a kept map would accumulate
