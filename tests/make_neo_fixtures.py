"""Regenerate tests/fixtures/neo/: small GPT-Neo checkpoints made by transformers, with its outputs.

    python tests/make_neo_fixtures.py      (needs torch + transformers; `pip install -e .[ref]`)

GPT-Neo is GPT-3's layout as EleutherAI built it: dense ("global") and locally banded ("local") layers,
separate q/k/v projections without biases, and no 1/sqrt(d) scaling of the attention scores. Each shape
has prompts longer than its window; as for GPT-2 (make_hf_fixtures.py) the weights are spread wider
than the init and transformers' logits, loss and greedy tokens are stored in expected.safetensors.
"""
from __future__ import annotations

import shutil

import numpy as np

from make_hf_fixtures import HERE, reference_outputs

OUT = HERE / "fixtures" / "neo"

SHAPES = {
    # global then local, as GPT-Neo 125M; window 5, context 40
    "neo-l2h4c32-w5": dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=5,
                           hidden_size=32, num_heads=4, max_position_embeddings=40, vocab_size=300),
    # an odd window, a local layer first and last, an MLP width of its own, a context of 37
    "neo-l3h2c48-w7": dict(num_layers=3, attention_types=[[["local", "global", "local"], 1]], window_size=7,
                           hidden_size=48, num_heads=2, max_position_embeddings=37, vocab_size=517,
                           intermediate_size=96, layer_norm_epsilon=1e-6),
}


def build(kwargs: dict, seed: int):
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    torch.manual_seed(seed)
    eos = kwargs["vocab_size"] - 1
    model = GPTNeoForCausalLM(GPTNeoConfig(bos_token_id=eos, eos_token_id=eos, **kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.12 if p.dim() == 2 else 0.1)  # unscaled scores: keep them moderate
    return model


def main():
    for seed, (name, kwargs) in enumerate(SHAPES.items()):
        d = OUT / name
        shutil.rmtree(d, ignore_errors=True)
        model = build(kwargs, seed)
        model.save_pretrained(d, safe_serialization=True)
        cfg = {"vocab_size": kwargs["vocab_size"], "n_positions": kwargs["max_position_embeddings"]}
        rng = np.random.default_rng(seed)
        V, T = cfg["vocab_size"], cfg["n_positions"]
        prompts = [rng.integers(0, V, (1, 7)), rng.integers(0, V, (2, T // 2)), rng.integers(0, V, (1, T))]
        from npgpt.tensorfile import write_safetensors
        write_safetensors(d / "expected.safetensors", sorted(reference_outputs(model, cfg, prompts).items()))
        print("wrote", d)


if __name__ == "__main__":
    main()
