"""Data-parallel training on MPI (#18): `mpirun -n 2 npgpt train` beside one process, on the `small`
preset (6/6/384, T 256, B 8) over tiny shakespeare. Three figures:

1. this machine: 2 ranks x 1 thread vs 1 process x 2 threads, the same global batch (grad_accum 2):
   tokens/s and their ratio (goal >= 1.0x);
2. two emulated hosts: two network namespaces joined by a veth pair that tc (tbf) limits to 1 Gbit/s,
   MPI over TCP (UCX's tcp transport; MPICH's shared memory off), 1 thread per rank: scaling efficiency =
   2-rank tokens/s / (2 x one rank's alone), with overlap (4 MB buckets) and without (--bucket-mb 0)
   (goal >= 80% with overlap);
3. communication per step: the bytes rank 0 put on the veth per step (its counters, sampled as steps
   are logged) vs 2(N-1)/N x the all-reduced gradient bytes plus the chained sums, and the seconds per
   step a rank waited for the sums (metrics.jsonl comm_wait_s, what --verbose prints).

    python benchmarks/mpi.py [--steps 8] [--rounds 3] [--smoke]

Each figure's runs are interleaved over --rounds rounds (a fresh process each time) and the medians
reported: on these VMs one run can be 15% off the next.

Figure 2 needs root (ip netns, tc). It makes its namespaces, veth pair and addresses (10.231.0.1/.2,
inside the namespaces only) itself, bounds every run by --timeout, and removes them however it ends;
where the sandbox refuses `ip netns add`, it says so with the system's error and skips the figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else shutil.which("mpiexec")
NPGPT = [sys.executable, "-m", "npgpt_cli.main", "train"]
HOSTS = ("10.231.0.1", "10.231.0.2")
DEV = "npgv0"  # the veth end's name inside each namespace
# MPI over TCP between the namespaces: no MPICH shared memory, UCX on the veth only
TCP_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": DEV}


def train_args(data, out, steps, smoke, *extra):
    size = ["--preset", "baby", "--batch_size", "4"] if smoke else ["--preset", "small", "--batch_size", "8"]
    return ["--data", str(data), "--out", str(out), "--force", "--quiet", *size, "--max_iters", str(steps),
            "--eval_interval", str(steps), "--eval_iters", "1", *map(str, extra)]


def run(cmd, out: Path, timeout: float, warm: int, counter=None) -> dict:
    """Run a training command (its own process group, killed whole past `timeout`); from its metrics:
    the median tokens/s and comm_wait_s of the steps after the first `warm`. With `counter` (a function
    giving a byte count), the bytes counted per step between the first timed step and the last."""
    shutil.rmtree(out, ignore_errors=True)  # no metrics of an earlier run are read as this one's
    log = open(out.with_name("stderr.txt"), "w+")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
    samples, deadline = {}, time.time() + timeout
    try:
        while proc.poll() is None:
            if time.time() > deadline:
                raise TimeoutError(f"over {timeout:.0f} s: {' '.join(map(str, cmd[:6]))} ...")
            if counter is not None:
                n = len(_steps(out))
                if n not in samples:
                    samples[n] = counter()
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {log.read()[-2000:]}")
    steps = _steps(out)[warm:]
    res = {"tok_s": statistics.median(r["tokens_per_sec"] for r in steps),
           "wait_s": statistics.median(r.get("comm_wait_s", 0.0) for r in steps)}
    timed = sorted(n for n in samples if n > warm)
    if len(timed) >= 2:
        res["bytes_per_step"] = (samples[timed[-1]] - samples[timed[0]]) / (timed[-1] - timed[0])
    return res


def rounds(n: int, figures: dict) -> dict:
    """Run every figure (a function returning run()'s dict) once per round, in turn, n rounds: per figure,
    the median of each number over the rounds."""
    got = {k: [] for k in figures}
    for _ in range(n):
        for k, f in figures.items():
            got[k].append(f())
    return {k: {m: statistics.median(r[m] for r in rs) for m in rs[0] if all(m in r for r in rs)}
            for k, rs in got.items()}


def _steps(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    recs = []
    for ln in lines:
        try:
            recs.append(json.loads(ln))
        except ValueError:
            pass
    return [r for r in recs if "loss" in r]


def gradient_bytes(run_dir: Path) -> tuple[int, int]:
    """(bytes all-reduced, bytes of the chained embedding and layernorm sums) per step of the model in
    `run_dir`."""
    from npgpt.checkpoint import read_config
    from npgpt.config import config_from_dict
    from npgpt.distributed import ordered
    from npgpt.params import param_shapes
    sizes = [(n, 4 * math.prod(s)) for n, s in param_shapes(config_from_dict(read_config(run_dir)["model"]))]
    chain = sum(b for n, b in sizes if ordered(n))
    return sum(b for _, b in sizes) - chain, chain


def sh(*cmd):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if r.returncode:
        raise OSError(f"{' '.join(map(str, cmd))}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


class TwoHosts:
    """Two network namespaces joined by a veth pair limited to `rate` by tc; removed on exit."""

    def __init__(self, tmp: Path, rate: str = "1gbit"):
        tag = os.getpid()
        self.ns = (f"npgpt-{tag}-a", f"npgpt-{tag}-b")
        self.rate, self.tmp = rate, tmp

    def __enter__(self):
        a, b = self.ns
        sh("ip", "netns", "add", a)  # the first thing that needs root: its error is the one reported
        try:
            sh("ip", "netns", "add", b)
            tmp_a, tmp_b = f"npa{os.getpid()}"[:15], f"npb{os.getpid()}"[:15]
            sh("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
            for ns, dev, host in ((a, tmp_a, HOSTS[0]), (b, tmp_b, HOSTS[1])):
                sh("ip", "link", "set", dev, "netns", ns)
                sh("ip", "-n", ns, "link", "set", dev, "name", DEV)
                sh("ip", "-n", ns, "addr", "add", f"{host}/24", "dev", DEV)
                sh("ip", "-n", ns, "link", "set", DEV, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("tc", "-n", ns, "qdisc", "add", "dev", DEV, "root", "tbf", "rate", self.rate, "burst", "128kb",
                   "latency", "20ms")
        except BaseException:
            self.__exit__()
            raise
        # hydra starts the remote rank as it would through ssh: `LAUNCHER [options] HOST COMMAND`
        self.launcher = self.tmp / "netns-launch"
        self.launcher.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in -*) shift;; *) break;; esac; done\n"
                                 f"case $1 in {HOSTS[0]}) ns={a};; {HOSTS[1]}) ns={b};; *) exit 1;; esac\n"
                                 "shift\nexec ip netns exec $ns sh -c \"$*\"\n")
        self.launcher.chmod(0o755)
        return self

    def __exit__(self, *exc):
        for ns in self.ns:  # a namespace takes its end of the veth pair with it
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def mpiexec(self, args) -> list[str]:
        env = [f"{k}={v}" for k, v in TCP_ENV.items()]
        return ["ip", "netns", "exec", self.ns[0], "env", *env, MPIEXEC, "-hosts", ",".join(HOSTS), "-ppn", "1",
                "-n", "2", "-launcher", "ssh", "-launcher-exec", str(self.launcher), "-iface", DEV, *NPGPT, *args]

    def tx_bytes(self) -> int:
        return int(sh("ip", "netns", "exec", self.ns[0], "cat", f"/sys/class/net/{DEV}/statistics/tx_bytes"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first 2 are not timed)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--smoke", action="store_true", help="the baby preset, 4 steps: checks the machinery only")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = ap.parse_args()
    if MPIEXEC is None:
        sys.exit("mpiexec not found: pip install -e '.[mpi]'")
    steps = 4 if args.smoke else args.steps
    warm = 2
    import npgpt
    name = "baby (smoke)" if args.smoke else "small"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        npgpt.prepare([ROOT / "corpora" / "tinyshakespeare.txt"], tmp / "data", "char")
        out = tmp / "run"
        common = lambda *extra: train_args(tmp / "data", out, steps, args.smoke, *extra)  # noqa: E731

        print(f"npgpt train --preset {name}, {steps} steps ({steps - warm} timed), {args.rounds} interleaved "
              f"rounds: medians; "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the start")
        one, two = rounds(args.rounds, {
            "one": lambda: run([*NPGPT, *common("--threads", 2, "--grad_accum", 2)], out, args.timeout, warm),
            "two": lambda: run([MPIEXEC, "-n", "2", *NPGPT, *common("--threads", 1, "--grad_accum", 2)], out,
                               args.timeout, warm)}).values()
        print(f"{'1 process x 2 threads, grad_accum 2':<46} {one['tok_s']:9,.0f} tok/s")
        print(f"{'2 ranks x 1 thread (shared memory)':<46} {two['tok_s']:9,.0f} tok/s | "
              f"{two['tok_s'] / one['tok_s']:.2f}x one process (goal >= 1.0x); waited {two['wait_s'] * 1e3:.1f} ms "
              f"per step for the sums")

        if os.geteuid() != 0:
            print("two emulated hosts: blocked here: network namespaces and tc need root")
            return
        try:
            hosts = TwoHosts(tmp).__enter__()
        except OSError as e:
            print(f"two emulated hosts: blocked here: {e}")
            return
        try:
            figs = {"solo": lambda: run(["ip", "netns", "exec", hosts.ns[0], *NPGPT,
                                         *common("--threads", 1, "--grad_accum", 1)], out, args.timeout, warm)}
            for label, bucket in (("overlap, 4 MB buckets", 4), ("no overlap (--bucket-mb 0)", 0)):
                figs[label] = lambda b=bucket: run(hosts.mpiexec(common("--threads", 1, "--grad_accum", 2,
                                                                        "--bucket-mb", b)),
                                                   out, args.timeout, warm, counter=hosts.tx_bytes)
            rows = rounds(args.rounds, figs)
            solo = rows.pop("solo")
        finally:
            hosts.__exit__()
        reduced, chain = gradient_bytes(out)
        expect = 2 * (2 - 1) / 2 * reduced + chain
        print(f"two emulated hosts (veth, tc tbf {hosts.rate}, MPI over TCP), 1 thread per rank:")
        print(f"{'  1 rank alone (grad_accum 1)':<46} {solo['tok_s']:9,.0f} tok/s")
        for label, r in rows.items():
            print(f"{'  2 ranks, ' + label:<46} {r['tok_s']:9,.0f} tok/s | scaling efficiency "
                  f"{r['tok_s'] / (2 * solo['tok_s']):.1%} (goal >= 80% with overlap); waited "
                  f"{r['wait_s'] * 1e3:.1f} ms per step for the sums")
        for label, r in rows.items():
            if "bytes_per_step" in r:
                print(f"  bytes rank 0 sent per step, {label}: {r['bytes_per_step'] / 1e6:,.2f} MB on the veth vs "
                      f"{expect / 1e6:,.2f} MB = 2(N-1)/N x {reduced / 1e6:,.2f} MB all-reduced + "
                      f"{chain / 1e6:,.2f} MB chained | {r['bytes_per_step'] / expect:.2f}x")


if __name__ == "__main__":
    main()
