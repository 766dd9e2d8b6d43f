"""Int8 weight-only quantization: symmetric, one float32 scale per output channel.

Every 2-D matrix that a matmul reads (attention and MLP weights, and the tied token embedding / LM
head) is stored as int8 `q` with scales `s`, w ~ q * s. Biases, layernorms and the position embedding
stay float32. At inference the Numba kernels in kernels.py multiply by the int8 weights directly,
dequantizing on the fly, so a decode step reads a quarter of the bytes.

`Int8Weight` stands in for the float matrix in the model's params dict: it supports `x @ w`, `w.T`
(for the tied head) and `w[idx]` (embedding rows), so model.py runs unchanged on a quantized model.
Array code only: reading and writing int8 checkpoints is checkpoint.py's and convert.py's.
"""
from __future__ import annotations

import numpy as np

from .errors import NpgptError

SCHEME = "int8-per-channel"
_SMALL = 8  # up to this many rows the int8 kernels run; more rows dequantize in blocks and use BLAS
_BLOCK = 1 << 22  # values dequantized at a time on the BLAS path (16 MB of float32)


class Int8Weight:
    """An int8 matrix q [R, C] with float32 scales: per column (axis=1, a linear weight [in, out]) or
    per row (axis=0, the embedding [V, C], whose rows are the LM head's output channels)."""

    __array_ufunc__ = None  # make `ndarray @ Int8Weight` call our __rmatmul__

    def __init__(self, q: np.ndarray, scale: np.ndarray, axis: int, transposed: bool = False):
        self.q, self.scale, self.axis, self.transposed = q, scale, axis, transposed

    @property
    def shape(self):
        return self.q.shape[::-1] if self.transposed else self.q.shape

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes

    dtype = np.dtype(np.float32)

    @property
    def T(self):
        return Int8Weight(self.q, self.scale, self.axis, not self.transposed)

    def dequantize(self) -> np.ndarray:
        s = self.scale[None, :] if self.axis == 1 else self.scale[:, None]
        w = self.q.astype(np.float32) * s
        return w.T if self.transposed else w

    def __getitem__(self, idx):
        """Rows of the (untransposed) embedding: w[idx] -> float32 [..., C]."""
        if self.axis != 0 or self.transposed:
            raise TypeError("row lookup is only defined for an embedding quantized per row")
        return self.q[idx].astype(np.float32) * self.scale[idx][..., None]

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        """x [..., K] @ self [K, M] -> [..., M] float32."""
        from . import kernels as K
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        if x2.shape[0] > _SMALL:
            out = self._blocked_matmul(x2)
        elif self.axis == 1 and not self.transposed:  # linear: y = (x @ q) * s
            out = np.empty((x2.shape[0], self.q.shape[1]), np.float32)
            K.int8_matmul_cols(x2, self.q, self.scale, out, K.nb.get_num_threads())
        elif self.axis == 0 and self.transposed:  # tied head: y = x @ (q * s)^T
            out = np.empty((x2.shape[0], self.q.shape[0]), np.float32)
            K.int8_matmul_rows(x2, self.q, self.scale, out)
        else:
            out = self._blocked_matmul(x2)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _columns(self, j0: int, j1: int) -> np.ndarray:
        """Columns j0..j1 of the dequantized matrix (as self.shape): float32 [K, j1 - j0]."""
        if not self.transposed:
            s = self.scale[None, j0:j1] if self.axis == 1 else self.scale[:, None]
            return self.q[:, j0:j1].astype(np.float32) * s
        s = self.scale[j0:j1, None] if self.axis == 0 else self.scale[None, :]
        return (self.q[j0:j1].astype(np.float32) * s).T

    def _blocked_matmul(self, x2: np.ndarray) -> np.ndarray:
        """x2 [N, K] @ self [K, M] with BLAS, dequantizing _BLOCK values at a time: a prefill through
        GPT-2's head would otherwise build the whole float32 matrix (154 MB) on every call."""
        K_, M = self.shape
        out = np.empty((x2.shape[0], M), np.float32)
        step = max(1, _BLOCK // max(K_, 1))
        for j0 in range(0, M, step):
            j1 = min(M, j0 + step)
            out[:, j0:j1] = x2 @ self._columns(j0, j1)
        return out


def quantize_matrix(w: np.ndarray, axis: int) -> Int8Weight:
    """Symmetric int8: scale = max|w| / 127 over each channel of `axis` (1: per column, 0: per row)."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    s = scale[None, :] if axis == 1 else scale[:, None]
    q = np.clip(np.rint(w / s), -127, 127).astype(np.int8)
    return Int8Weight(q, scale, axis)


def quantized_names(shapes) -> dict[str, int]:
    """{name: axis} of the parameters that are quantized."""
    out = {}
    for name, shape in shapes:
        if name == "wte.weight":
            out[name] = 0
        elif len(shape) == 2 and name.startswith("h."):
            out[name] = 1
    return out


def quantized_params(tensors: dict, shapes, where: str = "model.safetensors") -> dict:
    """The params dict of an int8 checkpoint from its stored tensors (name.q, name.scale for the
    quantized matrices): float32 arrays and Int8Weight matrices, no copies."""
    axes = quantized_names(shapes)
    params = {}
    for name, shape in shapes:
        if name in axes:
            q, s = tensors.get(name + ".q"), tensors.get(name + ".scale")
            if q is None or s is None or q.dtype != np.int8 or tuple(q.shape) != tuple(shape) or \
                    s.shape != (shape[axes[name]],):
                raise NpgptError(f"{where}: quantized tensor {name} is missing or does not match the config")
            params[name] = Int8Weight(q, s, axes[name])
        else:
            t = tensors.get(name)
            if t is None or tuple(t.shape) != tuple(shape):
                raise NpgptError(f"{where}: tensor {name} is missing or does not match the config")
            params[name] = t
    return params


__all__ = ["Int8Weight", "quantize_matrix", "quantized_names", "quantized_params", "SCHEME"]
