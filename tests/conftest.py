import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpora" / "tinyshakespeare.txt"


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
