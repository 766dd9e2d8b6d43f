"""A checkpoint's config.json and a run's state.json from a user: validated before anything is built from
them, so a lying or damaged file is one clear error, never a traceback or a hang."""
import json
import time

import pytest

import npgpt
from npgpt.config import GPTConfig, TrainConfig
from npgpt.errors import NpgptError
from npgpt.model import GPT
from npgpt.checkpoint import load_model, save_checkpoint

from conftest import run_cli


@pytest.fixture()
def ckpt(tmp_path):
    from npgpt.tokenizer import Tokenizer
    tok = Tokenizer.train_char(["abcdef"])
    save_checkpoint(tmp_path / "m", GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=6),
                                        tokenizer=tok))
    return tmp_path / "m"


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    ({"model__n_layer": 100_000_000}, "fewer tensors than the config's 100000000 layers"),
    ({"model__n_layer": "two"}, "n_layer expects int"),
    ({"model__n_layer": None}, "n_layer expects int"),
    ({"model__n_embd": 2 ** 40}, "does not match|has shape"),
    ({"model__dropout": float("nan")}, "dropout must be in"),
    ({"model__bogus": 1}, "unknown keys: bogus"),
    ({"model": [1, 2]}, 'no "model" section'),
    ({"tokenizer": "char"}, '"tokenizer" must be null or an object'),
    ({"quantization": "yes"}, '"quantization" must be an object'),
    ({"provenance": 5}, '"provenance" must be an object'),
])
def test_bad_config_json_is_one_clear_error(ckpt, changes, match):
    edit_config(ckpt, **changes)
    t0 = time.perf_counter()
    with pytest.raises(NpgptError, match=match):
        load_model(ckpt)
    assert time.perf_counter() - t0 < 5  # no hang (the n_layer case used to build 1.2e9 tuples)


def test_bad_config_json_through_the_cli(ckpt):
    edit_config(ckpt, model__n_layer=100_000_000)
    r = run_cli("generate", "ab", "--model", ckpt, "-n", "2", timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (ckpt / "config.json").write_bytes(b"\xff\xfe{")
    r = run_cli("generate", "ab", "--model", ckpt, "-n", "2", timeout=60)
    assert r.returncode == 1 and "not valid JSON" in r.stderr, r.stderr


def test_train_config_fields_are_validated():
    for bad, match in ((dict(min_lr=-1.0), "min_lr"), (dict(beta2=1.0), "beta2"), (dict(eps=0.0), "eps"),
                       (dict(weight_decay=-0.1), "weight_decay"), (dict(grad_clip=float("nan")), "grad_clip"),
                       (dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"),
                       (dict(learning_rate=float("inf")), "learning_rate")):
        with pytest.raises(NpgptError, match=match):
            TrainConfig(**bad)


@pytest.mark.parametrize("args, match", [
    (["--min_lr", "-1"], "min_lr must be a finite number >= 0"),
    (["--beta2", "1.0"], "beta2 must be in [0, 1)"),
    (["--eps", "0"], "eps must be a finite number > 0"),
    (["--grad_clip", "nan"], "grad_clip must be a finite number >= 0"),
])
def test_bad_train_settings_through_the_cli(shakespeare_data, tmp_path, args, match):
    r = run_cli("train", "--data", shakespeare_data, "--out", tmp_path / "r", "--preset", "nano", *args)
    assert r.returncode == 1 and match in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "r").exists()


def test_damaged_state_json_is_refused_on_resume(shakespeare_data, tmp_path):
    out = tmp_path / "r"
    over = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, max_iters=2, eval_interval=2, eval_iters=1)
    npgpt.train(shakespeare_data, out, overrides=over, quiet=True)
    for text in ('{"step": "2"}', "[]", '{"step": 2}', "{"):
        (out / "state.json").write_text(text)
        with pytest.raises(NpgptError, match="state.json is damaged"):
            npgpt.train(shakespeare_data, out, overrides=over, resume=True, quiet=True)
