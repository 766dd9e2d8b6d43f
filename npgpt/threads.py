"""One thread policy for BLAS and Numba together.

BLAS (NumPy's OpenBLAS) runs the float matrix products with `n` threads. The training kernels run on
the calling thread, between BLAS calls; the only parallel Numba kernels (the int8 matmuls of a
quantized model) use `n` threads where BLAS would otherwise run. The two pools never work at the same
time, so the machine is never oversubscribed: two pools that both busy-wait on 2 cores were measured
to slow a training step 6x. Set with `set_threads(n)` or the CLI's `--threads N` (default: all cores).
"""
from __future__ import annotations

import ctypes
import numbers
import os
import sys

from .errors import NpgptError

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
    """Use `n` threads for BLAS and the parallel Numba kernels (default: $NPGPT_THREADS, else all
    cores). Returns what is in effect (see `thread_info`)."""
    import numpy  # noqa: F401  (BLAS must be loaded to be found)
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise NpgptError(f"threads must be an integer >= 1, got {n!r}")
    n = n or env_threads() or os.cpu_count() or 1
    blas = _openblas()
    if blas:
        blas[1](int(n))
    if "numba" in sys.modules:  # already imported: resize its pool (up to the size it started with)
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:  # not imported (inference need not import it): size the pool it will start with
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    return thread_info()


def env_threads() -> int | None:
    """$NPGPT_THREADS as a positive int (None when unset or empty); anything else is a one-line error,
    not a ValueError from int()."""
    raw = os.environ.get("NPGPT_THREADS", "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:  # digits only: no sign, "1.5" or "abc"
        raise NpgptError(f"NPGPT_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


def thread_info() -> dict:
    """{"blas": BLAS threads (None if unknown), "numba": threads of the parallel (int8) kernels; the
    training kernels use one, "cores": cpu count}."""
    import numpy  # noqa: F401
    blas = _openblas()
    if "numba" in sys.modules:
        import numba
        nthreads = numba.get_num_threads()
    else:
        nthreads = int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1))
    return {"blas": int(blas[0]()) if blas else None, "numba": nthreads, "cores": os.cpu_count()}
