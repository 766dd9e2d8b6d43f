"""The PyTorch peer of `make bench`: a GPT written the way a PyTorch user writes one (nanoGPT's shape):
`nn.Linear` layers, `F.scaled_dot_product_attention(is_causal=True)`, the tanh GELU, a tied LM head,
`F.cross_entropy`, `torch.optim.AdamW` with weight decay on the 2-D weights and `clip_grad_norm_`.

It starts from the same weights as the npgpt model it is compared with (npgpt stores linear weights
(in, out), nn.Linear (out, in): copied transposed), so both sides do the same work on the same numbers.
Benchmark-only: importing this module requires torch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, C: int, H: int, d_ff: int, eps: float):
        super().__init__()
        self.n_head = H
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.c_attn = nn.Linear(C, 3 * C)
        self.attn_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.c_fc = nn.Linear(C, d_ff)
        self.mlp_proj = nn.Linear(d_ff, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PeerGPT(nn.Module):
    """GPT-2's architecture (pre-LN, biases, tied head, no dropout) from an npgpt GPTConfig."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.d_ff, cfg.layer_norm_eps) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)

    def forward(self, idx, targets):
        """Mean next-token cross-entropy of idx [B, T] against targets [B, T]."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # the tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


# npgpt parameter name (HF GPT-2's) -> (peer parameter name, transpose?)
def _name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    m = {"wte.weight": ("wte.weight", False), "wpe.weight": ("wpe.weight", False),
         "ln_f.weight": ("ln_f.weight", False), "ln_f.bias": ("ln_f.bias", False)}
    for i in range(n_layer):
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            for p in ("weight", "bias"):
                m[f"h.{i}.{ours}.{p}"] = (f"h.{i}.{theirs}.{p}", False)
        for ours, theirs in (("attn.c_attn", "c_attn"), ("attn.c_proj", "attn_proj"), ("mlp.c_fc", "c_fc"),
                             ("mlp.c_proj", "mlp_proj")):
            m[f"h.{i}.{ours}.weight"] = (f"h.{i}.{theirs}.weight", True)
            m[f"h.{i}.{ours}.bias"] = (f"h.{i}.{theirs}.bias", False)
    return m


def peer_from_npgpt(model) -> PeerGPT:
    """A PeerGPT holding a copy of an npgpt GPT's weights."""
    peer = PeerGPT(model.config)
    own = dict(peer.named_parameters())
    with torch.no_grad():
        for name, (theirs, transpose) in _name_map(model.config.n_layer).items():
            w = torch.from_numpy(model.params[name].copy())
            own[theirs].copy_(w.T if transpose else w)
    return peer


def adamw(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW as nanoGPT configures it: decay on 2-D weights only, betas (0.9, 0.95)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
