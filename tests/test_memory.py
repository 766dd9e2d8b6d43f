"""Memory: weights are memory-mapped, inference never imports Numba, training reuses its temporaries."""
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
    npgpt.generate(m, "Hello, my name is", 24, temperature=0.8, seed=0)
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


TRAIN_SCRIPT = r"""
import resource
import numpy as np
from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.optim import AdamW
from npgpt.params import decay_mask
cfg = GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=65)
model = GPT(cfg, seed=0)
opt = AdamW(model.flat, decay_mask(cfg))
x = np.random.default_rng(0).integers(0, 65, (12, 64))
def step():
    model.zero_grad()  # as every training loop does before its first backward
    model.loss(x, x)
    model.backward()
    opt.step(model.grad, 1e-3, 1.0)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_training_steps_reuse_memory_instead_of_faulting_it_in():
    """Each step frees and reallocates the same temporaries; glibc would hand them back to the kernel and
    fault them in again every step (25-30% of a small model's step) unless training keeps them."""
    out = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], check=True, timeout=300, capture_output=True, text=True)
    faults_per_step = float(out.stdout.split()[-1])
    assert faults_per_step < 50, faults_per_step  # ~2,600 per step without the fix
