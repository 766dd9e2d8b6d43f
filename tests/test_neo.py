"""GPT-Neo checkpoints (GPT-3's alternating dense and banded layers as EleutherAI built them):
convert-weights matches transformers' GPTNeoForCausalLM on sequences longer than the window, export
writes a GPT-Neo dir back, bad configs are refused. Fixtures come from tests/make_neo_fixtures.py."""
import json
from pathlib import Path

import numpy as np
import pytest

import npgpt
import npgpt.layers as L
from npgpt.checkpoint import save_checkpoint
from npgpt.config import GPTConfig
from npgpt.convert import convert_hf, export_hf
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.tensorfile import load_safetensors

from conftest import require, run_cli
from test_hf import check_parity

FIX = Path(__file__).resolve().parent / "fixtures" / "neo"
SHAPES = sorted(p.name for p in FIX.iterdir()) if FIX.is_dir() else []


def expected(name):
    return load_safetensors(FIX / name / "expected.safetensors", mmap=False)[0]


def test_fixtures_present():
    assert len(SHAPES) >= 2


@pytest.mark.parametrize("tile", [128, 4])  # 4: banded tiles, a context (37) that is no multiple of the tile
@pytest.mark.parametrize("name", SHAPES)
def test_converted_gpt_neo_matches_transformers(monkeypatch, name, tile, tmp_path):
    monkeypatch.setattr(L, "ATTN_TILE", tile)
    hf = json.loads((FIX / name / "config.json").read_text())
    out = convert_hf(FIX / name, tmp_path / "np")
    model = npgpt.load(out)
    kinds = [k for group, n in hf["attention_types"] for k in group * n]
    assert [model.config.window(l) for l in range(model.config.n_layer)] == \
        [hf["window_size"] if k == "local" else 0 for k in kinds]
    assert model.config.block_size > hf["window_size"]
    check_parity(model, expected(name))  # logits 1e-4, loss 1e-5, greedy tokens exact


@pytest.mark.parametrize("name", SHAPES)
def test_gpt_neo_export_round_trip(name, tmp_path):
    a = convert_hf(FIX / name, tmp_path / "a")
    export_hf(a, tmp_path / "hf")
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    orig = json.loads((FIX / name / "config.json").read_text())
    for key in ("model_type", "num_layers", "num_heads", "hidden_size", "window_size", "max_position_embeddings",
                "vocab_size"):
        assert hf[key] == orig[key], key
    expand = lambda types: [k for group, n in types for k in group * n]  # noqa: E731
    assert expand(hf["attention_types"]) == expand(orig["attention_types"])
    b = convert_hf(tmp_path / "hf", tmp_path / "b")
    ma, mb = npgpt.load(a), npgpt.load(b)
    assert ma.config == mb.config
    np.testing.assert_allclose(mb.flat, ma.flat, rtol=1e-6, atol=1e-7)  # q's sqrt(d) out and back in


def test_live_gpt_neo_against_transformers(tmp_path):
    """A fresh random GPT-Neo from transformers (not the stored fixtures), and transformers loading a
    GPT-Neo dir that npgpt exported from its own banded model."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPTNeoConfig(vocab_size=97, max_position_embeddings=50, hidden_size=24, num_layers=4,
                                    num_heads=3, attention_types=[[["global", "local"], 2]], window_size=6,
                                    bos_token_id=96, eos_token_id=96)
    hf = transformers.GPTNeoForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = npgpt.load(convert_hf(tmp_path / "hf", tmp_path / "np"))
    x = np.random.default_rng(0).integers(0, 97, (2, 50))
    with torch.no_grad():
        want = hf(torch.from_numpy(x)).logits.numpy()
    assert np.abs(ours.forward(x) - want).max() <= 1e-4
    # npgpt's own banded model (q/k/v biases 0) -> GPT-Neo dir -> transformers
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=30, vocab_size=50, attn_window=4,
                      attn_pattern="BD"), seed=3)
    for l in range(2):
        m.params[f"h.{l}.attn.c_attn.bias"][:] = 0
    save_checkpoint(tmp_path / "mine", m)
    export_hf(tmp_path / "mine", tmp_path / "mine-hf")
    back = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path / "mine-hf").eval()
    x = np.random.default_rng(1).integers(0, 50, (1, 30))
    with torch.no_grad():
        assert np.abs(back(torch.from_numpy(x)).logits.numpy() - m.forward(x)).max() <= 1e-4


@pytest.mark.parametrize("change, match", [
    ({"attention_types": [[["global", "sparse"], 1]]}, "kinds other than global and local"),
    ({"attention_types": [[["global", "local"], 2]]}, "covers 4 layers, num_layers is 2"),
    ({"attention_types": "global"}, "attention_types must be"),
    ({"window_size": 0}, "window_size must be an integer >= 1"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
])
def test_bad_gpt_neo_configs_are_refused(tmp_path, change, match):
    import shutil
    d = tmp_path / "neo"
    shutil.copytree(FIX / SHAPES[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("convert-weights", d, tmp_path / "out")
    assert r.returncode != 0 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_banded_model_with_qkv_biases_is_not_exported(tmp_path):
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=30, vocab_size=50, attn_window=4,
                      attn_pattern="BD"), seed=3)
    m.params["h.1.attn.c_attn.bias"][:] = 0.5
    save_checkpoint(tmp_path / "mine", m)
    with pytest.raises(NpgptError, match="layer 1 has non-zero q/k/v biases"):
        export_hf(tmp_path / "mine", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
