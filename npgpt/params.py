"""All parameters of a GPT in one flat buffer, with named views that use Hugging Face GPT-2 names.

Linear weights are stored (in, out) as in HF's Conv1D, so `x @ W` is the forward. Gradients and Adam's
moments are flat buffers of the same length, so the optimizer is one loop and a checkpoint's data area
*is* the flat buffer (see checkpoint.py).
"""
from __future__ import annotations

import math

import numpy as np

from .config import GPTConfig


def param_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Ordered (name, shape) of every parameter; the order is the layout of the flat buffer."""
    C, F = cfg.n_embd, cfg.d_ff
    shapes = [("wte.weight", (cfg.vocab_size, C)), ("wpe.weight", (cfg.block_size, C))]

    def add(name, shape, is_bias=False):
        if cfg.bias or not is_bias:
            shapes.append((name, shape))

    for i in range(cfg.n_layer):
        p = f"h.{i}."
        add(p + "ln_1.weight", (C,)); add(p + "ln_1.bias", (C,), True)
        add(p + "attn.c_attn.weight", (C, 3 * C)); add(p + "attn.c_attn.bias", (3 * C,), True)
        add(p + "attn.c_proj.weight", (C, C)); add(p + "attn.c_proj.bias", (C,), True)
        add(p + "ln_2.weight", (C,)); add(p + "ln_2.bias", (C,), True)
        add(p + "mlp.c_fc.weight", (C, F)); add(p + "mlp.c_fc.bias", (F,), True)
        add(p + "mlp.c_proj.weight", (F, C)); add(p + "mlp.c_proj.bias", (C,), True)
    if cfg.ln == "pre":
        add("ln_f.weight", (C,)); add("ln_f.bias", (C,), True)
    return shapes


def num_params(cfg: GPTConfig) -> int:
    return sum(math.prod(s) for _, s in param_shapes(cfg))


def make_views(flat: np.ndarray, shapes) -> dict[str, np.ndarray]:
    """Named reshaped views into `flat` (no copies)."""
    views, off = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        views[name] = flat[off:off + n].reshape(shape)
        off += n
    assert off == flat.size, (off, flat.size)
    return views


def init_params(cfg: GPTConfig, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A fresh flat buffer: weights ~ N(0, init_std), residual projections scaled by 1/sqrt(2*n_layer),
    biases 0, layernorm gains 1."""
    shapes = param_shapes(cfg)
    flat = np.zeros(sum(math.prod(s) for _, s in shapes), dtype=dtype)
    views = make_views(flat, shapes)
    rng = np.random.default_rng(seed)
    proj_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    for name, shape in shapes:
        if name.endswith(".bias"):
            continue
        if ".ln_" in name or name.startswith("ln_"):
            views[name][...] = 1.0
        else:
            std = proj_std if name.endswith("c_proj.weight") else cfg.init_std
            views[name][...] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return flat


def decay_mask(cfg: GPTConfig) -> np.ndarray:
    """uint8 per parameter: 1 where AdamW applies weight decay (2-D weights), 0 for biases and gains."""
    shapes = param_shapes(cfg)
    return np.concatenate([np.full(math.prod(s), 1 if len(s) == 2 else 0, np.uint8) for _, s in shapes])
