"""llama.cpp, the inference peer of `make bench`: built once from the source that the llama-cpp-python sdist
vendors, cached outside the repo, and run with `llama-bench` on the benchmark's GPT-2 124M converted to
GGUF (f32, f16, q8_0) by llama.cpp's own `convert_hf_to_gguf.py`.

    python benchmarks/llamacpp.py HF_DIR [--threads 2]     # prints {"f32": {"pp512": tok/s, "tg128": tok/s}, ...}

The cache is $NPGPT_BENCH_CACHE, else ~/.cache/npgpt-bench. Nothing here is imported by npgpt.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp
CACHE = Path(os.environ.get("NPGPT_BENCH_CACHE", Path.home() / ".cache" / "npgpt-bench"))


def log(msg: str):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def source() -> Path:
    """The vendored llama.cpp tree, downloaded (pip) and unpacked on first use."""
    root = CACHE / f"llama_cpp_python-{VERSION}"
    src = root / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {VERSION} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as t:
        t.extractall(CACHE, filter="data")
    return src


def binaries(native: bool = True) -> Path:
    """Dir holding llama-bench and llama-quantize (CMake Release, -march=native unless native=False)."""
    src = source()
    build = CACHE / ("build-native" if native else "build-generic")
    bench = build / "bin" / "llama-bench"
    if bench.is_file():
        return bench.parent
    build.mkdir(parents=True, exist_ok=True)
    log(f"building llama-bench in {build} (a few minutes, once; compiler output in build.log)")
    with open(build / "build.log", "w") as out:
        for cmd in (["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DGGML_NATIVE={'ON' if native else 'OFF'}", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                     "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON"],
                    ["cmake", "--build", str(build), "--config", "Release", "-j", str(os.cpu_count() or 2),
                     "--target", "llama-bench", "llama-quantize"]):
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return bench.parent


def gguf(hf_dir: Path, outtype: str) -> Path:
    """hf_dir converted to GGUF by llama.cpp's converter (cached next to hf_dir)."""
    out = hf_dir.parent / f"{hf_dir.name}-{outtype}.gguf"
    if out.is_file():
        return out
    src = source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    log(f"converting {hf_dir.name} to {outtype}")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype,
                    "--outfile", str(out)], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def bench(model: Path, threads: int, prompt: int = 512, new: int = 128, reps: int = 5) -> dict:
    """llama-bench's pp{prompt} and tg{new} tokens/s (mean over `reps` repetitions, its own statistic)."""
    exe = binaries() / "llama-bench"
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(new),
                          "-r", str(reps), "-o", "json"], check=True, capture_output=True, text=True).stdout
    res = {}
    for r in json.loads(out):
        key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        res[key] = r["avg_ts"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f32,f16,q8_0")
    args = ap.parse_args()
    print(json.dumps({t: bench(gguf(args.hf_dir, t), args.threads) for t in args.types.split(",")}))


if __name__ == "__main__":
    main()
