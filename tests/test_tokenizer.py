"""Tokenizers: char-level, trained byte-level BPE, GPT-2's own files; save/load inside a dir."""
import pytest

from npgpt.errors import NpgptError
from npgpt.tokenizer import Tokenizer, make_tokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All:  Speak, speak.\r\n\té"


def test_char_roundtrip_and_sorted_ids(tmp_path):
    tok = Tokenizer.train_char([TEXT])
    chars = sorted(set(TEXT))
    assert tok.vocab_size == len(chars)
    ids = tok.encode(TEXT)
    assert ids == [chars.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path, "char")
    assert again.encode(TEXT) == ids and again.decode(ids) == TEXT


def test_char_unknown_character_is_a_clear_error():
    tok = Tokenizer.train_char(["abc"])
    with pytest.raises(NpgptError, match="'z'"):
        tok.encode("abz")


def test_encode_corpus_equals_encode():
    tok = Tokenizer.gpt2()
    text = ("Hello world!\n  indented line\n\nNew paragraph, it's 2026.\n" * 50)
    assert tok.encode_corpus(text, chunk_chars=100) == tok.encode(text)


def test_bpe_train_roundtrip(tmp_path):
    corpus = [TEXT * 20, "the quick brown fox jumps over the lazy dog " * 30]
    tok = make_tokenizer("bpe:300", corpus)
    assert tok.kind == "bpe" and tok.vocab_size <= 300
    s = "the quick fox said: Speak! 😀 日本"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")  # merges happened
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path, "bpe").encode(s) == tok.encode(s)


def test_gpt2_known_ids():
    tok = Tokenizer.gpt2()
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("The dog") == [464, 3290]
    # the special token's text is plain text (tiktoken's encode_ordinary); only templates insert 50256
    assert tok.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.eot_id == 50256 and tok.decode([50256]) == "<|endoftext|>"
    s = "It's 3.14 — emoji 😀, CJK 日本語,   spaces\n\n"
    assert tok.decode(tok.encode(s)) == s


def test_gpt2_split_multibyte_decodes_without_crash():
    tok = Tokenizer.gpt2()
    ids = tok.encode("😀")
    assert len(ids) > 1
    assert "\ufffd" in tok.decode(ids[:1])


def test_bad_spec():
    with pytest.raises(NpgptError, match="unknown tokenizer"):
        make_tokenizer("words", ["x"])
    with pytest.raises(NpgptError, match="257"):
        make_tokenizer("bpe:100", ["x"])
