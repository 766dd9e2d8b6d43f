"""Hugging Face GPT-2 directories <-> npgpt checkpoint dirs.

HF GPT-2 already uses our tensor names and the (in, out) Conv1D layout, so conversion is a copy by name:
strip an optional `transformer.` prefix, skip the causal-mask buffers (`attn.bias`, `attn.masked_bias`),
check the LM head is tied to `wte`, widen F16/BF16 to float32, and write the tensors in flat-buffer
order so the result loads by memory map. Pickle files (`pytorch_model.bin`) are refused, never opened.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np

from .checkpoint import _as_array, atomic_open, atomic_write_json, read_safetensors_header, write_safetensors
from .config import GPTConfig
from .errors import NpgptError
from .params import param_shapes
from .tokenizer import Tokenizer

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def hf_config_to_npgpt(hf: dict) -> GPTConfig:
    """GPTConfig from an HF GPT-2 config.json dict; unsupported options raise NpgptError."""
    mt = hf.get("model_type", "gpt2")
    if mt != "gpt2":
        raise NpgptError(f"model_type {mt!r} is not GPT-2; only GPT-2 checkpoints can be converted")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise NpgptError(f"activation_function {act!r} is not supported (npgpt implements GPT-2's tanh GELU: "
                         f"{', '.join(TANH_GELUS)})")
    refuse = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True, "scale_attn_weights": False,
              "tie_word_embeddings": False}
    for key, bad in refuse.items():
        if hf.get(key, not bad) == bad:
            raise NpgptError(f"{key}={bad} is not supported by npgpt")
    # reorder_and_upcast_attn only changes the precision of half-precision attention; npgpt computes in
    # float32 throughout, so it is accepted as is.
    try:
        return GPTConfig(n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(hf["n_embd"]),
                         block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
                         vocab_size=int(hf["vocab_size"]), ln="pre", bias=True, dropout=0.0,
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                         init_std=float(hf.get("initializer_range", 0.02)),
                         n_inner=int(hf.get("n_inner") or 0)).validate()
    except KeyError as e:
        raise NpgptError(f"config.json lacks {e.args[0]!r}") from None


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise NpgptError(f"{index} is not a valid safetensors index") from None
        files = [src / s for s in shards]
        for f in files:
            if not f.is_file():
                raise NpgptError(f"shard {f.name} listed in {index.name} is missing")
        return files
    if any((src / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")):
        raise NpgptError(f"{src} has only a pickle checkpoint (pytorch_model.bin); npgpt never unpickles files, "
                         f"because loading a pickle can run arbitrary code. Convert it to safetensors first, e.g. "
                         f"in Python with transformers: GPT2LMHeadModel.from_pretrained(dir)."
                         f"save_pretrained(out, safe_serialization=True)")
    raise NpgptError(f"{src} has no model.safetensors")


def _progress(done: int, total: int, enabled: bool):
    if enabled and total:
        n = int(30 * done / total)
        print(f"\rconverting [{'#' * n}{'.' * (30 - n)}] {done / 1e6:,.0f}/{total / 1e6:,.0f} MB", end="",
              file=sys.stderr, flush=True)


def convert_hf(src: str | Path, out: str | Path, *, force: bool = False, progress: bool | None = None) -> Path:
    """Convert a Hugging Face GPT-2 directory into an npgpt checkpoint dir at `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise NpgptError(f"source dir not found: {src}")
    if not (src / "config.json").is_file():
        raise NpgptError(f"{src} has no config.json")
    if (out / "model.safetensors").exists() and not force:
        raise NpgptError(f"{out} already holds a model; use --force to overwrite it")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (ValueError, UnicodeDecodeError):
        raise NpgptError(f"{src / 'config.json'} is not valid JSON") from None
    cfg = hf_config_to_npgpt(hf)
    shapes = param_shapes(cfg)
    want = dict(shapes)

    # gather every tensor's location (file, header entry) under its npgpt name
    where: dict[str, tuple[Path, dict, int]] = {}
    lm_head = None
    for f in _weight_files(src):
        entries, _, start = read_safetensors_header(f)
        for name, e in entries.items():
            key = name[len("transformer."):] if name.startswith("transformer.") else name
            if key.endswith(("attn.bias", "attn.masked_bias")) and key not in want:
                continue  # causal-mask buffers, not weights
            if key == "lm_head.weight":
                lm_head = (f, e, start)
                continue
            if key not in want:
                raise NpgptError(f"{f.name}: unexpected tensor {name!r} for a GPT-2 of this config")
            if tuple(e["shape"]) != tuple(want[key]):
                raise NpgptError(f"{f.name}: tensor {name} has shape {tuple(e['shape'])}, config.json implies "
                                 f"{tuple(want[key])}")
            where[key] = (f, e, start)
    missing = [n for n in want if n not in where]
    if missing:
        raise NpgptError(f"{src}: missing tensors: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")

    maps: dict[Path, np.memmap] = {}

    def read(loc) -> np.ndarray:
        f, e, start = loc
        if f not in maps:
            maps[f] = np.memmap(f, dtype=np.uint8, mode="r")
        buf = np.array(maps[f][start + e["begin"]: start + e["end"]])  # copy: also fixes alignment
        return _as_array(buf, e["dtype"], e["shape"]).astype(np.float32, copy=False)

    if lm_head is not None:
        if tuple(lm_head[1]["shape"]) != tuple(want["wte.weight"]) or \
                not np.array_equal(read(lm_head), read(where["wte.weight"])):
            raise NpgptError("lm_head.weight differs from wte.weight: untied LM heads are not supported")

    tok = _hf_tokenizer(src)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise NpgptError(f"tokenizer has {tok.vocab_size} tokens, the model only {cfg.vocab_size}")

    total = sum(math.prod(s) for _, s in shapes) * 4
    show = sys.stderr.isatty() if progress is None else progress
    show = show and total > 50_000_000
    out.mkdir(parents=True, exist_ok=True)
    # stream tensors into the file one at a time: peak memory is one tensor, not the model
    header, off = {"__metadata__": {"format": "pt", "source": "hf"}}, 0
    for name, shape in shapes:
        n = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    done = 0
    with atomic_open(out / "model.safetensors") as fh:
        fh.write(len(hb).to_bytes(8, "little"))
        fh.write(hb)
        for name, _ in shapes:
            t = read(where[name])
            fh.write(np.ascontiguousarray(t).data)
            done += t.nbytes
            _progress(done, total, show)
    if show:
        print(file=sys.stderr)
    if tok is not None:
        tok.save(out)
    atomic_write_json(out / "config.json", {
        "model": dataclasses.asdict(cfg),
        "tokenizer": {"kind": tok.kind} if tok is not None else None,
        "provenance": {"converted_from": str(src), "format": "hf-gpt2",
                       "dtypes": sorted({e["dtype"] for _, e, _ in where.values()})},
    })
    return out


def _hf_tokenizer(src: Path) -> Tokenizer | None:
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return Tokenizer.gpt2(src)
    if (src / "tokenizer.json").is_file():
        return Tokenizer.load(src, "gpt2")
    return None


def export_hf(model_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write an npgpt checkpoint as a Hugging Face GPT-2 directory (config.json, model.safetensors,
    tokenizer files) that transformers' GPT2LMHeadModel loads."""
    from .checkpoint import load_model
    model = load_model(model_dir)
    cfg = model.config
    if model.flat is None:
        raise NpgptError("a quantized checkpoint cannot be exported; export the float32 model it came from")
    if cfg.ln != "pre" or not cfg.bias:
        raise NpgptError("only GPT-2-shaped models (pre-LN with biases) can be exported in HF GPT-2 format")
    out = Path(out)
    if (out / "model.safetensors").exists() and not force:
        raise NpgptError(f"{out} already holds a model; use --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors",
                      [(f"transformer.{n}", model.params[n]) for n, _ in model.shapes], {"format": "pt"})
    tok = model.tokenizer
    eot = tok.eot_id if tok is not None and tok.eot_id is not None else cfg.vocab_size - 1
    atomic_write_json(out / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_inner": cfg.n_inner or None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
        "scale_attn_weights": True, "torch_dtype": "float32",
    })
    if tok is not None:
        tok.save(out)
        if tok.kind in ("gpt2", "bpe"):
            tok.tk.model.save(str(out))  # vocab.json + merges.txt
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "GPT2TokenizerFast", "model_max_length": cfg.block_size,
            **({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
               if tok.eot_id is not None else {})})
    return out


__all__ = ["convert_hf", "export_hf", "hf_config_to_npgpt"]
