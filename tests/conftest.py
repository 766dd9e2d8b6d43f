import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpora" / "tinyshakespeare.txt"


def require(module: str):
    """Import a reference library (torch, transformers, tiktoken) for a live comparison test: skipped
    when it is not installed, except under NPGPT_REQUIRE_REF=1 (set by .ci/run, which installs them),
    where a failed import fails the test instead of hiding it as a skip."""
    if os.environ.get("NPGPT_REQUIRE_REF"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="session")
def shakespeare_data(tmp_path_factory):
    """A char-level data dir made from the first 100 kB of the shipped corpus."""
    from npgpt.data import prepare
    d = tmp_path_factory.mktemp("data")
    (d / "small.txt").write_text(CORPUS.read_text()[:100_000])
    prepare([d / "small.txt"], d / "prepared", "char")
    return d / "prepared"


def run_cli(*args, input=None, env=None, timeout=300):
    """Run the installed `npgpt` entry point in a subprocess; returns CompletedProcess (text)."""
    cmd = [sys.executable, "-m", "npgpt_cli.main", *map(str, args)]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def numeric_grad(f, x, coords=None, h=1e-6):
    """Central differences of the scalar f() with respect to elements of x (changed in place and
    restored): the whole gradient shaped like x, or the values at the flat indices `coords`."""
    flat = x.reshape(-1)
    idx = range(flat.size) if coords is None else coords
    out = np.zeros(len(idx))
    for n, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[n] = (fp - fm) / (2 * h)
    return out.reshape(x.shape) if coords is None else out
