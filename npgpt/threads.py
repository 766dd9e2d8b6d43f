"""One thread policy for BLAS and Numba together.

BLAS (NumPy's OpenBLAS) runs the matrix products with `n` threads; Numba kernels run on the calling
thread. They never run at the same time, so the machine is never oversubscribed: two pools that both
busy-wait on 2 cores were measured to slow a training step 6x. Set with `set_threads(n)` or the CLI's
`--threads N` (default: all cores).
"""
from __future__ import annotations

import ctypes
import os

_blas = None


def _openblas():
    """The OpenBLAS that NumPy loaded (found in this process's memory map), or None."""
    global _blas
    if _blas is None:
        _blas = False
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
        except OSError:
            paths = set()
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                              ("openblas_get_num_threads", "openblas_set_num_threads"),
                              ("openblas_get_num_threads64_", "openblas_set_num_threads64_")):
                if hasattr(lib, get) and hasattr(lib, set_):
                    _blas = (getattr(lib, get), getattr(lib, set_))
                    break
            if _blas:
                break
    return _blas or None


def set_threads(n: int | None = None) -> dict:
    """Use `n` threads for BLAS (default: all cores); Numba kernels stay single-threaded per call.
    Returns what is in effect (see `thread_info`)."""
    import numpy  # noqa: F401  (BLAS must be loaded to be found)
    n = n or os.cpu_count() or 1
    blas = _openblas()
    if blas:
        blas[1](int(n))
    return thread_info()


def thread_info() -> dict:
    """{"blas": threads BLAS uses (None if unknown), "numba": threads a Numba kernel uses, "cores": cpu count}."""
    import numpy  # noqa: F401
    blas = _openblas()
    return {"blas": int(blas[0]()) if blas else None, "numba": 1, "cores": os.cpu_count()}
