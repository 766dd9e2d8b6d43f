"""`npgpt serve` under load on loopback, side by side with llama.cpp's llama-server (the peer: the same
OpenAI completions requests, token-id prompts, greedy, streamed).

For each model and each concurrency level (1, 2, 4, 8, 16 clients, each sending requests back to back):
time to first token, inter-token latency and end-to-end latency (p50 / p99), requests/s and aggregate
output tokens/s. Then a disconnect test (a stream dropped mid-generation: how long until its slot is
free) and a soak (--soak requests on the shipped model: errors, server RSS before and after), and the
goals of issue #19. Every level stops at --level-seconds and the whole run at --budget seconds.

Models: the shipped character model (context 128: a 128-token prompt fills it, so every 64 generated
tokens re-encode the newest 64, as `npgpt generate` does); GPT-2 124M with random weights in fp32 and
int8 (the checkpoints decode.py makes; speed does not depend on the values). llama-server (--peer builds
it once, from the llama.cpp source benchmarks/llamacpp.py unpacks) serves the same GPT-2 as f32 and
q8_0 GGUF; it cannot load a character-level npgpt model.

    python benchmarks/serve.py [--threads 2] [--models shipped,gpt2,gpt2-int8] [--levels 1,2,4,8,16]
        [--requests 2] [--prompt 128] [--new 128] [--soak 1000] [--peer] [--budget 1800]
    python benchmarks/serve.py --smoke      # a few requests per figure: checks that the script works
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench-out"
GPT2 = BENCH / "gpt2-124m-random"


# ---------------------------------------------------------------- servers
class Served:
    """A server process on loopback: its base URL and pid; stop() ends it."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024


def start_npgpt(model_dir: Path, threads: int, parallel: int) -> Served:
    """`npgpt serve` on a free port, returned once it says it is ready (model loaded, kernels warm)."""
    p = subprocess.Popen([sys.executable, "-m", "npgpt_cli.main", "serve", "--model", str(model_dir), "--port", "0",
                          "--threads", str(threads), "--parallel", str(parallel), "--max-queue", "1000"],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "ready at" in line:
            threading.Thread(target=p.stderr.read, daemon=True).start()  # keep the pipe drained
            return Served(p, re.search(r"(http://\S+)/", line).group(1))
    raise RuntimeError(f"npgpt serve exited with {p.wait()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_binary() -> Path:
    """llama-server, built once (native CMake Release, no web UI) from the source llamacpp.py unpacks."""
    from llamacpp import CACHE, log, source
    build = CACHE / "build-server"
    exe = build / "bin" / "llama-server"
    if exe.is_file():
        return exe
    src = source()
    build.mkdir(parents=True, exist_ok=True)
    log(f"building llama-server in {build} (a few minutes, once; compiler output in build.log)")
    with open(build / "build.log", "w") as out:
        for cmd in (["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                     "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                     "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF",
                     "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_OPENMP=ON"],
                    ["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
                     "--target", "llama-server"]):
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return exe


def start_llama(gguf: Path, threads: int, parallel: int, slot_ctx: int) -> Served:
    """llama-server with `parallel` slots of slot_ctx positions (continuous batching is its default)."""
    port = free_port()
    p = subprocess.Popen([str(llama_server_binary()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                          "-t", str(threads), "-np", str(parallel), "-c", str(parallel * slot_ctx), "-ngl", "0"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    served, end = Served(p, f"http://127.0.0.1:{port}"), time.time() + 300
    while time.time() < end and p.poll() is None:
        try:
            if get(served.url, "/health")[0] == 200:
                return served
        except OSError:
            pass
        time.sleep(0.2)
    served.stop()
    raise RuntimeError("llama-server did not become healthy")


def get(url: str, path: str):
    c = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    out = r.status, r.read().decode()
    c.close()
    return out


# ---------------------------------------------------------------- clients
def stream(url: str, prompt: list[int], new: int, stop_after: int | None = None) -> dict:
    """One streamed greedy completion: arrival time of every chunk with text, the tokens made (from the
    usage chunk, else one per chunk), or the error. stop_after: drop the connection after that many chunks."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(url.split("//")[1], timeout=600)
    try:
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        times, tokens = [], None
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter() - t0)
                if stop_after and len(times) >= stop_after:
                    return {"times": times}
        return {"times": times, "tokens": tokens if tokens is not None else len(times),
                "e2e": time.perf_counter() - t0}
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        c.close()


def load(url: str, prompts, clients: int, per_client: int, new: int, seconds: float) -> dict:
    """`clients` threads each sending up to per_client requests back to back (prompts taken in turn),
    stopping early at `seconds`; latency percentiles and throughput over what finished."""
    deadline = time.time() + seconds
    t0 = time.perf_counter()

    def client(i):
        out = []
        for j in range(per_client):
            if time.time() > deadline:
                break
            out.append(stream(url, prompts[(i * per_client + j) % len(prompts)], new))
        return out
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r and r["times"]]
    ttft = [r["times"][0] for r in ok]
    itl = [d for r in ok for d in np.diff(r["times"])]
    e2e = [r["e2e"] for r in ok]

    def pct(xs, q):
        return float(np.percentile(xs, q)) if len(xs) else float("nan")
    return {"requests": len(results), "errors": len(results) - len(ok), "tok_s": sum(r["tokens"] for r in ok) / wall,
            "req_s": len(ok) / wall, **{f"{k}_p{q}": pct(xs, q) for k, xs in
                                        (("ttft", ttft), ("itl", itl), ("e2e", e2e)) for q in (50, 99)}}


def show(r: dict) -> str:
    return (f"{r['tok_s']:8.1f} tok/s {r['req_s']:5.2f} req/s | ttft {r['ttft_p50']:6.3f} / {r['ttft_p99']:6.3f} s "
            f"| itl {r['itl_p50'] * 1e3:6.1f} / {r['itl_p99'] * 1e3:6.1f} ms | e2e {r['e2e_p50']:6.2f} / "
            f"{r['e2e_p99']:6.2f} s" + (f" | {r['errors']} errors" if r["errors"] else ""))


def disconnect(served: Served, prompt, step_s: float) -> str:
    """Drop a stream after 5 tokens; time until npgpt's /metrics shows its slot free (step_s: the
    single-stream inter-token latency, about one decode step)."""
    stream(served.url, prompt, 10 ** 6, stop_after=5)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 10:
        if re.search(r"^npgpt_slots_busy 0$", get(served.url, "/metrics")[1], re.M):
            dt = time.perf_counter() - t0
            return f"disconnect: slot free {dt * 1e3:.1f} ms after the client left (one decode step ~{step_s * 1e3:.1f} ms)"
    return "disconnect: slot NOT freed within 10 s"


# ---------------------------------------------------------------- the run
def models(names):
    """{name: (npgpt checkpoint dir, GGUF type for the peer or None)}, making the GPT-2 copies if needed."""
    out = {}
    for name in names:
        if name == "shipped":
            out[name] = (ROOT / "weights" / "shakespeare-char", None)
            continue
        if not (GPT2 / "model.safetensors").is_file():
            import npgpt
            from npgpt.checkpoint import save_checkpoint
            from npgpt.config import preset
            m = npgpt.GPT(preset("gpt2-124m"), seed=0)
            m.tokenizer = npgpt.Tokenizer.gpt2()
            save_checkpoint(GPT2, m)
        if name == "gpt2":
            out[name] = (GPT2, "f32")
        elif name == "gpt2-int8":
            d = BENCH / "gpt2-124m-random-int8"
            if not (d / "config.json").is_file():
                from npgpt.convert import quantize_model
                quantize_model(GPT2, d, format="int8", force=True)
            out[name] = (d, "q8_0")
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def prompts_for(name: str, n: int, length: int) -> list[list[int]]:
    """n fixed prompts of `length` tokens: corpus slices for the char model, random ids for GPT-2."""
    if name == "shipped":
        import npgpt
        tok = npgpt.load(ROOT / "weights" / "shakespeare-char").tokenizer
        text = (ROOT / "corpora" / "tinyshakespeare.txt").read_text()
        return [tok.encode(text[i * 997:i * 997 + length]) for i in range(n)]
    rng = np.random.default_rng(0)
    return [rng.integers(0, 50256, length).tolist() for _ in range(n)]


def peer_gguf(kind: str) -> Path:
    from llamacpp import gguf
    from npgpt.convert import export_hf
    hf = BENCH / "gpt2-124m-random-hf"
    if not (hf / "model.safetensors").is_file():
        export_hf(GPT2, hf, force=True)
    return gguf(hf, kind)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="shipped,gpt2,gpt2-int8")
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="Requests per client at each level.")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--soak", type=int, default=1000, help="Requests of the soak (shipped model, 16 clients).")
    ap.add_argument("--soak-new", type=int, default=32, help="Tokens per soak request.")
    ap.add_argument("--level-seconds", type=float, default=300)
    ap.add_argument("--budget", type=float, default=3600, help="Seconds for the whole run; later figures are skipped.")
    ap.add_argument("--peer", action="store_true", help="Also run llama-server (built once, a few minutes).")
    ap.add_argument("--smoke", action="store_true", help="Levels 1 and 4, 1 request each, 16 tokens, a 20-request soak.")
    args = ap.parse_args()
    if args.smoke:
        args.levels, args.requests, args.new, args.soak, args.soak_new = "1,4", 1, 16, 20, 8
    levels = [int(x) for x in args.levels.split(",")]
    parallel = max(levels)
    end = time.time() + args.budget
    table = {}
    print(f"npgpt serve on loopback, {args.threads} threads, {parallel} slots; prompt {args.prompt} tokens, "
          f"{args.new} new, greedy; p50 / p99", flush=True)
    for name, (model_dir, kind) in models(args.models.split(",")).items():
        prompts = prompts_for(name, 64, args.prompt)
        sides = [("npgpt", lambda: start_npgpt(model_dir, args.threads, parallel))]
        if args.peer and kind:
            sides.append((f"llama-server {kind}", lambda: start_llama(peer_gguf(kind), args.threads, parallel,
                                                                      args.prompt + args.new + 8)))
        for side, start in sides:
            if time.time() > end:
                print(f"{name} {side}: skipped (--budget spent)")
                continue
            try:
                served = start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                print(f"{name} {side}: not available ({type(e).__name__}: {str(e)[:100]})", flush=True)
                continue
            try:
                for c in levels:
                    if time.time() > end:
                        break
                    r = load(served.url, prompts, c, args.requests, args.new, min(args.level_seconds, end - time.time()))
                    table[(name, side, c)] = r
                    ours = table.get((name, "npgpt", c)) if side != "npgpt" else None
                    ratio = f" | npgpt/peer {ours['tok_s'] / r['tok_s']:.2f}x" if ours and r["tok_s"] else ""
                    print(f"{name:<10} {side:<18} c={c:<3} {show(r)}{ratio}", flush=True)
                if side == "npgpt" and (name, side, 1) in table:
                    print(f"{name:<10} {disconnect(served, prompts[0], table[(name, side, 1)]['itl_p50'])}", flush=True)
                if side == "npgpt" and name == "shipped" and args.soak and time.time() < end:
                    before = served.rss_mb()
                    r = load(served.url, prompts, 16, -(-args.soak // 16), args.soak_new, end - time.time())
                    after = served.rss_mb()
                    print(f"soak       npgpt {r['requests']} requests of {args.soak_new} tokens, 16 clients: "
                          f"{r['errors']} errors, RSS {before:.0f} -> {after:.0f} MB ({after / before - 1:+.1%}; "
                          f"goal 0 errors, < +5%)", flush=True)
            finally:
                served.stop()
    goals(table, levels)


def goals(table, levels):
    """The figures issue #19 sets, where this run measured them."""
    def tok(name, c):
        r = table.get((name, "npgpt", c))
        return r["tok_s"] if r else None
    if tok("gpt2", 8) and tok("gpt2", 1):
        print(f"goal GPT-2 124M fp32, 8 streams vs 1: {tok('gpt2', 8) / tok('gpt2', 1):.2f}x (goal >= 4x)")
    if tok("gpt2-int8", 8) and tok("gpt2", 8):
        print(f"goal GPT-2 124M int8 vs fp32, 8 streams: {tok('gpt2-int8', 8) / tok('gpt2', 8):.2f}x (goal >= 2x)")
    if tok("shipped", 16):
        print(f"goal shipped model, 16 streams: {tok('shipped', 16):,.0f} tok/s (goal >= 1,500)")
    for name in ("gpt2", "gpt2-int8", "shipped"):
        r = table.get((name, "npgpt", 8))
        if r:
            print(f"goal time to first token, 8 streams, {name}: p50 {r['ttft_p50']:.3f} s, p99 {r['ttft_p99']:.3f} s "
                  f"(goal p50 <= 1 s, p99 <= 3 s)")


if __name__ == "__main__":
    main()
