"""Generation memory: weights are memory-mapped, and inference never imports Numba."""
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import npgpt
from npgpt.config import preset
from npgpt.model import GPT
from npgpt.checkpoint import save_checkpoint
if sys.argv[1] == "make":
    m = GPT(preset("gpt2-124m"), seed=0)
    m.tokenizer = npgpt.Tokenizer.gpt2()
    save_checkpoint(sys.argv[2], m)
else:
    m = npgpt.load(sys.argv[2])
    m.generate("Hello, my name is", 24, temperature=0.8, seed=0)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across fork + exec
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
    print(peak / m.flat.nbytes, "numba" in sys.modules)
"""


@pytest.mark.slow
def test_gpt2_124m_generation_peak_rss_within_115_percent_of_weights(tmp_path):
    d = tmp_path / "gpt2-124m"
    subprocess.run([sys.executable, "-c", SCRIPT, "make", str(d)], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", SCRIPT, "run", str(d)], check=True, timeout=300,
                         capture_output=True, text=True).stdout.split()
    ratio, numba_loaded = float(out[0]), out[1] == "True"
    assert not numba_loaded
    assert ratio <= 1.15, f"peak RSS is {ratio:.3f}x the weight bytes"
