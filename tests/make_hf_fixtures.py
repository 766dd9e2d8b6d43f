"""Regenerate tests/fixtures/hf/: small GPT-2 checkpoints made by transformers, with its outputs.

    python tests/make_hf_fixtures.py      (needs torch + transformers; `pip install -e .[ref]`)

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
PPL_STRIDE = 24


def hf_perplexity(model, ids: np.ndarray, stride: int) -> float:
    """Sliding-window perplexity with transformers: labels of tokens already scored are -100."""
    import torch
    block = model.config.n_positions
    total, count, prev_end, begin = 0.0, 0, 0, 0
    with torch.no_grad():
        while True:
            end = min(begin + block, len(ids))
            x = torch.from_numpy(ids[begin:end][None])
            labels = x.clone()
            labels[0, :max(prev_end - begin, 0)] = -100
            n = int((labels[0, 1:] != -100).sum())  # transformers shifts labels by one inside the model
            total += float(model(x, labels=labels).loss) * n
            count += n
            if end == len(ids):
                break
            prev_end, begin = end, begin + stride
    return float(np.exp(total / count))


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
            tok = train_tokenizer(d, kwargs["vocab_size"])
            text = (HERE.parent / "corpora" / "tinyshakespeare.txt").read_text()[PPL_TEXT]
            ids = np.array(tok.encode(text), np.int64)
            ref["ppl"] = np.array([hf_perplexity(model, ids, PPL_STRIDE)], np.float64)
        save_file(ref, str(d / "expected.safetensors"))
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{name}: {size / 1024:.0f} KiB", file=sys.stderr)


if __name__ == "__main__":
    main()
