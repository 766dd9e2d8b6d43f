"""Property tests (hypothesis): tokenizers round-trip any text, special-token strings included, without
ever producing a control id; sampling settings either work or raise NpgptError.

Each property runs twice: a few derandomized examples in the normal suite, and a long campaign marked
`fuzz` (`make fuzz`; NPGPT_FUZZ_EXAMPLES examples per round, see fuzzing.py).
"""
import functools
import os
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from npgpt.chat import CHAT_SPECIALS
from npgpt.errors import NpgptError
from npgpt.finetune import SPECIALS
from npgpt.sampling import sample_next
from npgpt.tokenizer import EOT, Tokenizer

from fuzzing import campaign, fuzz_settings, quick_settings

SPECIAL_STRINGS = [*CHAT_SPECIALS, *SPECIALS, EOT, "<|", "|>", "<|end", "end|>"]
# arbitrary (surrogate-free) unicode with special-token strings spliced in
TEXT = st.lists(st.one_of(st.text(), st.sampled_from(SPECIAL_STRINGS)), max_size=8).map("".join)


def with_specials(tok: Tokenizer) -> Tokenizer:
    """`tok` with every chat and GPT-1 control token added (as fine-tuning does)."""
    import tokenizers
    tk = tokenizers.Tokenizer.from_str(tok.tk.to_str())
    tk.add_special_tokens([*CHAT_SPECIALS, *SPECIALS])
    return Tokenizer(tk, tok.kind)


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str) -> Tokenizer:
    if kind == "bpe":
        corpus = ["It was the best of times, it was the worst of times. 日本語 😀 <|end|>" * 20]
        return with_specials(Tokenizer.train_bpe(corpus, 320))
    return with_specials(Tokenizer.gpt2())


@functools.lru_cache(maxsize=None)
def tiktoken_gpt2():
    """tiktoken's GPT-2 on the shipped files, or None when tiktoken is not installed."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        if os.environ.get("NPGPT_REQUIRE_REF"):  # CI installs it: a failed import must not pass silently
            raise
        return None
    from test_gpt2_tokenizer import _tiktoken_encoding
    return _tiktoken_encoding()


def controls(tok: Tokenizer) -> set[int]:
    return set(tok.tk.get_added_tokens_decoder())


# ---------------------------------------------------------------- the properties
def check_byte_level(kind: str, s: str):
    tok = tokenizer(kind)
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert not set(ids) & controls(tok)
    if kind == "gpt2" and tiktoken_gpt2() is not None:
        assert ids == tiktoken_gpt2().encode_ordinary(s)


@st.composite
def alphabet_and_text(draw):
    """A corpus (its characters are a char tokenizer's alphabet) and a text over that alphabet, with
    whole special strings spliced in when the alphabet can spell them."""
    corpus = draw(st.text(min_size=1, max_size=40) | st.sampled_from(["".join(SPECIAL_STRINGS) + "abc xyz"]))
    chars = sorted(set(corpus))
    pieces = [st.text(alphabet=chars, max_size=10)]
    spellable = [s for s in SPECIAL_STRINGS if set(s) <= set(chars)]
    if spellable:
        pieces.append(st.sampled_from(spellable))
    return corpus, draw(st.lists(st.one_of(*pieces), max_size=6).map("".join))


def check_char(corpus: str, s: str):
    tok = with_specials(Tokenizer.train_char([corpus]))
    ids = tok.encode(s)
    assert ids == [tok.tk.token_to_id(c) for c in s]  # one id per character, never a control id
    assert tok.decode(ids) == s
    assert not set(ids) & controls(tok)


LOGITS = st.lists(st.floats(allow_nan=False, min_value=-1e6, max_value=1e6) | st.just(-math.inf),
                  min_size=1, max_size=12)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def sampling_case(draw):
    row = draw(LOGITS)
    return dict(
        logits=np.array([row]),
        temperature=draw(ANY_FLOAT | st.sampled_from([0.0, 1e-320, 1.0])),
        top_k=draw(st.none() | st.integers(-3, 15)),
        top_p=draw(st.none() | ANY_FLOAT | st.sampled_from([1.0, 1e-9])),
        repetition_penalty=draw(ANY_FLOAT | st.just(1.0)),
        seen=np.array([draw(st.lists(st.booleans(), min_size=len(row), max_size=len(row)))]),
        seed=draw(st.integers(0, 2**32)),
    )


def check_sampling(case: dict):
    """Any setting either samples a token that has probability > 0, or raises NpgptError."""
    logits = case.pop("logits")
    rng = np.random.default_rng(case.pop("seed"))
    try:
        out = sample_next(logits, rng, **case)
    except NpgptError:
        return
    # what was accepted is valid
    for name in ("temperature", "repetition_penalty"):
        assert math.isfinite(case[name])
    assert case["temperature"] >= 0 and case["repetition_penalty"] > 0
    assert case["top_p"] is None or 0 < case["top_p"] <= 1
    assert case["top_k"] is None or case["top_k"] >= 1
    assert out.shape == (1,) and 0 <= out[0] < logits.shape[1]
    assert logits[0, out[0]] > -math.inf  # a masked token is never drawn


# ---------------------------------------------------------------- quick versions (normal suite)
@quick_settings(60)
@given(TEXT)
def test_bpe_roundtrip_without_control_ids(s):
    check_byte_level("bpe", s)


@quick_settings(60)
@given(TEXT)
def test_gpt2_roundtrip_without_control_ids_equals_tiktoken(s):
    check_byte_level("gpt2", s)


@quick_settings(40)
@given(alphabet_and_text())
def test_char_roundtrip_on_its_own_alphabet(case):
    check_char(*case)


@quick_settings(150)
@given(sampling_case())
def test_sampling_settings_work_or_raise_npgpt_error(case):
    check_sampling(case)


# ---------------------------------------------------------------- long campaigns (make fuzz)
@pytest.mark.fuzz
@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_byte_level_roundtrip_fuzz(kind):
    campaign(fuzz_settings()(given(TEXT)(lambda s: check_byte_level(kind, s))))


@pytest.mark.fuzz
def test_char_roundtrip_fuzz():
    campaign(fuzz_settings()(given(alphabet_and_text())(lambda case: check_char(*case))))


@pytest.mark.fuzz
def test_sampling_settings_fuzz():
    campaign(fuzz_settings()(given(sampling_case())(check_sampling)))
