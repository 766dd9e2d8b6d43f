"""Checkpoint dirs: the one writer of config.json, and the loader of a model from a dir.

A checkpoint dir holds:
  config.json        {"model": GPTConfig, "tokenizer": {"kind": ...}, "train": TrainConfig?, "provenance": ...,
                      and a section per job that wrote it: "finetune", "sft", "reward", "value", "dpo", "ppo"}
  model.safetensors  HF GPT-2 tensor names, (in, out) layout, written in flat-buffer order (see tensorfile.py)
  tokenizer.json
  head.safetensors   a task, reward or value head (fine-tuned models only)
  optim.safetensors  Adam m and v (training runs only)
  state.json         step, RNG state, metrics (training runs only)
All of them are written as one atomic set (files.file_set): a crash leaves the old checkpoint or the new one.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .config import GPTConfig, config_from_dict
from .errors import NpgptError
from .files import atomic_write_json, current, file_set
from .model import GPT
from .params import param_shapes
from .quant import SCHEMES, quantized_params
from .tensorfile import load_flat, load_safetensors, read_safetensors_header, write_safetensors
from .tokenizer import Tokenizer


# ---------------------------------------------------------------- checkpoint dirs
def all_finite(a: np.ndarray) -> bool:
    """True when no element is NaN or inf (one float64 reduction: no temporary the size of `a`)."""
    return math.isfinite(float(np.add.reduce(np.asarray(a).reshape(-1), dtype=np.float64)))


def write_checkpoint(d: str | Path, model, *, sections: dict | None = None, heads: dict | None = None,
                     optimizers: dict | None = None, state: dict | None = None):
    """Write the files of a checkpoint into the dir `d` (use `save_checkpoint` to replace a checkpoint
    as one atomic set). config.json is written here and only here: {"model", "tokenizer", **sections}
    (sections: "train", "provenance", "finetune", "sft", "reward", "value", "dpo", "ppo" ...).
    heads: {file name: [(tensor name, array)]} for task/reward heads. optimizers: {prefix: AdamW},
    stored as prefix + "m"/"v" in optim.safetensors with their step counts. state: the resume record
    (state.json). Non-finite weights are refused: a NaN never reaches a checkpoint."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    arrays = [model.flat] + [a for ts in (heads or {}).values() for _, a in ts]
    if not all(all_finite(a) for a in arrays):
        raise NpgptError("the weights are not finite (NaN or inf); refusing to write a checkpoint")
    step = str(state["step"]) if state else "0"
    if optimizers:
        tensors, meta = [], {"step": step}
        for prefix, opt in optimizers.items():
            tensors += [(prefix + "m", opt.m), (prefix + "v", opt.v)]
            meta[prefix + "t"] = str(opt.t)
        write_safetensors(d / "optim.safetensors", tensors, meta)
    write_safetensors(d / "model.safetensors", [(n, model.params[n]) for n, _ in model.shapes],
                      {"format": "pt", "step": step})
    for fname, tensors in (heads or {}).items():
        write_safetensors(d / fname, tensors)
    if model.tokenizer is not None:
        model.tokenizer.save(d)
    write_config(d, model.config, model.tokenizer, sections)
    if state is not None:
        atomic_write_json(d / "state.json", state)


SECTIONS = ("train", "provenance", "quantization", "finetune", "sft", "reward", "value", "dpo", "ppo")


def write_config(d: str | Path, config: GPTConfig, tokenizer, sections: dict | None = None):
    """config.json of a checkpoint dir, the one place that writes it: {"model": GPTConfig, "tokenizer":
    {"kind"} or null, and the `sections` (of SECTIONS) that are not None}."""
    unknown = set(sections or {}) - set(SECTIONS)
    if unknown:  # a programming error: a new section is added to SECTIONS (which read_config checks) first
        raise ValueError(f"unknown config.json sections: {sorted(unknown)}")
    atomic_write_json(Path(d) / "config.json", {
        "model": dataclasses.asdict(config), "tokenizer": {"kind": tokenizer.kind} if tokenizer is not None else None,
        **{k: v for k, v in (sections or {}).items() if v is not None}})


def save_checkpoint(directory: str | Path, model, *, train_config=None, optimizer=None, state: dict | None = None,
                    provenance: dict | None = None, sections: dict | None = None, heads: dict | None = None):
    """Replace the checkpoint in `directory` as one atomic set (see files.file_set): after a crash at
    any moment the dir holds the whole old checkpoint or the whole new one."""
    sections = {"train": dataclasses.asdict(train_config) if train_config is not None else None,
                "provenance": provenance, **(sections or {})}
    with file_set(directory) as stage:
        write_checkpoint(stage, model, sections=sections, heads=heads,
                         optimizers={"": optimizer} if optimizer is not None else None, state=state)


def load_optimizers(directory: str | Path, opts: dict, step: int):
    """Restore the Adam state of every optimizer ({prefix: AdamW}, as write_checkpoint stored them) from
    the checkpoint of `step`; a state from another step, or of other shapes, is an NpgptError."""
    d = Path(directory)
    tensors, meta = load_safetensors(current(d, "optim.safetensors"), mmap=False)
    if meta.get("step") != str(step):
        raise NpgptError(f"{d}: optimizer state is from step {meta.get('step')}, state.json from {step}; "
                         f"the checkpoint is inconsistent")
    for prefix, opt in opts.items():
        m, v, t = tensors.get(prefix + "m"), tensors.get(prefix + "v"), str(meta.get(prefix + "t", ""))
        if m is None or v is None or m.shape != opt.m.shape or v.shape != opt.v.shape or not t.isdigit():
            raise NpgptError(f"{d}: optimizer state does not match the model")
        opt.m[:], opt.v[:], opt.t = m, v, int(t)


def read_config(directory: str | Path) -> dict:
    """A checkpoint's config.json, its sections type-checked (the model section is checked in full by
    config_from_dict)."""
    d = Path(directory)
    if not d.is_dir():
        raise NpgptError(f"model dir not found: {d}")
    path = current(d, "config.json")
    if not path.is_file():
        raise NpgptError(f"{d} is not an npgpt checkpoint (no config.json)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise NpgptError(f"{path} is not valid JSON") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise NpgptError(f"{path} has no \"model\" section")
    tok = cfg.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("kind"), str)):
        raise NpgptError(f"{path}: \"tokenizer\" must be null or an object with a \"kind\"")
    for key in SECTIONS:
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise NpgptError(f"{path}: \"{key}\" must be an object")
    return cfg


def load_model(directory: str | Path, *, mmap: bool = True):
    """Load a checkpoint dir into a GPT (weights memory-mapped read-only by default; mmap=False gives a
    private, writable copy for training)."""
    d = Path(directory)
    cfg = read_config(d)
    config: GPTConfig = config_from_dict(cfg["model"])
    weights = current(d, "model.safetensors")
    if not weights.is_file():
        raise NpgptError(f"{d} has no model.safetensors")
    # every layer has tensors of its own: a config with more layers than the file has tensors is
    # refused before anything is built from it (n_layer: 100000000 must not hang)
    header = read_safetensors_header(weights)  # read once, validated once, for both checks and the load
    if config.n_layer > len(header[0]):
        raise NpgptError(f"{weights}: holds fewer tensors than the config's {config.n_layer} layers need")
    quant = cfg.get("quantization")
    if quant:
        if quant.get("scheme") not in SCHEMES:
            raise NpgptError(f"{d}: unknown quantization scheme {quant.get('scheme')!r}")
        params = quantized_params(load_safetensors(weights, mmap=True, header=header)[0], param_shapes(config),
                                  str(weights), quant["scheme"])
    else:
        flat, _ = load_flat(weights, param_shapes(config), mmap=mmap, header=header)
    tok = None
    if cfg.get("tokenizer"):
        tok = Tokenizer.load(current(d, "tokenizer.json").parent, cfg["tokenizer"]["kind"])
        if tok.vocab_size > config.vocab_size:
            raise NpgptError(f"{d}: tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    return GPT(config, params=params, tokenizer=tok) if quant else GPT(config, flat, tokenizer=tok)


def load_head(directory: str | Path, name: str = "head.safetensors") -> dict[str, np.ndarray]:
    """The tensors of a head file next to a checkpoint (task or reward head), as private copies."""
    tensors, _ = load_safetensors(current(directory, name), mmap=False)
    return tensors
