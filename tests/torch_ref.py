"""A PyTorch reference GPT with npgpt's parameter names and layouts, for tests only.

Everything here is written independently of npgpt's hand-written layers: autograd supplies the backward,
torch.optim.AdamW and clip_grad_norm_ the optimizer. Parameter names are Hugging Face GPT-2 names, the
same as npgpt's, and linear weights are stored (in, out) so that the forward is x @ W + b; a state copy
between the two is therefore a plain name-by-name copy with no transposes.

Used by tests/make_fixtures.py (which writes the committed fixtures) and by the live tests in
tests/test_reference.py. Importing this module requires torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from npgpt.config import GPTConfig
from npgpt.params import make_views, param_shapes

# The reference models are tiny: extra threads only add synchronisation overhead (on a busy machine,
# seconds per test) and make reductions depend on the thread count.
torch.set_num_threads(1)


class Conv1D(nn.Module):
    """Linear layer with the weight stored (in, out): y = x @ W + b (b optional)."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with biased variance; the bias is optional."""

    def __init__(self, n: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(C, 3 * C, cfg.bias)
        self.c_proj = Conv1D(C, C, cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        H = self.n_head
        D = C // H
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf"))
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, cfg.d_ff, cfg.bias)
        self.c_proj = Conv1D(cfg.d_ff, cfg.n_embd, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.pre = cfg.ln == "pre"
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        if self.pre:  # GPT-2
            x = x + self.attn(self.ln_1(x))
            x = x + self.mlp(self.ln_2(x))
        else:         # GPT-1
            x = self.ln_1(x + self.attn(x))
            x = self.ln_2(x + self.mlp(x))
        return x


class TorchGPT(nn.Module):
    """The reference GPT. named_parameters() yields exactly npgpt's names (param_shapes order aside)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias, cfg.layer_norm_eps) if cfg.ln == "pre" else None

    def forward(self, idx):
        """idx [B, T] long -> logits [B, T, V]; the LM head is tied to wte."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return x @ self.wte.weight.T

    def loss(self, idx, targets):
        """Mean next-token cross-entropy; targets == -1 are ignored (npgpt ignores every target < 0)."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)


def build_torch_model(cfg: GPTConfig, flat: np.ndarray | None = None) -> TorchGPT:
    """A float32 TorchGPT for `cfg`, loaded from an npgpt flat buffer when `flat` is given."""
    model = TorchGPT(cfg).float()
    check_names(model, cfg)
    if flat is not None:
        load_flat(model, flat)
    return model


def check_names(model: TorchGPT, cfg: GPTConfig):
    """Raise if the torch model's parameter names/shapes differ from npgpt's param_shapes(cfg)."""
    ours = {name: tuple(shape) for name, shape in param_shapes(cfg)}
    theirs = {name: tuple(p.shape) for name, p in model.named_parameters()}
    if ours != theirs:
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        bad = sorted(n for n in set(ours) & set(theirs) if ours[n] != theirs[n])
        raise AssertionError(f"parameter mismatch: missing {missing}, extra {extra}, shape {bad}")


@torch.no_grad()
def load_params(model: TorchGPT, params: dict[str, np.ndarray]):
    """Copy npgpt's named parameter arrays into the torch model (same names, same layouts)."""
    named = dict(model.named_parameters())
    if set(named) != set(params):
        raise AssertionError(f"name sets differ: {sorted(set(named) ^ set(params))}")
    for name, p in named.items():
        src = np.asarray(params[name])
        if tuple(src.shape) != tuple(p.shape):
            raise AssertionError(f"{name}: shape {src.shape} vs torch {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.array(src, dtype=np.float32)))


def load_flat(model: TorchGPT, flat: np.ndarray):
    """Copy an npgpt flat parameter buffer into the torch model."""
    load_params(model, make_views(np.asarray(flat, dtype=np.float32), param_shapes(model.config)))


def params_numpy(model: TorchGPT) -> dict[str, np.ndarray]:
    """The torch model's parameters by name as float32 numpy arrays (copies)."""
    return {name: p.detach().cpu().numpy().astype(np.float32, copy=True) for name, p in model.named_parameters()}


def grads_numpy(model: TorchGPT) -> dict[str, np.ndarray]:
    """The torch model's parameter gradients by name as float32 numpy arrays (zeros where .grad is None)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = g.detach().cpu().numpy().astype(np.float32, copy=True)
    return out


def flat_from_named(cfg: GPTConfig, named: dict[str, np.ndarray]) -> np.ndarray:
    """Pack named arrays into a flat buffer in npgpt's param_shapes order."""
    return np.concatenate([np.asarray(named[name], np.float32).reshape(-1) for name, _ in param_shapes(cfg)])


def make_adamw(model: TorchGPT, lr: float = 1e-3, weight_decay: float = 0.1, betas=(0.9, 0.95),
               eps: float = 1e-8) -> torch.optim.AdamW:
    """torch.optim.AdamW configured like npgpt's: weight decay on 2-D weights only (embeddings included)."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def train_steps(model: TorchGPT, batches, lr: float = 1e-3, clip: float = 1.0, **adamw_kwargs):
    """One AdamW step per (idx, targets) batch (numpy int arrays): zero_grad, loss, backward,
    clip_grad_norm_(clip), step.

    Returns (losses, grad_norms) as float64 arrays: len(batches) + 1 losses -- the loss of each step,
    computed before its update (what a training loop logs), then the loss on the last batch after the
    last update, so that every update shows in some value -- and the global gradient norm of each step
    before clipping."""
    opt = make_adamw(model, lr=lr, **adamw_kwargs)
    losses, norms = [], []
    for idx, targets in batches:
        x = torch.from_numpy(np.asarray(idx, np.int64))
        y = torch.from_numpy(np.asarray(targets, np.int64))
        opt.zero_grad(set_to_none=True)
        loss = model.loss(x, y)
        loss.backward()
        losses.append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        norms.append(float(norm))
        opt.step()
    with torch.no_grad():
        losses.append(float(model.loss(x, y)))
    return np.array(losses, np.float64), np.array(norms, np.float64)


def reference(cfg: GPTConfig, flat: np.ndarray, idx: np.ndarray, targets: np.ndarray) -> dict:
    """Torch truth for one batch: logits [B, T, V], loss (float), grads {name: array}."""
    model = build_torch_model(cfg, flat)
    x = torch.from_numpy(np.asarray(idx, np.int64))
    y = torch.from_numpy(np.asarray(targets, np.int64))
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1)
    loss.backward()
    return {"logits": logits.detach().numpy().astype(np.float32), "loss": float(loss.detach()),
            "grads": grads_numpy(model)}


def adamw_reference(shapes, flat0: np.ndarray, grads: np.ndarray, clips, lr: float = 1e-3,
                    weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8):
    """torch.optim.AdamW alone on a flat buffer cut into tensors of `shapes` (decay on the 2-D ones), fed
    the given flat gradients grads [S, N] with clip_grad_norm_(clips[s]) before step s.
    Returns (params after each step [S, N] float32, gradient norms before clipping [S] float64)."""
    params, off = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        params.append(torch.nn.Parameter(torch.from_numpy(np.array(flat0[off:off + n], np.float32).reshape(shape))))
        off += n
    assert off == flat0.size
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    out, norms = [], []
    for g, clip in zip(grads, clips):
        off = 0
        for p in params:
            n = p.numel()
            p.grad = torch.from_numpy(np.array(g[off:off + n], np.float32).reshape(p.shape))
            off += n
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))))
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy())
    return np.stack(out), np.array(norms, np.float64)
