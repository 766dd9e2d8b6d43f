"""Weight-only quantization for inference: int8 (symmetric, one float32 scale per output channel) or
float16.

Every 2-D matrix that a matmul reads (attention and MLP weights, and the tied token embedding / LM
head) is stored as int8 `q` with scales `s`, w ~ q * s, or as float16. Biases, layernorms and the position embedding stay float32. At
inference the Numba kernels in kernels.py multiply by the stored weights directly, widening them on
the fly, so a decode step reads a quarter (int8) or a half (float16) of the bytes; products with many
rows (a prefill) widen blocks of the matrix and use BLAS.

`Int8Weight` and `HalfWeight` stand in for the float matrix in the model's params dict: they support
`x @ w`, `w.T` (for the tied head) and `w[idx]` (embedding rows), so model.py runs unchanged on a
quantized model. Array code only: reading and writing these checkpoints is checkpoint.py's and
convert.py's.
"""
from __future__ import annotations

import numpy as np

from .errors import NpgptError

# Schemes (config.json's quantization.scheme): "int8-rows" stores linears (out, in), one scale per row,
# so a decode step is one contiguous int8 dot product per output (kernels.int8_matmul_rows: 1.6x the
# (in, out) kernel's speed on GPT-2's MLP matrix); "int8-per-channel" is the (in, out) layout of
# checkpoints written before it, still read.
SCHEME = "int8-rows"
SCHEMES = (SCHEME, "int8-per-channel", "fp16")
FORMATS = {"int8": SCHEME, "fp16": "fp16"}  # npgpt quantize --format -> the scheme in config.json
# Up to this many rows the int8 kernels run (16: GPT-2's int8 decode of 16 rows at once, as `npgpt serve`
# batches them, took 64 ms per step vs 190 ms dequantizing for BLAS); more rows (a prefill) dequantize in
# blocks and use BLAS. The float16 kernel stays at 8 rows.
_SMALL = 16
_SMALL_HALF = 8
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

    def decode_form(self):
        """The tuple the fused decode kernels take (kernels.decode_layer's weight forms) for this matrix
        used as x @ w: (q, s) when stored (out, in) with a scale per row; None for the (in, out) layout of
        int8-per-channel checkpoints, which keep the layer-by-layer decode. Plain ndarrays: Numba types a
        memmap on a slow path. The tied head is wte.T.decode_form()."""
        return (np.asarray(self.q), np.asarray(self.scale)) if self.axis == 0 and self.transposed else None

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


class HalfWeight(Int8Weight):
    """A float16 matrix h [R, C] standing for h (or h^T when transposed); the matmul, transpose and row
    lookup of Int8Weight, with float16 widening. Linear weights are stored (out, in), i.e. a linear
    [in, out] is HalfWeight(w.T, transposed=True), like the LM head wte^T: each output is then one
    contiguous dot product (kernels.half_matmul_rows)."""

    def __init__(self, h: np.ndarray, transposed: bool = False):
        self.h, self.transposed = h, transposed

    @property
    def shape(self):
        return self.h.shape[::-1] if self.transposed else self.h.shape

    @property
    def nbytes(self):
        return self.h.nbytes

    @property
    def T(self):
        return HalfWeight(self.h, not self.transposed)

    def dequantize(self) -> np.ndarray:
        w = self.h.astype(np.float32)
        return w.T if self.transposed else w

    def decode_form(self):
        """(float16 bits as uint16,) when stored (out, in); see Int8Weight.decode_form."""
        return (np.asarray(self.h).view(np.uint16),) if self.transposed else None

    def __getitem__(self, idx):
        if self.transposed:
            raise TypeError("row lookup is only defined for the untransposed embedding")
        return self.h[idx].astype(np.float32)

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        """x [..., K] @ self [K, M] -> [..., M] float32."""
        from . import kernels as K
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        bits = self.h.view(np.uint16)
        if x2.shape[0] > _SMALL_HALF or not self.transposed or x2.shape[0] == 0:
            out = self._blocked_matmul(x2)
        else:
            out = np.empty((x2.shape[0], self.h.shape[0]), np.float32)
            K.half_matmul_rows(x2, bits, out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _columns(self, j0: int, j1: int) -> np.ndarray:
        return self.h[:, j0:j1].astype(np.float32) if not self.transposed else self.h[j0:j1].astype(np.float32).T


def to_half(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """float16 copy of w (round to nearest); values beyond float16's range are an error."""
    w = np.asarray(w, np.float32)
    big = float(np.abs(w).max()) if w.size else 0.0
    if not np.isfinite(big) or big > float(np.finfo(np.float16).max):
        raise NpgptError(f"{name}: values up to {big:g} do not fit float16 (max 65504); use --format int8")
    return w.astype(np.float16)


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


def quantized_params(tensors: dict, shapes, where: str = "model.safetensors", scheme: str = SCHEME) -> dict:
    """The params dict of a quantized checkpoint from its stored tensors (int8: name.q and name.scale;
    fp16: name, as F16): float32 arrays and Int8Weight / HalfWeight matrices, no copies."""
    axes = quantized_names(shapes)
    params = {}
    for name, shape in shapes:
        if name in axes and scheme == "fp16":
            h = tensors.get(name)
            stored = tuple(shape) if axes[name] == 0 else tuple(shape)[::-1]  # linears are stored (out, in)
            if h is None or h.dtype != np.float16 or tuple(h.shape) != stored:
                raise NpgptError(f"{where}: float16 tensor {name} is missing or does not match the config")
            params[name] = HalfWeight(h, transposed=axes[name] == 1)
        elif name in axes:
            q, s = tensors.get(name + ".q"), tensors.get(name + ".scale")
            rows = scheme == SCHEME and axes[name] == 1  # a linear stored (out, in), scaled per row
            stored = tuple(shape)[::-1] if rows else tuple(shape)
            if q is None or s is None or q.dtype != np.int8 or tuple(q.shape) != stored or \
                    s.shape != (shape[axes[name]],):
                raise NpgptError(f"{where}: quantized tensor {name} is missing or does not match the config")
            params[name] = Int8Weight(q, s, 0, transposed=True) if rows else Int8Weight(q, s, axes[name])
        else:
            t = tensors.get(name)
            if t is None or tuple(t.shape) != tuple(shape):
                raise NpgptError(f"{where}: tensor {name} is missing or does not match the config")
            params[name] = t
    return params


__all__ = ["Int8Weight", "HalfWeight", "quantize_matrix", "to_half", "quantized_names", "quantized_params", "SCHEME",
           "SCHEMES", "FORMATS"]
