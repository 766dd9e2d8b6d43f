"""Model and training configuration: dataclasses, named presets, files and `--key value` overrides.

A config is plain data. `resolve_config` is the one place where presets, a JSON/TOML file and
command-line overrides are merged, type-checked and validated; the resolved result is saved in
every checkpoint's config.json so a run can always be reproduced.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import NpgptError


@dataclass
class GPTConfig:
    """Shape and behaviour of a GPT. Defaults are GPT-2 124M."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024          # context length (n_positions / n_ctx in HF)
    vocab_size: int = 50257
    ln: str = "pre"                 # "pre": LN before each sublayer + final LN (GPT-2/3); "post": GPT-1
    bias: bool = True               # biases in linear layers and layernorms
    dropout: float = 0.0            # embedding, attention-probability and residual dropout
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02          # residual projections get init_std / sqrt(2 * n_layer)
    n_inner: int = 0                # MLP width; 0 means 4 * n_embd
    attn_window: int = 0            # banded layers: query i sees keys max(0, i - w + 1) .. i; 0 = dense
    attn_pattern: str = "D"         # D dense / B banded per layer, tiled over the layers (GPT-3: "BD")

    @property
    def d_ff(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def window(self, layer: int) -> int:
        """The attention window of `layer`: attn_window for a banded layer, 0 (dense) otherwise."""
        banded = self.attn_pattern[layer % len(self.attn_pattern)] == "B"
        return self.attn_window if banded and self.attn_window else 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> "GPTConfig":
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise NpgptError(f"config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.n_inner < 0:
            raise NpgptError(f"config: n_inner must be >= 0, got {self.n_inner}")
        if self.n_embd % self.n_head:
            raise NpgptError(f"config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.ln not in ("pre", "post"):
            raise NpgptError(f"config: ln must be 'pre' or 'post', got {self.ln!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise NpgptError(f"config: dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise NpgptError(f"config: layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.attn_window < 0:
            raise NpgptError(f"config: attn_window must be >= 0 (0: dense), got {self.attn_window}")
        if not self.attn_pattern or set(self.attn_pattern) - {"B", "D"}:
            raise NpgptError(f"config: attn_pattern must be a non-empty string of B (banded) and D (dense), "
                             f"got {self.attn_pattern!r}")
        return self


# Field rules for the optimisation configs: name -> (test, what the message says it must be).
RULES = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
    "index": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "positive": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "nonneg": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "fraction": (lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
    "unit": (lambda v: math.isfinite(v) and 0 <= v <= 1, "in [0, 1]"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
}


def check_fields(cfg, **rules):
    """Validate dataclass fields by rule name (see RULES); the first violation raises a one-line
    NpgptError. Configs call it from __post_init__, so every way of making one is checked (defaults,
    files, --key value overrides, dataclasses.replace, a saved config.json)."""
    for name, rule in rules.items():
        test, what = RULES[rule]
        value = getattr(cfg, name)
        try:
            ok = test(value)
        except TypeError:
            ok = False
        if not ok:
            raise NpgptError(f"config: {name} must be {what}, got {value!r}")


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow GPT-3's AdamW recipe at a small scale."""
    batch_size: int = 12
    grad_accum: int = 1             # micro-batches per optimizer step
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4            # cosine decays to this (GPT-3: 10% of the peak)
    warmup_iters: int = 100
    lr_decay_iters: int = 0         # 0 means max_iters
    weight_decay: float = 0.1       # applied to 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0          # global-norm clip; 0 disables
    eval_interval: int = 250
    eval_iters: int = 20
    ckpt_interval: int = 0          # 0 means at every evaluation
    log_interval: int = 10
    seed: int = 1337

    def __post_init__(self):
        check_fields(self, batch_size="count", grad_accum="count", max_iters="count", warmup_iters="index",
                     lr_decay_iters="index", eval_interval="count", eval_iters="count", ckpt_interval="index",
                     log_interval="count", seed="index", learning_rate="positive", min_lr="nonneg",
                     weight_decay="nonneg", beta1="fraction", beta2="fraction", eps="positive", grad_clip="nonneg")


# Presets: nano/baby for tests and CPU runs, then the paper models.
_GPT3_TABLE = {  # GPT-3 paper, Table 2.1: n_layer, d_model, n_head (d_head = d_model / n_head), ctx 2048
    "gpt3-125m": (12, 768, 12), "gpt3-350m": (24, 1024, 16), "gpt3-760m": (24, 1536, 16),
    "gpt3-1.3b": (24, 2048, 24), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5140, 40), "gpt3-175b": (96, 12288, 96),
}

PRESETS: dict[str, dict] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32),
    "baby": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    "gpt1": dict(n_layer=12, n_head=12, n_embd=768, block_size=512, vocab_size=40478, ln="post", dropout=0.1),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-355m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 alternates dense and locally banded layers; the paper gives no band width: 256 is our choice
    # (GPT-Neo's window), banded first as gpt-oss and GPT-Neo order them
    **{name: dict(n_layer=l, n_embd=d, n_head=h, block_size=2048, attn_window=256, attn_pattern="BD")
       for name, (l, d, h) in _GPT3_TABLE.items()},
}
# GPT-3 13B's d_model is 5140 in the paper with 40 heads of 128; 5140 is not divisible by 40, so use 5120.
PRESETS["gpt3-13b"]["n_embd"] = 5120


def preset(name: str) -> GPTConfig:
    """The GPTConfig for a named preset, e.g. preset("gpt2-124m")."""
    if name not in PRESETS:
        raise NpgptError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**PRESETS[name]).validate()


def _coerce(cls, key: str, value, source: str):
    """Convert `value` to the declared type of field `key`, or raise a one-line error."""
    types = {f.name: f.type for f in fields(cls)}
    typ = types[key]
    if isinstance(value, str):  # from the command line
        try:
            if typ == "bool":
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if typ == "int":
                return int(value)
            if typ == "float":
                return float(value)
            return value
        except ValueError:
            raise NpgptError(f"{source}: {key} expects {typ}, got {value!r}") from None
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[typ]
    if not ok:
        raise NpgptError(f"{source}: {key} expects {typ}, got {value!r}")
    return float(value) if typ == "float" else value


def load_config_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file into a flat dict (a `[model]`/`[train]` split is also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise NpgptError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise NpgptError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise NpgptError(f"config file {path} must hold an object of key/value pairs")
    flat = {}
    for k, v in data.items():
        if k in ("model", "train") and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def resolve_config(preset_name: str | None = None, file_values: dict | None = None,
                   overrides: dict | None = None, base: GPTConfig | None = None,
                   train_base: TrainConfig | None = None) -> tuple[GPTConfig, TrainConfig]:
    """Merge base/preset < config file < overrides into a validated (GPTConfig, TrainConfig).

    Keys are routed to whichever dataclass declares them; unknown keys and wrong types raise NpgptError.
    """
    model = dataclasses.asdict(base) if base else {}
    if preset_name:
        model = dataclasses.asdict(preset(preset_name))
    train = dataclasses.asdict(train_base) if train_base else {}
    model_keys = {f.name for f in fields(GPTConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    for source, values in (("config file", file_values or {}), ("override", overrides or {})):
        for key, value in values.items():
            key = key.replace("-", "_")
            if key in model_keys:
                model[key] = _coerce(GPTConfig, key, value, source)
            elif key in train_keys:
                train[key] = _coerce(TrainConfig, key, value, source)
            else:
                raise NpgptError(f"{source}: unknown key {key!r}")
    return GPTConfig(**model).validate(), TrainConfig(**train)


def parse_overrides(args: list[str]) -> dict:
    """Turn ["--n_layer", "4", "--dropout=0.1"] into {"n_layer": "4", "dropout": "0.1"}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise NpgptError(f"unexpected argument {arg!r}; overrides look like --key value")
        if "=" in arg:
            k, v = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise NpgptError(f"override {arg} has no value")
            k, v = arg[2:], args[i + 1]
            i += 2
        out[k] = v
    return out


def apply_overrides(obj, overrides: dict, source: str = "override"):
    """A copy of dataclass `obj` with `overrides` ({key: str or value}) type-checked and applied;
    unknown keys raise NpgptError."""
    known = {f.name for f in fields(obj)}
    values = {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key not in known:
            raise NpgptError(f"{source}: unknown key {key!r}")
        values[key] = _coerce(type(obj), key, value, source)
    return dataclasses.replace(obj, **values)


def config_from_dict(d: dict, cls=None):
    """A GPTConfig (or `cls`, e.g. TrainConfig) from a checkpoint's config.json section: unknown keys
    and wrong types are errors, never a traceback."""
    cls = cls or GPTConfig
    if not isinstance(d, dict):
        raise NpgptError(f"{cls.__name__} in config.json must be an object")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise NpgptError(f"{cls.__name__} has unknown keys: {', '.join(sorted(map(str, unknown)))}")
    cfg = cls(**{k: _coerce(cls, k, v, "saved config") for k, v in d.items()})
    return cfg.validate() if cls is GPTConfig else cfg


__all__ = ["GPTConfig", "TrainConfig", "PRESETS", "preset", "resolve_config", "parse_overrides",
           "apply_overrides", "load_config_file", "config_from_dict"]
