"""AdamW over the flat parameter buffer, global-norm clipping, and the warmup + cosine schedule."""
from __future__ import annotations

import math

import numpy as np

from .errors import NpgptError


def lr_at(step: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup over `warmup` steps to `lr`, then
    cosine decay to `min_lr` at `decay_iters`, then flat at `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_iters:
        return min_lr
    ratio = (step - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def lr_linear(step: int, lr: float, warmup: int, total: int) -> float:
    """GPT-1's fine-tuning schedule at optimizer step `step` (0-based): linear warmup over `warmup` steps
    to `lr`, then linear decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def grad_norm(grad: np.ndarray) -> float:
    """Global L2 norm of a flat gradient."""
    return math.sqrt(float(np.dot(grad, grad)))


def require_finite(where: str, kept: str = "nothing from it is saved", **values):
    """Every training loop asks this of its loss, gradient norm (reward, validation loss) before an
    update or a save, so a non-finite step never reaches the weights or a checkpoint. Raises NpgptError
    "<name> became <value> at <where>; stopped before applying it, <kept>" for the first of `values`
    that is NaN or inf."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise NpgptError(f"{name.replace('_', ' ')} became {v} at {where}; stopped before applying it, {kept}")


def joint_clip(clip: float, *grads):
    """Scale factors that clip several gradient buffers to one global norm: passing the joint-norm clip
    to each optimizer as clip * |g_i| / |g| does exactly that. None when clipping is off."""
    if clip <= 0:
        return None
    norms = [math.sqrt(float(np.dot(g, g))) for g in grads]
    total = math.sqrt(sum(n * n for n in norms))
    if total <= clip:
        return [0.0] * len(grads)
    return [clip * n / total for n in norms]


class AdamW:
    """Decoupled-weight-decay Adam over flat buffers (GPT-3 defaults: betas 0.9/0.95, eps 1e-8).

    `decay` is a uint8 mask over the flat buffer: 1 where weight decay applies (2-D weights only).
    State (m, v, t) is plain arrays and an int, saved with every training checkpoint.
    """

    def __init__(self, params: np.ndarray, decay: np.ndarray, *, weight_decay=0.1, beta1=0.9, beta2=0.95,
                 eps=1e-8):
        self.params = params
        self.decay = decay
        self.weight_decay, self.beta1, self.beta2, self.eps = weight_decay, beta1, beta2, eps
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = 0

    def step(self, grad: np.ndarray, lr: float, clip: float = 0.0, norm: float | None = None) -> float:
        """Apply one update from `grad`; clip it to global norm `clip` first (0 = off). Returns the norm
        before clipping (pass it as `norm` when already known). A non-finite gradient is refused, not
        applied: clipping would turn inf into NaN weights."""
        norm = grad_norm(grad) if norm is None else norm
        if not math.isfinite(norm):
            raise NpgptError(f"gradient norm is {norm}; the update was not applied")
        gscale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0  # as torch's clip_grad_norm_
        self.t += 1
        bc1 = 1.0 - self.beta1 ** self.t
        bc2 = 1.0 - self.beta2 ** self.t
        from .kernels import adamw_step  # Numba is imported only by code that trains
        adamw_step(self.params, grad, self.m, self.v, self.decay, lr, self.beta1, self.beta2, self.eps,
                     self.weight_decay, gscale, bc1, bc2)
        return norm
