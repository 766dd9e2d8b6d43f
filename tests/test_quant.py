"""Weight-only quantization (int8, float16): kernels against the dequantized matmul, quality, the checkpoint."""
import numpy as np
import pytest

import npgpt
from npgpt.convert import convert_hf
from npgpt.errors import NpgptError
from npgpt.evaluate import perplexity
from npgpt.convert import quantize_model
from npgpt.quant import HalfWeight, Int8Weight, quantize_matrix, to_half

from conftest import CORPUS, run_cli
from test_hf import FIX


@pytest.mark.parametrize("n", [1, 3, 6, 16, 20])  # the kernels take 4 rows per pass, up to 16 rows; 20: BLAS
def test_int8_matmuls_equal_dequantized_matmul(n):
    rng = np.random.default_rng(0)
    w = quantize_matrix(rng.standard_normal((48, 80)).astype(np.float32), axis=1)
    x = rng.standard_normal((n, 48)).astype(np.float32)
    np.testing.assert_allclose(x @ w, x @ w.dequantize(), rtol=1e-4, atol=1e-4)
    e = quantize_matrix(rng.standard_normal((90, 48)).astype(np.float32), axis=0)  # an embedding / head
    np.testing.assert_allclose(x @ e.T, x @ e.dequantize().T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(e[[3, 5]], e.dequantize()[[3, 5]])


@pytest.mark.parametrize("n", [1, 3, 20])
def test_half_matmuls_equal_widened_matmul(n):
    """The float16 kernels (decode: n <= 8 rows) and the blocked BLAS path (n > 8) against float32
    arithmetic on the widened matrix, which must equal NumPy's own float16 -> float32 conversion."""
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((49, 81)).astype(np.float32)
    raw[0, :5] = [0.0, -0.0, 1e-6, -3e-5, 65504.0]  # zeros, subnormals, the largest half
    w = HalfWeight(to_half(raw.T), transposed=True)  # a linear [49, 81], stored (out, in)
    assert w.shape == (49, 81) and w.h[2, 0] != 0 and w.h[3, 0] < 0 and w.h[4, 0] == 65504
    x = rng.standard_normal((n, 49)).astype(np.float32)
    np.testing.assert_array_equal(w.dequantize(), w.h.astype(np.float32).T)
    np.testing.assert_allclose(x @ w, x @ w.dequantize(), rtol=1e-5, atol=1e-2)  # 65504 * x: large products
    one = np.zeros((1, 49), np.float32)
    one[0, 0] = 1.0  # row 0 exactly, through the kernel: subnormals and signs widened bit for bit
    np.testing.assert_array_equal((one @ w)[0], w.h[:, 0].astype(np.float32))
    one[0, 0] = 1e6  # large inputs: the kernel widens the weights, x stays as it is
    np.testing.assert_allclose((one @ w)[0], 1e6 * w.h[:, 0].astype(np.float32), rtol=1e-6)
    e = HalfWeight(to_half(rng.standard_normal((90, 49)).astype(np.float32)))  # an embedding / head
    np.testing.assert_allclose(x @ e.T, x @ e.dequantize().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(e[[3, 5]], e.dequantize()[[3, 5]])
    with pytest.raises(NpgptError, match="do not fit float16"):
        to_half(np.array([1e5], np.float32))


def test_fp16_gpt2_fixture_logits_within_1e_2_of_fp32(tmp_path):
    fp = convert_hf(FIX / "l2h4c32", tmp_path / "fp32")
    r = quantize_model(fp, tmp_path / "fp16", format="fp16")
    assert r["bytes"] < 0.6 * r["fp32_bytes"]
    a, b = npgpt.load(fp), npgpt.load(tmp_path / "fp16")
    assert isinstance(b.params["h.0.mlp.c_fc.weight"], HalfWeight) and b.quantized
    idx = np.random.default_rng(0).integers(0, a.config.vocab_size, (2, 24))
    np.testing.assert_allclose(b.forward(idx), a.forward(idx), atol=1e-2)
    from npgpt.model import KVCache  # the decode path (float16 kernels) too
    ka, kb = KVCache(a.config, 2), KVCache(b.config, 2)
    a.forward(idx[:, :20], kv=ka), b.forward(idx[:, :20], kv=kb)
    np.testing.assert_allclose(b.forward(idx[:, 20:21], kv=kb), a.forward(idx[:, 20:21], kv=ka), atol=1e-2)
    np.testing.assert_array_equal(npgpt.generate(a, [5, 6, 7], 10, temperature=0)[0],
                                  npgpt.generate(b, [5, 6, 7], 10, temperature=0)[0])
    r = run_cli("quantize", "--model", fp, "--out", tmp_path / "cli16", "--format", "fp16")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "To be", "--model", tmp_path / "cli16", "-n", "8", "--seed", "0")
    assert r.returncode == 0 and r.stdout.startswith("To be"), r.stderr


def test_quantization_error_is_per_channel():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32) * np.linspace(0.01, 10, 32, dtype=np.float32)
    q = quantize_matrix(w, axis=1)
    assert q.q.dtype == np.int8 and q.scale.shape == (32,)
    err = np.abs(q.dequantize() - w).max(axis=0)
    assert np.all(err <= q.scale / 2 + 1e-6)  # rounding error at most half a step of its own channel


def test_quantized_gpt2_fixture_perplexity_within_one_percent(tmp_path):
    fp = convert_hf(FIX / "l2h4c32", tmp_path / "fp32")
    r = quantize_model(fp, tmp_path / "int8")
    assert r["bytes"] < 0.4 * r["fp32_bytes"]
    a, b = npgpt.load(fp), npgpt.load(tmp_path / "int8")
    assert isinstance(b.params["h.0.mlp.c_fc.weight"], Int8Weight)
    text = CORPUS.read_text()[20_000:24_000]
    pa, pb = perplexity(a, text, stride=32)["perplexity"], perplexity(b, text, stride=32)["perplexity"]
    assert abs(pb - pa) / pa < 0.01, (pa, pb)
    np.testing.assert_array_equal(npgpt.generate(a, [5, 6, 7], 10, temperature=0)[0][:6],
                                  npgpt.generate(b, [5, 6, 7], 10, temperature=0)[0][:6])


def test_cli_quantize_then_generate_and_refusals(tmp_path):
    fp = convert_hf(FIX / "l2h4c32", tmp_path / "fp32")
    r = run_cli("quantize", "--model", fp, "--out", tmp_path / "int8")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "To be", "--model", tmp_path / "int8", "-n", "8", "--seed", "0")
    assert r.returncode == 0 and r.stdout.startswith("To be"), r.stderr
    r = run_cli("quantize", "--model", tmp_path / "int8", "--out", tmp_path / "again")
    assert r.returncode != 0 and "already quantized" in r.stderr
    with pytest.raises(NpgptError, match="cannot be trained"):
        npgpt.load(tmp_path / "int8").zero_grad()
    with pytest.raises(NpgptError, match="cannot be exported"):
        from npgpt.convert import export_hf
        export_hf(tmp_path / "int8", tmp_path / "hf")


def test_quantized_shipped_model_perplexity_within_one_percent(tmp_path):
    from npgpt.assets import default_model_dir
    quantize_model(default_model_dir(), tmp_path / "int8")
    text = CORPUS.read_text()
    val = text[int(len(text) * 0.9):][:12_000]  # held-out text
    a, b = npgpt.load(default_model_dir()), npgpt.load(tmp_path / "int8")
    pa = perplexity(a, val, stride=64)["perplexity"]
    pb = perplexity(b, val, stride=64)["perplexity"]
    assert abs(pb - pa) / pa < 0.01, (pa, pb)


def test_int8_checkpoints_of_the_earlier_layout_still_load(tmp_path):
    """Before "int8-rows", linears were stored (in, out) with per-column scales ("int8-per-channel"):
    such a checkpoint loads and computes what the new layout computes."""
    from npgpt.checkpoint import write_config
    from npgpt.quant import quantized_names
    from npgpt.tensorfile import write_safetensors
    fp = convert_hf(FIX / "l2h4c32", tmp_path / "fp32")
    quantize_model(fp, tmp_path / "new")
    m = npgpt.load(fp)
    axes = quantized_names(m.shapes)
    tensors = []
    for name, _ in m.shapes:
        if name in axes:
            qw = quantize_matrix(m.params[name], axes[name])
            tensors += [(name + ".q", qw.q), (name + ".scale", qw.scale)]
        else:
            tensors.append((name, np.ascontiguousarray(m.params[name])))
    (tmp_path / "old").mkdir()
    write_safetensors(tmp_path / "old" / "model.safetensors", tensors, {"format": "npgpt"})
    write_config(tmp_path / "old", m.config, None, {"quantization": {"scheme": "int8-per-channel"}})
    old, new = npgpt.load(tmp_path / "old"), npgpt.load(tmp_path / "new")
    assert not new.params["h.0.mlp.c_fc.weight"].q.shape == old.params["h.0.mlp.c_fc.weight"].q.shape  # (out, in)
    x = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, 12))
    np.testing.assert_allclose(old.forward(x), new.forward(x), rtol=1e-5, atol=1e-5)
    assert new.fused_decode and not old.fused_decode  # (in, out) int8 keeps the layer-by-layer decode
    from npgpt.model import KVCache  # the decode kernels of both layouts
    ko, kn = KVCache(old.config, 1), KVCache(new.config, 1)
    old.forward(x[:, :11], kv=ko), new.forward(x[:, :11], kv=kn)
    np.testing.assert_allclose(old.forward(x[:, 11:], kv=ko), new.forward(x[:, 11:], kv=kn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_quantized_decode_runs_fused_and_equals_the_layer_by_layer_decode(tmp_path, monkeypatch, fmt):
    """Quantized weights stored (out, in) decode one token per row through kernels.decode_layer (a
    block per call, the quantized products on the parallel kernels); the same steps layer by layer, with
    left padding, give the same logits."""
    from npgpt.model import GPT, KVCache
    fp = convert_hf(FIX / "l2h4c32", tmp_path / "fp32")
    quantize_model(fp, tmp_path / fmt, format=fmt)
    m = npgpt.load(tmp_path / fmt)
    assert m.fused_decode
    idx = np.random.default_rng(1).integers(0, m.config.vocab_size, (3, 14))
    pad = np.array([0, 2, 5])

    def steps():
        kv = KVCache(m.config, 3)
        kv.pad = pad
        out = [m.forward(idx[:, :9], kv=kv)]
        return np.concatenate(out + [m.forward(idx[:, t:t + 1], kv=kv) for t in range(9, 14)], axis=1)
    fused = steps()
    monkeypatch.setattr(GPT, "fused_decode", property(lambda self: False))
    for b in range(3):
        np.testing.assert_allclose(fused[b, pad[b]:], steps()[b, pad[b]:], rtol=1e-5, atol=1e-5)
