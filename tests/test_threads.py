"""The default thread policy shares the cores among the npgpt processes running on them, and follows
them as they start and end; explicit threads leave it. Each process runs in a subprocess with its own
registry dir (XDG_RUNTIME_DIR), so the test process's threads are never touched."""
import json
import os
import subprocess
import sys
import time

import pytest

CORES = os.cpu_count() or 1

HOLDER = r"""
import sys, time
from npgpt.threads import set_threads
print(set_threads()["blas"], flush=True)
sys.stdin.readline()  # hold until told
"""

PROBE = r"""
import json, sys
from npgpt.threads import set_threads, rebalance
print(json.dumps(set_threads(int(sys.argv[1]) if len(sys.argv) > 1 else None)))
"""


def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k != "NPGPT_THREADS"}
    e["XDG_RUNTIME_DIR"] = str(tmp_path)
    return e


def probe(tmp_path, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env=env(tmp_path), capture_output=True, text=True,
                         check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.skipif(CORES < 2, reason="one core: nothing to share")
def test_two_processes_share_the_cores_and_a_finished_one_gives_its_share_back(tmp_path):
    assert probe(tmp_path)["blas"] == CORES  # alone: every core
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=env(tmp_path), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert int(holder.stdout.readline()) == CORES
        got = probe(tmp_path)
        assert got["blas"] == CORES // 2 and got["numba"] == CORES // 2
        assert probe(tmp_path, "1")["blas"] == 1  # explicit threads are never changed
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    assert probe(tmp_path)["blas"] == CORES
    reg = tmp_path / f"npgpt-threads-{os.getuid()}"
    assert list(reg.iterdir()) == []  # every process left the registry on exit


@pytest.mark.skipif(CORES < 2, reason="one core: nothing to share")
def test_a_running_job_rebalances_when_another_starts_and_ends(tmp_path):
    job = r"""
import sys
from npgpt.threads import set_threads, rebalance
set_threads()
for line in sys.stdin:
    print(rebalance(), flush=True)
"""
    a = subprocess.Popen([sys.executable, "-c", job], env=env(tmp_path), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)

    def ask():
        a.stdin.write("\n")
        a.stdin.flush()
        return int(a.stdout.readline())

    try:
        assert ask() == CORES
        b = subprocess.Popen([sys.executable, "-c", HOLDER], env=env(tmp_path), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert int(b.stdout.readline()) == CORES // 2
        assert ask() == CORES // 2
        b.kill()  # dies without cleaning up: its file stays, unlocked
        b.wait(timeout=60)
        time.sleep(0.1)
        assert ask() == CORES
    finally:
        a.stdin.close()
        a.wait(timeout=60)


def test_a_stale_entry_is_removed_and_an_unwritable_registry_means_every_core(tmp_path):
    reg = tmp_path / f"npgpt-threads-{os.getuid()}"
    reg.mkdir()
    (reg / "999999999").write_text("")  # a holder that died: nobody holds its lock
    assert probe(tmp_path)["blas"] == CORES
    assert not (reg / "999999999").exists()
    (tmp_path / "file").write_text("")
    e = env(tmp_path)
    e["XDG_RUNTIME_DIR"] = str(tmp_path / "file")  # not a dir: the registry cannot exist
    out = subprocess.run([sys.executable, "-c", PROBE], env=e, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f'"blas": {CORES}' in out.stdout


def test_thread_info_names_the_kernels_openblas_loaded(tmp_path):
    """What `npgpt train` prints and the benchmarks record: the CPU OpenBLAS's kernels were written for,
    which $OPENBLAS_CORETYPE chooses when it is set (this workplace pins Haswell; a user's NumPy picks)."""
    e = env(tmp_path)
    e["OPENBLAS_CORETYPE"] = "Haswell"
    out = subprocess.run([sys.executable, "-c", "import json; from npgpt.threads import thread_info; "
                          "print(json.dumps(thread_info()))"], env=e, capture_output=True, text=True, check=True,
                         timeout=60)
    kernels = json.loads(out.stdout)["blas_kernels"]
    if kernels is None:
        pytest.skip("this OpenBLAS does not name its kernels")
    with open("/proc/cpuinfo") as f:
        avx2 = "avx2" in f.read()
    assert kernels == "Haswell" or not avx2
