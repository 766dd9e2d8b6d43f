"""Hugging Face GPT-2 checkpoints: convert-weights, parity with transformers, export round trip, and
refusal of bad checkpoints. Fixtures come from tests/make_hf_fixtures.py; live tests need transformers."""
import json
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.tensorfile import load_safetensors
from npgpt.convert import convert_hf, export_hf
from npgpt.errors import NpgptError
from npgpt.sampling import generate

from conftest import require, run_cli

FIX = Path(__file__).resolve().parent / "fixtures" / "hf"
SHAPES = sorted(p.name for p in FIX.iterdir()) if FIX.is_dir() else []


def test_fixtures_present():
    assert len(SHAPES) >= 3


def expected(name):
    return load_safetensors(FIX / name / "expected.safetensors", mmap=False)[0]


def check_parity(model, exp):
    """npgpt vs transformers' stored outputs: logits (abs 1e-4), loss (1e-5), greedy ids (exact)."""
    i = 0
    while f"prompt{i}" in exp:
        p = exp[f"prompt{i}"]
        logits = model.forward(p)
        assert np.abs(logits - exp[f"logits{i}"]).max() <= 1e-4, i
        loss = model.loss(p[:, :-1], p[:, 1:])
        assert abs(loss - float(exp[f"loss{i}"][0])) <= 1e-5, i
        i += 1
    assert i >= 3 and exp["prompt2"].shape[1] == model.config.block_size  # one prompt fills the context
    g = exp["greedy"]
    n0 = exp["prompt0"].shape[1]
    ours = generate(model, exp["prompt0"][0], g.shape[1] - n0, temperature=0)
    np.testing.assert_array_equal(ours, g)


@pytest.mark.parametrize("name", SHAPES)
def test_converted_fixture_matches_transformers(name, tmp_path):
    out = convert_hf(FIX / name, tmp_path / "np")
    model = npgpt.load(out)
    assert isinstance(model.flat, np.memmap)
    check_parity(model, expected(name))


@pytest.mark.parametrize("name", SHAPES)
def test_export_round_trip_gives_identical_tensors(name, tmp_path):
    convert_hf(FIX / name, tmp_path / "np")
    export_hf(tmp_path / "np", tmp_path / "hf")
    original = {}
    for f in sorted((FIX / name).glob("model*.safetensors")):
        original.update(load_safetensors(f)[0])
    back = load_safetensors(tmp_path / "hf" / "model.safetensors")[0]
    assert set(back) == {k for k in original if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    for k, v in back.items():
        np.testing.assert_array_equal(v, original[k].astype(np.float32), err_msg=k)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_layer"] == npgpt.load(tmp_path / "np").config.n_layer


def test_cli_convert_then_generate_with_tokenizer(tmp_path):
    r = run_cli("convert-weights", FIX / "l2h4c32", tmp_path / "np")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", "To be", "--model", tmp_path / "np", "-n", "10", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("To be") and len(r.stdout) > len("To be")
    r = run_cli("export", "--model", tmp_path / "np", "--format", "hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "hf").iterdir()}


# ---------------------------------------------------------------- bad checkpoints
def copy_fixture(tmp_path, name="l2h4c32"):
    d = tmp_path / "src"
    shutil.copytree(FIX / name, d)
    return d


def rewrite_header(path, edit):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def test_truncated_file(tmp_path):
    d = copy_fixture(tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-1000])
    with pytest.raises(NpgptError, match="truncated"):
        convert_hf(d, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_header_lying_about_sizes(tmp_path):
    d = copy_fixture(tmp_path)
    rewrite_header(d / "model.safetensors",
                   lambda h: h["transformer.wte.weight"].update(shape=[h["transformer.wte.weight"]["shape"][0], 16]))
    with pytest.raises(NpgptError, match="do not match its shape"):
        convert_hf(d, tmp_path / "out")


def test_missing_tensor(tmp_path):
    from npgpt.tensorfile import write_safetensors
    d = copy_fixture(tmp_path)
    t, _ = load_safetensors(d / "model.safetensors", mmap=False)
    del t["transformer.h.1.mlp.c_fc.weight"]
    write_safetensors(d / "model.safetensors", t)
    with pytest.raises(NpgptError, match="missing tensors: h.1.mlp.c_fc.weight"):
        convert_hf(d, tmp_path / "out")


def test_wrong_shape_for_config(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpgptError, match="has shape"):
        convert_hf(d, tmp_path / "out")


def test_pickle_is_refused_without_opening(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(FIX / "l2h4c32" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"this would be a pickle: never opened")
    with pytest.raises(NpgptError, match="never unpickles"):
        convert_hf(d, tmp_path / "out")


@pytest.mark.parametrize("key,value,match", [
    ("activation_function", "relu", "activation_function"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("model_type", "llama", "neither GPT-2 nor GPT-Neo"),
])
def test_unsupported_options_are_refused(tmp_path, key, value, match):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NpgptError, match=match):
        convert_hf(d, tmp_path / "out")


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    d = copy_fixture(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    r = run_cli("convert-weights", d, tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "safetensors" in r.stderr


def test_untied_head_is_refused(tmp_path):
    from npgpt.tensorfile import write_safetensors
    d = copy_fixture(tmp_path)
    t, _ = load_safetensors(d / "model.safetensors", mmap=False)
    t["lm_head.weight"] = t["transformer.wte.weight"] + 1
    write_safetensors(d / "model.safetensors", t)
    with pytest.raises(NpgptError, match="untied"):
        convert_hf(d, tmp_path / "out")
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()  # an explicit but tied head is fine
    write_safetensors(d / "model.safetensors", t)
    convert_hf(d, tmp_path / "out")


# ---------------------------------------------------------------- live, with transformers
@pytest.mark.parametrize("k", [0, 1])
def test_live_against_transformers(k, tmp_path):
    require("transformers")
    import torch
    from make_hf_fixtures import SHAPES as FIXTURE_SHAPES, build, prompts_for, reference_outputs
    torch.set_num_threads(1)
    kwargs = list(FIXTURE_SHAPES.values())[k][0]
    model = build(kwargs, seed=7 + k)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = npgpt.load(convert_hf(tmp_path / "hf", tmp_path / "np"))
    check_parity(ours, reference_outputs(model, kwargs, prompts_for(kwargs, seed=11 + k)))
    # and transformers loads our export with the same logits
    from transformers import GPT2LMHeadModel
    export_hf(tmp_path / "np", tmp_path / "back")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    idx = np.random.default_rng(k).integers(0, kwargs["vocab_size"], (2, 9))
    with torch.no_grad():
        theirs = back(torch.from_numpy(idx)).logits.numpy()
    assert np.abs(theirs - ours.forward(idx)).max() <= 1e-4


# ---------------------------------------------------------------- the real GPT-2, when available
@pytest.mark.skipif(not os.environ.get("NPGPT_GPT2_DIR"), reason="set NPGPT_GPT2_DIR to a real gpt2 checkpoint")
def test_golden_real_gpt2(tmp_path):
    model = npgpt.load(convert_hf(os.environ["NPGPT_GPT2_DIR"], tmp_path / "gpt2"))
    assert model.num_params == 124_439_808
    ids = generate(model, [464, 3290], 18, temperature=0)
    assert ids[0].tolist() == [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688,
                               27262, 13, 198, 198, 464, 3290]


# ---------------------------------------------------------------- perplexity
@pytest.mark.parametrize("stride", [24, 64])  # 64 == the context: the windows tile the text
def test_perplexity_matches_transformers_fixture(stride, tmp_path):
    from make_hf_fixtures import PPL_TEXT
    from npgpt.evaluate import perplexity
    model = npgpt.load(convert_hf(FIX / "l2h4c32", tmp_path / "np"))
    text = (Path(__file__).resolve().parent.parent / "corpora" / "tinyshakespeare.txt").read_text()[PPL_TEXT]
    r = perplexity(model, text, stride=stride)
    want = float(expected("l2h4c32")[f"ppl{stride}"][0])  # brute force, one transformers forward per token
    assert abs(r["perplexity"] - want) / want < 1e-4
    ids = model.tokenizer.encode(text)
    assert r["tokens"] == len(ids) - 1  # every token but the first, once
    # bits/byte divides the NLL of the scored tokens by their bytes: the text without its first token
    first = model.tokenizer.decode(ids[:1])
    assert text.startswith(first) and r["bytes"] == len(text.encode()) - len(first.encode())
    assert r["bits_per_byte"] == pytest.approx(r["nll"] * r["tokens"] / math.log(2) / r["bytes"])


@pytest.mark.parametrize("stride", [1, 17, 63, 64])
def test_perplexity_live_against_transformers(stride, tmp_path):
    require("transformers")
    import torch
    from make_hf_fixtures import SHAPES as FIXTURE_SHAPES, build, reference_perplexity
    from npgpt.evaluate import perplexity
    torch.set_num_threads(1)
    kwargs = FIXTURE_SHAPES["l2h4c32"][0]
    model = build(kwargs, seed=21)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = npgpt.load(convert_hf(tmp_path / "hf", tmp_path / "np"))
    ids = np.random.default_rng(stride).integers(0, kwargs["vocab_size"], 150)
    want, n = reference_perplexity(model, ids, stride)
    got = perplexity(ours, ids=ids, stride=stride)
    assert abs(got["perplexity"] - want) / want < 1e-4
    assert got["tokens"] == n == len(ids) - 1


def test_perplexity_scores_each_token_once_with_its_window_context():
    """Without transformers: a model whose logits at a position encode how much context it saw shows
    which window scored each target (an independent check of the window bookkeeping)."""
    from npgpt.evaluate import perplexity
    from make_hf_fixtures import window_start
    block, n = 8, 40

    class Probe:  # logits favour token (context length) so the NLL pins down the context used
        config = type("C", (), {"block_size": block})()

        def forward(self, x):
            T = x.shape[1]
            logits = np.zeros((1, T, 64), np.float32)
            logits[0, np.arange(T), np.arange(1, T + 1)] = 50.0  # position t has seen t + 1 tokens
            return logits

    for stride in (1, 3, 8):
        ids = np.array([j - window_start(j, block, stride) for j in range(n)])  # the context j should see
        ids[0] = 0
        r = perplexity(Probe(), ids=ids, stride=stride)
        assert r["tokens"] == n - 1
        assert r["nll"] < 1e-6, stride  # every target was scored with exactly the context it should have


def test_cli_eval_perplexity_json(tmp_path):
    convert_hf(FIX / "l2h4c32", tmp_path / "np")
    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.\n" * 5)
    r = run_cli("eval", "perplexity", tmp_path / "t.txt", "--model", tmp_path / "np", "--stride", "32", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["stride"] == 32 and d["context"] == 64 and d["perplexity"] > 1 and d["tokens"] > 0
    r = run_cli("eval", "perplexity", tmp_path / "t.txt", "--model", tmp_path / "np")
    assert r.returncode == 0 and r.stdout.startswith("perplexity ")
