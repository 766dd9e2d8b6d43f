"""Regenerate tests/fixtures/hf/: small GPT-2 checkpoints made by transformers, with its outputs.

    python tests/make_hf_fixtures.py      (needs torch + transformers; `pip install -e .[ref]`)
    python tests/make_hf_fixtures.py --perplexity-only     (only the perplexity references)

For each shape: transformers builds a GPT2LMHeadModel (fixed seed), its weights are spread to a larger
scale than the 0.02 init (so logits differ by whole units and a wrong layer cannot hide), it is saved
with save_pretrained, and its own outputs are stored in expected.safetensors: logits for several
prompts (one filling the whole context), the mean loss on them, and 50 greedy tokens from
`generate` (fewer where the context is shorter). tests/test_hf.py checks npgpt against these files without torch, and against live
transformers models when it is installed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "fixtures" / "hf"

SHAPES = {
    # name: (GPT2Config kwargs, save options)
    "l2h4c32": (dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=300), dict(tokenizer=True)),
    "l3h2c48": (dict(n_layer=3, n_head=2, n_embd=48, n_positions=32, vocab_size=517, n_inner=96,
                     layer_norm_epsilon=1e-6), dict()),
    "l1h8c64-bf16-sharded": (dict(n_layer=1, n_head=8, n_embd=64, n_positions=96, vocab_size=500),
                             dict(dtype="bfloat16", max_shard_size="100KB")),
}


def build(kwargs: dict, seed: int):
    """A transformers GPT2LMHeadModel with weights spread wider than the init, in eval mode."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    eos = kwargs["vocab_size"] - 1
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, **kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.25 if p.dim() == 2 else 0.1)
    return model


def prompts_for(cfg: dict, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    V, T = cfg["vocab_size"], cfg["n_positions"]
    return [rng.integers(0, V, (1, 7)), rng.integers(0, V, (2, T // 2)), rng.integers(0, V, (1, T))]


def reference_outputs(model, cfg: dict, prompts) -> dict[str, np.ndarray]:
    """transformers' logits, loss and 50 greedy tokens for each prompt."""
    import torch
    out = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            x = torch.from_numpy(p)
            res = model(x, labels=x)
            out[f"prompt{i}"] = p.astype(np.int64)
            out[f"logits{i}"] = res.logits.float().numpy()
            out[f"loss{i}"] = np.array([float(res.loss)], np.float64)
        g = prompts[0]
        n_new = min(50, cfg["n_positions"] - g.shape[1])  # 50 where the context allows it
        ids = model.generate(torch.from_numpy(g), attention_mask=torch.ones_like(torch.from_numpy(g)),
                             do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                             pad_token_id=cfg["vocab_size"] - 1)
        out["greedy"] = ids.numpy().astype(np.int64)
    return out


PPL_TEXT = slice(5000, 8000)  # characters of the shipped corpus scored for perplexity
PPL_STRIDES = (24, 64)        # a stride shorter than the context (64) and the default, equal to it


def window_start(j: int, block: int, stride: int) -> int:
    """Where the context of target j >= 1 begins: windows of block + 1 tokens start every `stride`
    tokens and a target is scored by the first window that predicts it."""
    return 0 if j <= block else -(-(j - block) // stride) * stride


def reference_perplexity(model, ids: np.ndarray, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) by brute force with transformers, independent of npgpt's window loop:
    one forward per target token j = 1 .. len(ids) - 1, on ids[window_start(j):j], reading only the
    last position's logits. Every token but the first is scored exactly once by construction."""
    import torch
    block = model.config.n_positions
    total = 0.0
    with torch.no_grad():
        for j in range(1, len(ids)):
            x = torch.from_numpy(np.ascontiguousarray(ids[window_start(j, block, stride):j])[None])
            logp = torch.log_softmax(model(x).logits[0, -1].double(), -1)
            total -= float(logp[int(ids[j])])
    return float(np.exp(total / (len(ids) - 1))), len(ids) - 1


def perplexity_fixtures(d: Path, model) -> dict[str, np.ndarray]:
    """Reference perplexity of the PPL_TEXT slice (GPT-2 tokenizer files in d) at each of PPL_STRIDES."""
    from npgpt.tokenizer import Tokenizer
    text = (HERE.parent / "corpora" / "tinyshakespeare.txt").read_text()[PPL_TEXT]
    ids = np.array(Tokenizer.gpt2(d).encode(text), np.int64)
    return {f"ppl{s}": np.array([reference_perplexity(model, ids, s)[0]], np.float64) for s in PPL_STRIDES}


def update_perplexity_fixture(name: str = "l2h4c32"):
    """Recompute only the perplexity entries of one fixture's expected.safetensors (its model and
    tokenizer files, and every other entry, stay as they are)."""
    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(1)
    d = OUT / name
    model = GPT2LMHeadModel.from_pretrained(d).eval().float()
    ref = {k: v for k, v in load_file(str(d / "expected.safetensors")).items() if not k.startswith("ppl")}
    ref.update(perplexity_fixtures(d, model))
    save_file(ref, str(d / "expected.safetensors"))


def train_tokenizer(d: Path, vocab_size: int):
    """A byte-level BPE (GPT-2 style vocab.json + merges.txt) small enough for the fixture's vocabulary."""
    from npgpt.tokenizer import Tokenizer
    corpus = (HERE.parent / "corpora" / "tinyshakespeare.txt").read_text()[:200_000]
    tok = Tokenizer.train_bpe([corpus], vocab_size)
    tok.tk.model.save(str(d))
    return tok


def main():
    import torch
    from safetensors.numpy import save_file
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    for k, (name, (kwargs, opts)) in enumerate(SHAPES.items()):
        d = OUT / name
        d.mkdir(parents=True)
        model = build(kwargs, seed=100 + k)
        if opts.get("dtype") == "bfloat16":
            model = model.to(torch.bfloat16)
        model.save_pretrained(d, safe_serialization=True, max_shard_size=opts.get("max_shard_size", "2GB"))
        (d / "generation_config.json").unlink(missing_ok=True)
        model = model.float()  # reference numbers in float32, from the (possibly bf16-rounded) weights
        ref = reference_outputs(model, kwargs, prompts_for(kwargs, seed=k))
        if opts.get("tokenizer"):
            train_tokenizer(d, kwargs["vocab_size"])
            ref.update(perplexity_fixtures(d, model))
        save_file(ref, str(d / "expected.safetensors"))
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{name}: {size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["--perplexity-only"]:
        update_perplexity_fixture()
    else:
        main()
