"""Hugging Face GPT-2 and GPT-Neo directories <-> npgpt checkpoint dirs.

HF GPT-2 already uses our tensor names and the (in, out) Conv1D layout, so conversion is a copy by name:
strip an optional `transformer.` prefix, skip the causal-mask buffers (`attn.bias`, `attn.masked_bias`),
check the LM head is tied to `wte`, widen F16/BF16 to float32, and write the tensors in flat-buffer
order so the result loads by memory map. Pickle files (`pytorch_model.bin`) are refused, never opened.

GPT-Neo (EleutherAI's GPT-3 layout) differs in three ways, each mapped exactly: its "global" and
"local" layers are npgpt's dense and banded ones (attn_pattern, attn_window = window_size); its q, k, v
projections are separate nn.Linear layers [out, in] without biases, which become c_attn's columns
(bias 0); and it does not scale attention scores by 1/sqrt(d), so q's weights are multiplied by
sqrt(d) on the way in (and divided on the way out). A model with banded layers exports as GPT-Neo.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from .checkpoint import load_model, read_config, write_config
from .quant import FORMATS, quantize_matrix, quantized_names, to_half
from .tensorfile import _as_array, _short, read_safetensors_header, write_safetensors
from .config import GPTConfig
from .errors import NpgptError
from .files import atomic_open, atomic_write_bytes, atomic_write_json, claim_out, file_set
from .params import param_shapes
from .tokenizer import Tokenizer

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _shown(v) -> str:
    """A config.json value for an error message: as JSON (null, "two", 2.5, NaN), cut short."""
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _hf_int(hf: dict, key: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer field of an HF config.json (JSON true and 2.0 are not integers); `default` if absent."""
    if key not in hf and default is not None:
        return default
    if key not in hf:
        raise NpgptError(f"config.json lacks {key!r}")
    v = hf[key]
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        raise NpgptError(f"config.json: {key} must be an integer >= {minimum}, got {_shown(v)}")
    return v


def _hf_float(hf: dict, key: str, default: float, *, positive: bool) -> float:
    v = hf.get(key, default)
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > 0 if positive else v >= 0)):
        raise NpgptError(f"config.json: {key} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {_shown(v)}")
    return float(v)


def _neo_layers(hf: dict) -> str:
    """GPT-Neo's attention_types ([[["global", "local"], 6]]: kinds repeated) as an attn_pattern: the
    shortest string of D (global) and B (local) that tiles the layers."""
    types = hf.get("attention_types")
    kinds: list = []
    try:
        for group, count in types:
            if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1 and isinstance(group, list)):
                raise TypeError
            kinds += group * count
    except (TypeError, ValueError):
        raise NpgptError(f"config.json: attention_types must be [[[\"global\" | \"local\", ...], count], ...], "
                         f"got {_shown(types)}") from None
    if any(k not in ("global", "local") for k in kinds):
        raise NpgptError(f"config.json: attention_types holds kinds other than global and local: {_shown(types)}")
    if len(kinds) != _hf_int(hf, "num_layers"):
        raise NpgptError(f"config.json: attention_types covers {len(kinds)} layers, num_layers is {hf['num_layers']}")
    full = "".join("B" if k == "local" else "D" for k in kinds)
    return next(full[:p] for p in range(1, len(full) + 1) if (full[:p] * len(full))[:len(full)] == full)


def hf_config_to_npgpt(hf: dict) -> GPTConfig:
    """GPTConfig from an HF GPT-2 or GPT-Neo config.json dict; unsupported options and values of the
    wrong type (null, "two", 2.5, -1, NaN) raise NpgptError."""
    if not isinstance(hf, dict):
        raise NpgptError("config.json is not a JSON object")
    mt = hf.get("model_type", "gpt2")
    if mt not in ("gpt2", "gpt_neo"):
        raise NpgptError(f"model_type {_short(mt)} is neither GPT-2 nor GPT-Neo; only those can be converted")
    act = hf.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in TANH_GELUS:
        raise NpgptError(f"activation_function {_short(act)} is not supported (npgpt implements GPT-2's tanh "
                         f"GELU: {', '.join(TANH_GELUS)})")
    if mt == "gpt_neo":
        if hf.get("tie_word_embeddings", True) is not True:
            raise NpgptError("tie_word_embeddings=false is not supported by npgpt")
        inner = hf.get("intermediate_size")
        return GPTConfig(n_layer=_hf_int(hf, "num_layers"), n_head=_hf_int(hf, "num_heads"),
                         n_embd=_hf_int(hf, "hidden_size"), block_size=_hf_int(hf, "max_position_embeddings", 2048),
                         vocab_size=_hf_int(hf, "vocab_size"), ln="pre", bias=True, dropout=0.0,
                         layer_norm_eps=_hf_float(hf, "layer_norm_epsilon", 1e-5, positive=True),
                         init_std=_hf_float(hf, "initializer_range", 0.02, positive=False),
                         n_inner=0 if inner is None else _hf_int(hf, "intermediate_size"),
                         attn_window=_hf_int(hf, "window_size", 256), attn_pattern=_neo_layers(hf)).validate()
    refuse = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True, "scale_attn_weights": False,
              "tie_word_embeddings": False}
    for key, bad in refuse.items():
        if key in hf and not isinstance(hf[key], bool):  # transformers tests truthiness: null means false
            raise NpgptError(f"config.json: {key} must be true or false, got {_shown(hf[key])}")
        if hf.get(key, not bad) == bad:
            raise NpgptError(f"{key}={bad} is not supported by npgpt")
    # reorder_and_upcast_attn only changes the precision of half-precision attention; npgpt computes in
    # float32 throughout, so it is accepted as is.
    n_inner = hf.get("n_inner")
    return GPTConfig(n_layer=_hf_int(hf, "n_layer"), n_head=_hf_int(hf, "n_head"), n_embd=_hf_int(hf, "n_embd"),
                     block_size=_hf_int(hf, "n_positions" if "n_positions" in hf else "n_ctx", 1024),
                     vocab_size=_hf_int(hf, "vocab_size"), ln="pre", bias=True, dropout=0.0,
                     layer_norm_eps=_hf_float(hf, "layer_norm_epsilon", 1e-5, positive=True),
                     init_std=_hf_float(hf, "initializer_range", 0.02, positive=False),
                     n_inner=0 if n_inner is None else _hf_int(hf, "n_inner")).validate()


def _in_hf_cache(root: Path, real: Path) -> bool:
    """Whether `real` is a file of Hugging Face's hub cache linked from the snapshot dir `root`: the cache
    keeps files in <repo>/blobs/ and links them from <repo>/snapshots/<revision>/ (both resolved)."""
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def _shard(src: Path, name, index: Path) -> Path:
    """The path of a shard that the index names. The index is downloaded data, so the name must stay
    inside `src`: "../x", "/etc/x" or a symlink out of the dir would have convert-weights read any file."""
    if not isinstance(name, str):
        raise NpgptError(f"{index} is not a valid safetensors index (a shard name is {_shown(name)})")
    p = Path(name)
    if not name or "\0" in name or p.is_absolute() or ".." in p.parts:
        raise NpgptError(f"{index.name}: shard {_short(name)} is not a file inside {src}")
    f = src / p
    if not f.is_file():
        raise NpgptError(f"shard {_short(name)} listed in {index.name} is missing")
    root, real = src.resolve(), f.resolve()
    if not real.is_relative_to(root) and not _in_hf_cache(root, real):
        raise NpgptError(f"{index.name}: shard {_short(name)} links to {real}, outside {src}")
    return f


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError, OSError):
            raise NpgptError(f"{index} is not a valid safetensors index") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise NpgptError(f"{index}: weight_map must map tensor names to shard files")
        shards: list = []
        for s in weight_map.values():  # a list, not a set: an unhashable entry must reach _shard's check
            if s not in shards:
                shards.append(s)
        return [_shard(src, s, index) for s in shards]
    if any((src / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")):
        raise NpgptError(f"{src} has only a pickle checkpoint (pytorch_model.bin); npgpt never unpickles files, "
                         f"because loading a pickle can run arbitrary code. Convert it to safetensors first, e.g. "
                         f"in Python with transformers: GPT2LMHeadModel.from_pretrained(dir)."
                         f"save_pretrained(out, safe_serialization=True)")
    raise NpgptError(f"{src} has no model.safetensors")


_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.")


def _check_layer_count(n_layer: int, headers) -> None:
    """config.json's n_layer against the layers the weight files hold, before anything is built per layer
    (n_layer: 100000000 would otherwise spend minutes listing a billion tensor shapes)."""
    layers = {m.group(1) for _, entries, _, _ in headers for name in entries if (m := _LAYER.match(name))}
    if n_layer != len(layers):
        raise NpgptError(f"config.json has n_layer={n_layer}, but the weights hold {len(layers)} layers")


def _progress(done: int, total: int, enabled: bool):
    if enabled and total:
        n = int(30 * done / total)
        print(f"\rconverting [{'#' * n}{'.' * (30 - n)}] {done / 1e6:,.0f}/{total / 1e6:,.0f} MB", end="",
              file=sys.stderr, flush=True)


def _recipe(cfg: GPTConfig, model_type: str) -> dict:
    """npgpt tensor name -> (the HF tensors it is made of (names without `transformer.`, shapes), how).
    GPT-2: the same tensor. GPT-Neo: see the module doc."""
    def same(t):
        return t[0]

    shapes = param_shapes(cfg)
    if model_type == "gpt2":
        return {n: (((n, tuple(s)),), same) for n, s in shapes}
    C, root_d = cfg.n_embd, math.sqrt(cfg.head_dim)
    out = {}
    for n, s in shapes:
        m = re.fullmatch(r"(h\.\d+\.)(.*)", n)
        rest = m.group(2) if m else None
        a = m.group(1) + "attn.attention." if m else ""
        if rest == "attn.c_attn.weight":  # [C, 3C] = q, k, v side by side, (in, out); q carries sqrt(d)
            out[n] = (((a + "q_proj.weight", (C, C)), (a + "k_proj.weight", (C, C)), (a + "v_proj.weight", (C, C))),
                      lambda t: np.concatenate([t[0].T * np.float32(root_d), t[1].T, t[2].T], axis=1))
        elif rest == "attn.c_attn.bias":
            out[n] = ((), lambda t: np.zeros(3 * C, np.float32))
        elif rest == "attn.c_proj.weight":
            out[n] = (((a + "out_proj.weight", (C, C)),), lambda t: t[0].T)
        elif rest == "attn.c_proj.bias":
            out[n] = (((a + "out_proj.bias", (C,)),), same)
        elif rest in ("mlp.c_fc.weight", "mlp.c_proj.weight"):  # nn.Linear [out, in]
            out[n] = (((n, tuple(s)[::-1]),), lambda t: t[0].T)
        else:
            out[n] = (((n, tuple(s)),), same)
    return out


def convert_hf(src: str | Path, out: str | Path, *, force: bool = False, progress: bool | None = None) -> Path:
    """Convert a Hugging Face GPT-2 or GPT-Neo directory into an npgpt checkpoint dir at `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise NpgptError(f"source dir not found: {src}")
    if not (src / "config.json").is_file():
        raise NpgptError(f"{src} has no config.json")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise NpgptError(f"{src / 'config.json'} is not valid JSON") from None
    cfg = hf_config_to_npgpt(hf)
    headers = [(f, *read_safetensors_header(f)) for f in _weight_files(src)]  # every file is validated first
    _check_layer_count(cfg.n_layer, headers)
    shapes = param_shapes(cfg)
    model_type = hf.get("model_type", "gpt2")
    recipe = _recipe(cfg, model_type)
    want = {k: s for sources, _ in recipe.values() for k, s in sources}  # HF tensors by name, with shapes
    what = "a GPT-Neo" if model_type == "gpt_neo" else "a GPT-2"

    # gather every tensor's location (file, header entry) under its name without `transformer.`
    where: dict[str, tuple[Path, dict, int]] = {}
    lm_head = None
    for f, entries, _, start in headers:
        for name, e in entries.items():
            key = name[len("transformer."):] if name.startswith("transformer.") else name
            if key.endswith(("attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias")) \
                    and key not in want:
                continue  # causal-mask buffers, not weights
            if key == "lm_head.weight":
                lm_head = (f, e, start)
                continue
            if key not in want:
                raise NpgptError(f"{f.name}: unexpected tensor {name!r} for {what} of this config")
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
    # stream tensors into the file one at a time: peak memory is one tensor, not the model
    header, off = {"__metadata__": {"format": "pt", "source": "hf"}}, 0
    for name, shape in shapes:
        n = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    # weights, tokenizer and config are one set, in a dir no other kind of data lives in
    with claim_out(out, "checkpoint", force), file_set(out) as stage:
        done = 0
        with atomic_open(stage / "model.safetensors") as fh:
            fh.write(len(hb).to_bytes(8, "little"))
            fh.write(hb)
            for name, _ in shapes:
                sources, make = recipe[name]
                t = make([read(where[k]) for k, _ in sources])
                fh.write(np.ascontiguousarray(t, np.float32).data)
                done += t.nbytes
                _progress(done, total, show)
        if show:
            print(file=sys.stderr)
        if tok is not None:
            tok.save(stage)
        write_config(stage, cfg, tok, {"provenance": {"converted_from": str(src),
                                                      "format": "hf-gpt-neo" if model_type == "gpt_neo" else "hf-gpt2",
                                                      "dtypes": sorted({e["dtype"] for _, e, _ in where.values()})}})
    return out


def _hf_tokenizer(src: Path) -> Tokenizer | None:
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return Tokenizer.gpt2(src)
    if (src / "tokenizer.json").is_file():
        return Tokenizer.load(src, "gpt2")
    return None


def _bpe_files(tok: Tokenizer) -> tuple[bytes, bytes]:
    """vocab.json and merges.txt of a byte-level BPE tokenizer, byte for byte as the tokenizers library's
    `model.save` writes them (which writes in place, not atomically): the vocab ordered by id, compact
    and not ASCII-escaped; the merges in rank order after a version line."""
    model = json.loads(tok.tk.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]  # ["a", "b"] since 0.20
    return (json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode(),
            ("#version: 0.2\n" + "".join(m + "\n" for m in merges)).encode())


def export_hf(model_dir: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write an npgpt checkpoint as a Hugging Face GPT-2 directory (config.json, model.safetensors,
    tokenizer files) that transformers' GPT2LMHeadModel loads."""
    model = load_model(model_dir)
    cfg = model.config
    if model.quantized:
        raise NpgptError("a quantized checkpoint cannot be exported; export the float32 model it came from")
    if cfg.ln != "pre" or not cfg.bias:
        raise NpgptError("only GPT-2-shaped models (pre-LN with biases) can be exported in HF GPT-2 format")
    neo = any(cfg.window(l) for l in range(cfg.n_layer))  # GPT-2 is dense everywhere: banded is GPT-Neo
    if neo:
        for l in range(cfg.n_layer):
            if np.any(model.params[f"h.{l}.attn.c_attn.bias"]):
                raise NpgptError(f"layer {l} has non-zero q/k/v biases, which GPT-Neo (the HF format of a model "
                                 f"with banded attention) does not have")
    out = Path(out)
    with claim_out(out, "hf", force), file_set(out) as stage:
        (_write_neo if neo else _write_hf)(stage, model)
    return out


def _write_neo(out: Path, model):
    """The files of a Hugging Face GPT-Neo dir for `model` (banded layers; no q/k/v biases), into `out`."""
    cfg, p = model.config, model.params
    C, root_d = cfg.n_embd, math.sqrt(cfg.head_dim)
    tensors = [("transformer.wte.weight", p["wte.weight"]), ("transformer.wpe.weight", p["wpe.weight"])]
    for l in range(cfg.n_layer):
        h, a = f"h.{l}.", f"transformer.h.{l}.attn.attention."
        w = np.asarray(p[h + "attn.c_attn.weight"])
        tensors += [(f"transformer.{h}ln_1.weight", p[h + "ln_1.weight"]), (f"transformer.{h}ln_1.bias", p[h + "ln_1.bias"]),
                    (a + "k_proj.weight", w[:, C:2 * C].T), (a + "v_proj.weight", w[:, 2 * C:].T),
                    (a + "q_proj.weight", w[:, :C].T / np.float32(root_d)),
                    (a + "out_proj.weight", np.asarray(p[h + "attn.c_proj.weight"]).T),
                    (a + "out_proj.bias", p[h + "attn.c_proj.bias"]),
                    (f"transformer.{h}ln_2.weight", p[h + "ln_2.weight"]), (f"transformer.{h}ln_2.bias", p[h + "ln_2.bias"]),
                    (f"transformer.{h}mlp.c_fc.weight", np.asarray(p[h + "mlp.c_fc.weight"]).T),
                    (f"transformer.{h}mlp.c_fc.bias", p[h + "mlp.c_fc.bias"]),
                    (f"transformer.{h}mlp.c_proj.weight", np.asarray(p[h + "mlp.c_proj.weight"]).T),
                    (f"transformer.{h}mlp.c_proj.bias", p[h + "mlp.c_proj.bias"])]
    tensors += [("transformer.ln_f.weight", p["ln_f.weight"]), ("transformer.ln_f.bias", p["ln_f.bias"])]
    write_safetensors(out / "model.safetensors", [(n, np.ascontiguousarray(t, np.float32)) for n, t in tensors],
                      {"format": "pt"})
    kinds = ["local" if cfg.window(l) else "global" for l in range(cfg.n_layer)]
    period = cfg.attn_pattern if cfg.n_layer % len(cfg.attn_pattern) == 0 else None
    types = [[kinds[:len(period)], cfg.n_layer // len(period)]] if period else [[kinds, 1]]
    tok = model.tokenizer
    eot = tok.eot_id if tok is not None else None
    atomic_write_json(out / "config.json", {
        "architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
        "num_layers": cfg.n_layer, "num_heads": cfg.n_head, "hidden_size": cfg.n_embd,
        "max_position_embeddings": cfg.block_size, "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.n_inner or None, "window_size": cfg.attn_window, "attention_types": types,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std, "resid_dropout": cfg.dropout, "embed_dropout": cfg.dropout,
        "attention_dropout": cfg.dropout, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    })
    _write_tokenizer(out, tok, cfg)


def _write_hf(out: Path, model):
    """The files of a Hugging Face GPT-2 dir for `model`, written into `out`."""
    cfg = model.config
    write_safetensors(out / "model.safetensors",
                      [(f"transformer.{n}", model.params[n]) for n, _ in model.shapes], {"format": "pt"})
    tok = model.tokenizer
    # BOS/EOS is <|endoftext|> where the tokenizer has one, else null: any other id is an ordinary token
    # (a char model's last id is 'z', and transformers' generate() would stop at the first 'z')
    eot = tok.eot_id if tok is not None else None
    atomic_write_json(out / "config.json", {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size, "n_inner": cfg.n_inner or None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": cfg.init_std, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
        "scale_attn_weights": True, "torch_dtype": "float32",
    })
    _write_tokenizer(out, tok, cfg)


def _write_tokenizer(out: Path, tok, cfg):
    """tokenizer.json, and vocab.json + merges.txt for a BPE, with the tokenizer_config.json that
    transformers' AutoTokenizer reads."""
    if tok is not None:
        tok.save(out)
        if tok.kind in ("gpt2", "bpe"):
            vocab, merges = _bpe_files(tok)
            atomic_write_bytes(out / "vocab.json", vocab)
            atomic_write_bytes(out / "merges.txt", merges)
        # a char vocabulary is not GPT-2's BPE: GPT2TokenizerFast would re-split it with GPT-2's byte-level
        # pre-tokenizer and drop the spaces; the generic class runs tokenizer.json as it is
        atomic_write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast" if tok.kind == "char" else "GPT2TokenizerFast",
            "model_max_length": cfg.block_size,
            **({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
               if tok.eot_id is not None else {})})


def quantize_model(model_dir: str | Path, out: str | Path, *, format: str = "int8", force: bool = False) -> dict:
    """Write an int8 or float16 copy (`format`) of a checkpoint dir to `out`. Returns {"fp32_bytes",
    "bytes"}."""
    src, out = Path(model_dir), Path(out)
    if format not in FORMATS:
        raise NpgptError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    scheme = FORMATS[format]
    cfg = read_config(src)
    if cfg.get("quantization"):
        raise NpgptError(f"{src} is already quantized")
    model = load_model(src)
    axes = quantized_names(model.shapes)
    tensors = []
    for name, _ in model.shapes:
        if name in axes and format == "fp16":  # linears (axis 1) stored (out, in): see quant.HalfWeight
            w = model.params[name]
            tensors.append((name, to_half(np.ascontiguousarray(w.T) if axes[name] == 1 else w, name)))
        elif name in axes:  # a linear [in, out] is stored (out, in), scaled per row (quant.SCHEME)
            w = model.params[name]
            qw = quantize_matrix(np.ascontiguousarray(w.T) if axes[name] == 1 else w, 0)
            tensors += [(name + ".q", qw.q), (name + ".scale", qw.scale)]
        else:
            tensors.append((name, np.ascontiguousarray(model.params[name], np.float32)))
    with claim_out(out, "checkpoint", force), file_set(out) as stage:
        write_safetensors(stage / "model.safetensors", tensors, {"format": "npgpt", "quantization": scheme})
        if model.tokenizer is not None:
            model.tokenizer.save(stage)
        write_config(stage, model.config, model.tokenizer, {
            "quantization": {"scheme": scheme, "source": str(src)},
            "provenance": {**(cfg.get("provenance") or {}), "quantized_from": str(src)}})
    return {"fp32_bytes": model.flat.nbytes, "bytes": sum(t.nbytes for _, t in tensors)}


__all__ = ["convert_hf", "export_hf", "hf_config_to_npgpt", "quantize_model"]
