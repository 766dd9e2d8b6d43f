"""convert-weights and export on bad input: HF config.json values of the wrong type, a config that
claims more layers than the weights hold, shard paths that leave the source dir; and what export
writes for a model without <|endoftext|> (null BOS/EOS), with vocab.json/merges.txt written atomically."""
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt
from conftest import require, run_cli
from npgpt.checkpoint import save_checkpoint
from npgpt.tensorfile import load_safetensors, write_safetensors
from npgpt.config import preset
from npgpt.convert import convert_hf, export_hf, hf_config_to_npgpt
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.tokenizer import Tokenizer

FIX = Path(__file__).resolve().parent / "fixtures" / "hf" / "l2h4c32"
HF = json.loads((FIX / "config.json").read_text())


# ---------------------------------------------------------------- config.json values
@pytest.mark.parametrize("key,value,match", [
    ("n_layer", None, "n_layer must be an integer >= 1, got null"),
    ("n_layer", "two", 'n_layer must be an integer >= 1, got "two"'),
    ("n_layer", -2, "n_layer must be an integer >= 1, got -2"),
    ("n_layer", 0, "n_layer must be an integer"),
    ("n_layer", 2.5, "n_layer must be an integer"),
    ("n_layer", 2.0, "n_layer must be an integer"),
    ("n_layer", True, "n_layer must be an integer"),
    ("n_layer", [2], "n_layer must be an integer"),
    ("n_head", None, "n_head must be an integer"),
    ("n_embd", "32", "n_embd must be an integer"),
    ("vocab_size", {"n": 300}, "vocab_size must be an integer"),
    ("n_positions", None, "n_positions must be an integer"),
    ("n_inner", "128", "n_inner must be an integer"),
    ("n_inner", -1, "n_inner must be an integer"),
    ("layer_norm_epsilon", None, "layer_norm_epsilon must be a finite number > 0, got null"),
    ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a finite number"),
    ("layer_norm_epsilon", 0, "layer_norm_epsilon must be a finite number > 0"),
    ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon must be a finite number > 0, got NaN"),
    ("initializer_range", float("inf"), "initializer_range must be a finite number >= 0"),
    ("initializer_range", None, "initializer_range must be a finite number"),
    ("scale_attn_weights", None, "scale_attn_weights must be true or false"),
    ("add_cross_attention", "false", "add_cross_attention must be true or false"),
    ("activation_function", ["gelu_new"], "activation_function .* is not supported"),
    ("model_type", None, "model_type None is neither GPT-2 nor GPT-Neo"),
])
def test_bad_config_values_are_one_line_errors(key, value, match):
    with pytest.raises(NpgptError, match=match) as e:
        hf_config_to_npgpt({**HF, key: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["n_layer", "n_head", "n_embd", "vocab_size"])
def test_missing_required_key(key):
    hf = dict(HF)
    del hf[key]
    with pytest.raises(NpgptError, match=f"config.json lacks '{key}'"):
        hf_config_to_npgpt(hf)


def test_config_defaults_and_nulls_that_mean_default():
    cfg = hf_config_to_npgpt({k: v for k, v in HF.items() if k not in ("n_positions", "layer_norm_epsilon")})
    assert cfg.block_size == 1024 and cfg.layer_norm_eps == 1e-5 and cfg.n_inner == 0  # n_inner: null
    assert hf_config_to_npgpt({**HF, "n_ctx": 77, "n_positions": 64}).block_size == 64
    assert hf_config_to_npgpt({**{k: v for k, v in HF.items() if k != "n_positions"}, "n_ctx": 77}).block_size == 77


def test_config_not_an_object():
    with pytest.raises(NpgptError, match="not a JSON object"):
        hf_config_to_npgpt([HF])


def hf_dir(tmp_path, config=None, name="src") -> Path:
    d = tmp_path / name
    shutil.copytree(FIX, d)
    (d / "expected.safetensors").unlink()
    if config is not None:
        (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


@pytest.mark.parametrize("config", ['{"n_layer": null}', json.dumps({**HF, "n_layer": "two"}),
                                    json.dumps({**HF, "layer_norm_epsilon": None}), '[1, 2]',
                                    json.dumps(HF).replace('"initializer_range": 0.02', '"initializer_range": NaN'),
                                    "[" * 100_000 + "]" * 100_000],
                         ids=["only_null_n_layer", "string_n_layer", "null_eps", "array", "nan", "deep"])
def test_cli_bad_config_is_one_line(tmp_path, config):
    r = run_cli("convert-weights", hf_dir(tmp_path, config), tmp_path / "out")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "config.json" in r.stderr, r.stderr


def test_huge_n_layer_fails_fast(tmp_path):
    """n_layer is checked against the layers in the weights before a shape is listed per layer."""
    src = hf_dir(tmp_path, {**HF, "n_layer": 100_000_000})
    t0 = time.monotonic()
    r = run_cli("convert-weights", src, tmp_path / "out", timeout=60)
    assert time.monotonic() - t0 < 30
    assert r.returncode == 1 and r.stderr.strip().endswith("n_layer=100000000, but the weights hold 2 layers"), r.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_n_layer_must_match_the_weights(tmp_path, n):
    with pytest.raises(NpgptError, match=f"n_layer={n}, but the weights hold 2 layers"):
        convert_hf(hf_dir(tmp_path, {**HF, "n_layer": n}), tmp_path / "out")


# ---------------------------------------------------------------- sharded checkpoints
def sharded(tmp_path, shard_names=("model-1.safetensors", "model-2.safetensors"), name="src") -> Path:
    """The fixture split into two shards (first tensors / the rest) with a model.safetensors.index.json."""
    d = hf_dir(tmp_path, name=name)
    tensors, _ = load_safetensors(d / "model.safetensors", mmap=False)
    (d / "model.safetensors").unlink()
    names = list(tensors)
    half = {shard_names[0]: names[:5], shard_names[1]: names[5:]}
    weight_map = {}
    for shard, keys in half.items():
        write_safetensors(os.path.normpath(d / shard), {k: tensors[k] for k in keys})  # wherever it points
        weight_map.update({k: shard for k in keys})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_sharded_checkpoint_converts(tmp_path):
    out = convert_hf(sharded(tmp_path), tmp_path / "out")
    plain = convert_hf(hf_dir(tmp_path, name="plain"), tmp_path / "out2")
    np.testing.assert_array_equal(npgpt.load(out).flat, npgpt.load(plain).flat)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_shard_path_cannot_leave_the_dir(tmp_path, bad):
    src = sharded(tmp_path, ("model-1.safetensors", bad))
    assert (tmp_path / "outside.safetensors").is_file()  # the file exists: only the name is refused
    with pytest.raises(NpgptError, match="is not a file inside"):
        convert_hf(src, tmp_path / "out")


def test_absolute_shard_path_is_refused(tmp_path):
    src = sharded(tmp_path, ("model-1.safetensors", str(tmp_path / "abs.safetensors")))
    with pytest.raises(NpgptError, match="is not a file inside"):
        convert_hf(src, tmp_path / "out")


def test_shard_symlink_out_of_the_dir_is_refused(tmp_path):
    src = sharded(tmp_path)
    (src / "model-2.safetensors").rename(tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", src / "model-2.safetensors")
    with pytest.raises(NpgptError, match="links to .*elsewhere.safetensors, outside"):
        convert_hf(src, tmp_path / "out")
    os.unlink(src / "model-2.safetensors")  # a link that stays inside the dir is fine
    (tmp_path / "elsewhere.safetensors").rename(src / "real-2.safetensors")
    os.symlink("real-2.safetensors", src / "model-2.safetensors")
    convert_hf(src, tmp_path / "out")


def test_hub_cache_layout_is_allowed(tmp_path):
    """Hugging Face's cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that link is fine."""
    repo = tmp_path / "models--x--gpt2"
    snap = repo / "snapshots" / "abc123"
    src = sharded(tmp_path, name="flat")
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in src.iterdir():
        (repo / "blobs" / p.name).write_bytes(p.read_bytes())
        os.symlink(f"../../blobs/{p.name}", snap / p.name)
    convert_hf(snap, tmp_path / "out")


@pytest.mark.parametrize("index,match", [
    ('{"weight_map": ["model-1.safetensors"]}', "weight_map must map"),
    ('{"weight_map": {}}', "weight_map must map"),
    ('{"weight_map": {"wte.weight": 5}}', "not a valid safetensors index"),
    ('{"weight_map": {"wte.weight": ["model-1.safetensors"]}}', "not a valid safetensors index"),
    ('{"weight_map": {"wte.weight": ""}}', "is not a file inside"),
    ('{"weight_map": {"wte.weight": "a\\u0000b"}}', "is not a file inside"),
    ('[1]', "not a valid safetensors index"),
    ('{"weight_map": {"wte.weight": "missing.safetensors"}}', "is missing"),
])
def test_bad_index_is_one_line(tmp_path, index, match):
    src = sharded(tmp_path)
    (src / "model.safetensors.index.json").write_text(index)
    with pytest.raises(NpgptError, match=match) as e:
        convert_hf(src, tmp_path / "out")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- export
def char_checkpoint(d: Path) -> GPT:
    text = "abcdefghijklmnopqrstuvwxyz ,.\n"
    tok = Tokenizer.train_char([text])
    m = GPT(dataclasses.replace(preset("nano"), vocab_size=tok.vocab_size), seed=3, tokenizer=tok)
    save_checkpoint(d, m)
    return m


def test_export_without_end_of_text_declares_no_bos_eos(tmp_path):
    """A char model has no <|endoftext|>: bos/eos are null, never an ordinary token such as 'z'."""
    char_checkpoint(tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert not {"bos_token", "eos_token", "unk_token"} & set(tc)
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not (tmp_path / "hf" / "vocab.json").exists()


def test_export_with_end_of_text_declares_it(tmp_path):
    tok = Tokenizer.train_bpe(["hello world, hello there\n" * 20], 270)
    m = GPT(dataclasses.replace(preset("nano"), vocab_size=272), seed=1, tokenizer=tok)
    save_checkpoint(tmp_path / "ck", m)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == tok.eot_id
    tc = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|endoftext|>" and tc["tokenizer_class"] == "GPT2TokenizerFast"


def test_export_writes_bpe_files_atomically_and_as_the_library_does(tmp_path, monkeypatch):
    """vocab.json and merges.txt go through atomic_write_bytes (tokenizers' model.save rewrites them in
    place), with the bytes model.save would write."""
    import npgpt.convert as convert
    written = []
    real = convert.atomic_write_bytes

    def spy(path, data):
        written.append(Path(path).name)
        real(path, data)
    monkeypatch.setattr(convert, "atomic_write_bytes", spy)
    convert_hf(FIX, tmp_path / "np")
    export_hf(tmp_path / "np", tmp_path / "hf")
    assert {"vocab.json", "merges.txt"} <= set(written)
    tok = npgpt.load(tmp_path / "np").tokenizer
    (tmp_path / "lib").mkdir()
    tok.tk.model.save(str(tmp_path / "lib"))
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes(), name
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == (FIX / "vocab.json").read_bytes()


def test_transformers_loads_a_char_export(tmp_path):
    require("transformers")
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel
    m = char_checkpoint(tmp_path / "ck")
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.eos_token_id is None and hf.config.bos_token_id is None
    text = "hello world, z z."
    ids = m.tokenizer.encode(text)
    htok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert htok(text)["input_ids"] == ids and htok.decode(ids) == text
    with torch.no_grad():
        theirs = hf(torch.tensor([ids[:16]])).logits.numpy()
        out = hf.generate(torch.tensor([ids[:4]]), max_new_tokens=12, do_sample=False)
    assert np.abs(theirs - m.forward(np.array([ids[:16]]))).max() <= 1e-4
    assert out.shape[1] == 16  # no EOS to stop at: the full length, whatever 'z's come out
