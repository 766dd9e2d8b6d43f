"""One thread policy for BLAS and Numba together.

BLAS (NumPy's OpenBLAS) runs the float matrix products with `n` threads. The training kernels run on
the calling thread, between BLAS calls; the only parallel Numba kernels (the int8 matmuls of a
quantized model) use `n` threads where BLAS would otherwise run. The two pools never work at the same
time, so one process never oversubscribes the machine: two pools that both busy-wait on 2 cores were
measured to slow a training step 6x. Set with `set_threads(n)` or the CLI's `--threads N`.

The default (no `n`, no $NPGPT_THREADS) shares the cores among the npgpt processes of this user that
run on it: each holds a lock on a file named after its pid in a per-user dir, and takes
cores // (live holders) threads. Two baby trainings side by side on 2 cores each took 3.75x the time of
one alone with 2 threads apiece, 1.5x when sharing (benchmarks/oversubscribe.py). Training calls
`rebalance()` every 10 steps, so a process that starts or ends elsewhere changes its share soon.
"""
from __future__ import annotations

import atexit
import ctypes
import fcntl
import numbers
import os
import sys
import tempfile
from pathlib import Path

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
            for pre, suf in (("scipy_openblas", "64_"), ("openblas", ""), ("openblas", "64_")):
                get, set_, core = (f"{pre}_{f}{suf}" for f in ("get_num_threads", "set_num_threads", "get_corename"))
                if hasattr(lib, get) and hasattr(lib, set_):
                    corename = getattr(lib, core, None)
                    if corename is not None:
                        corename.restype = ctypes.c_char_p
                    _blas = (getattr(lib, get), getattr(lib, set_), corename)
                    break
            if _blas:
                break
    return _blas or None


_shared = None   # this process's registry file, open and locked, while it uses the default policy
_current = None  # the threads in effect


def peers_dir() -> Path:
    """The per-user dir where default-policy processes register ($XDG_RUNTIME_DIR or the temp dir)."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"npgpt-threads-{os.getuid()}"


def fair_share() -> int:
    """Cores // the live npgpt processes under the default policy (this one registered first). A holder
    that died leaves an unlocked file, which is removed here. Any failure (read-only dir, no flock) counts
    this process alone."""
    global _shared
    cores = os.cpu_count() or 1
    try:
        d = peers_dir()
        if _shared is None:
            d.mkdir(mode=0o700, exist_ok=True)
            # locked before it is visible under its name: a peer never takes it for a dead holder's
            tmp = d / f".{os.getpid()}.new"
            f = open(tmp, "w")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, d / str(os.getpid()))
            _shared = (f, os.getpid())
            atexit.register(_leave)
        live = 0
        for p in d.iterdir():
            if p.name.startswith("."):
                continue  # being registered
            if p.name == str(os.getpid()):
                live += 1
                continue
            try:
                with open(p) as other:
                    try:
                        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        live += 1  # held: its process runs
                        continue
                    p.unlink(missing_ok=True)  # nobody holds it: its process is gone
            except OSError:
                continue
        return max(1, cores // max(1, live))
    except OSError:
        return cores


def rebalance() -> int | None:
    """Under the default policy, set this process's threads to its current fair share; returns the
    threads now in effect, or None when the threads were chosen explicitly (nothing changes)."""
    if _shared is None:
        return None
    n = fair_share()
    if n != _current:
        _apply(n)
    return n


def set_threads(n: int | None = None) -> dict:
    """Use `n` threads for BLAS and the parallel Numba kernels (default: $NPGPT_THREADS, else a fair
    share of the cores among running npgpt processes, see the module doc). Returns what is in effect
    (see `thread_info`)."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise NpgptError(f"threads must be an integer >= 1, got {n!r}")
    n = n or env_threads()
    if n is None:
        n = fair_share()
    else:  # chosen explicitly from here on
        _leave()
    _apply(n)
    return thread_info()


def _leave():
    """Leave the registry (the file goes; its lock goes with the process anyway). A forked child that
    inherited the registration leaves its parent's file alone."""
    global _shared
    if _shared is not None:
        f, pid = _shared
        if pid == os.getpid():
            Path(f.name).with_name(str(pid)).unlink(missing_ok=True)
        f.close()
        _shared = None


def _apply(n: int):
    global _current
    import numpy  # noqa: F401  (BLAS must be loaded to be found)
    _current = n
    blas = _openblas()
    if blas:
        blas[1](int(n))
    if "numba" in sys.modules:  # already imported: resize its pool (up to the size it started with)
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    else:  # not imported (inference may never import it): a pool that can grow to every core, of
        # which kernels.py uses current() threads once it is imported
        os.environ.setdefault("NUMBA_NUM_THREADS", str(os.cpu_count() or 1))


def current() -> int | None:
    """The threads set by set_threads / rebalance (None before either ran)."""
    return _current


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
    """{"blas": BLAS threads (None if unknown), "blas_kernels": the CPU OpenBLAS's kernels were written for
    (None if unknown), "numba": threads of the parallel (int8) kernels; the training kernels use one,
    "cores": cpu count}."""
    import numpy  # noqa: F401
    blas = _openblas()
    if "numba" in sys.modules:
        import numba
        nthreads = numba.get_num_threads()
    else:  # what kernels.py will set once Numba is imported
        pool = int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1))
        nthreads = min(_current, pool) if _current else pool
    kernels = blas[2]().decode() if blas and blas[2] is not None else None
    return {"blas": int(blas[0]()) if blas else None, "blas_kernels": kernels, "numba": nthreads,
            "cores": os.cpu_count()}
