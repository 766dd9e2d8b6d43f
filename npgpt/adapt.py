"""What adapting a pretrained GPT to a new job adds to it, shared by GPT-1 fine-tuning (finetune.py) and
the InstructGPT stages (chat.py, reward.py, ppo.py): special tokens in the vocabulary, and a linear head
on the final hidden states.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tokenizers

from .errors import NpgptError
from .model import GPT
from .params import make_views
from .tokenizer import Tokenizer


def add_special_tokens(model: GPT, specials, seed: int = 0) -> tuple[GPT, dict[str, int]]:
    """A writable copy of `model` whose tokenizer and embedding gain the special tokens `specials`
    (new rows ~ N(0, init_std); the tied head grows with them). Tokens the model already has are
    reused. Returns (model, {token: id})."""
    tok = model.tokenizer
    if tok is None:
        raise NpgptError("fine-tuning needs a model with a tokenizer")
    tk = tokenizers.Tokenizer.from_str(tok.tk.to_str())
    tk.add_special_tokens(list(specials))
    new_tok = Tokenizer(tk, tok.kind)
    ids = {s: tk.token_to_id(s) for s in specials}
    V = max(model.config.vocab_size, max(ids.values()) + 1)
    cfg = dataclasses.replace(model.config, vocab_size=V)
    new = GPT(cfg, seed=seed, dtype=model.flat.dtype, tokenizer=new_tok)
    for name, _ in model.shapes:
        if name == "wte.weight":
            old = model.params[name]
            new.params[name][:old.shape[0]] = old
            rng = np.random.default_rng(seed)
            new.params[name][old.shape[0]:] = rng.standard_normal((V - old.shape[0], cfg.n_embd)) * cfg.init_std
        else:
            new.params[name][...] = model.params[name]
    return new, ids


class TaskHead:
    """A linear head on final hidden states: W [C, K], b [K] in one flat buffer with named views, and a
    gradient buffer of the same layout (K classes for GPT-1 tasks; K = 1 for choice scores, rewards and
    values)."""

    def __init__(self, n_embd: int, n_out: int, seed: int = 0, dtype=np.float32, std: float = 0.02):
        self.shapes = [("head.weight", (n_embd, n_out)), ("head.bias", (n_out,))]
        self.flat = np.zeros(n_embd * n_out + n_out, dtype)
        self.params = make_views(self.flat, self.shapes)
        self.params["head.weight"][...] = np.random.default_rng(seed).standard_normal((n_embd, n_out)) * std
        self.grad = np.zeros_like(self.flat)
        self.grads = make_views(self.grad, self.shapes)

    def decay_mask(self) -> np.ndarray:
        """Weight decay on W, not on b (uint8 over the flat buffer, as params.decay_mask)."""
        return np.r_[np.ones(self.params["head.weight"].size, np.uint8), np.zeros(self.params["head.bias"].size, np.uint8)]

    def copy(self) -> "TaskHead":
        W = self.params["head.weight"]
        head = TaskHead(W.shape[0], W.shape[1], dtype=self.flat.dtype)
        head.flat[:] = self.flat
        return head

    def tensors(self) -> list[tuple[str, np.ndarray]]:
        """What head.safetensors holds."""
        return [(n, self.params[n]) for n, _ in self.shapes]

    @classmethod
    def from_tensors(cls, tensors: dict, n_embd: int, where="head.safetensors") -> "TaskHead":
        """A head from head.safetensors' tensors, checked against the body's width `n_embd`."""
        W, b = tensors.get("head.weight"), tensors.get("head.bias")
        if W is None or b is None or W.ndim != 2 or b.shape != (W.shape[1],) or W.shape[0] != n_embd:
            raise NpgptError(f"{where} does not hold a head for this model")
        head = cls(n_embd, W.shape[1], dtype=W.dtype)
        head.params["head.weight"][...] = W
        head.params["head.bias"][...] = b
        return head


__all__ = ["add_special_tokens", "TaskHead"]
