"""Review section C: embedding_backward honours left padding (and the model refuses to keep activations
with padding), and Int8Weight's BLAS path dequantizes in blocks, never the whole matrix at once."""
import numpy as np
import pytest

from npgpt import layers as L, quant
from npgpt.config import GPTConfig
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.quant import Int8Weight, quantize_matrix

from conftest import numeric_grad


def test_embedding_backward_with_left_padding_matches_finite_differences():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 5, (3, 4))
    wte, wpe = rng.standard_normal((5, 3)), rng.standard_normal((8, 3))
    up = rng.standard_normal((3, 4, 3))
    pad = np.array([2, 0, 1])
    for pos0 in (0, 3):
        f = lambda: float((L.embedding_forward(idx, wte, wpe, pos0, pad) * up).sum())  # noqa: E731
        dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
        L.embedding_backward(up, idx, dwte, dwpe, pos0, pad)
        np.testing.assert_allclose(dwte, numeric_grad(f, wte), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(dwpe, numeric_grad(f, wpe), rtol=1e-6, atol=1e-8)


def test_activations_for_a_backward_refuse_padding():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11), seed=0)
    idx = np.array([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(NpgptError, match="inference only"):
        m._body(idx, acts={"idx": idx, "layers": [], "rng": None}, pad=np.array([1, 0]))
    assert m._body(idx, pad=np.array([1, 0])).shape == (2, 3, 8)  # inference with padding still works


@pytest.mark.parametrize("axis,shape", [(1, (48, 80)), (0, (90, 48))])
def test_int8_prefill_dequantizes_in_blocks(monkeypatch, axis, shape):
    rng = np.random.default_rng(1)
    w = quantize_matrix(rng.standard_normal(shape).astype(np.float32), axis)
    cases = []
    for W in (w, w.T):  # a linear weight / the tied head, and the other orientation
        x = rng.standard_normal((20, W.shape[0])).astype(np.float32)  # 20 rows > _SMALL: the BLAS path
        cases.append((W, x, x @ W.dequantize()))

    def whole(self):
        raise AssertionError("the whole matrix was dequantized")
    monkeypatch.setattr(Int8Weight, "dequantize", whole)
    monkeypatch.setattr(quant, "_BLOCK", 500)  # several blocks even for these small matrices
    for W, x, want in cases:
        got = x @ W
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
