"""Write the PyTorch reference fixtures that tests/test_reference.py checks npgpt against.

    python tests/make_fixtures.py          (needs torch; from the repository root)

For each small config in CONFIGS: build npgpt's initial parameters with a fixed seed (then perturb the
biases and layernorm parameters so that none is exactly 0 or 1 and the forward really exercises them),
draw a fixed batch from a seeded rng (a few targets set to -1, ignored), and compute in PyTorch
(float32): logits, loss, every parameter gradient, and the losses and gradient norms of STEPS AdamW steps
with global-norm clipping on that same batch (a fixed batch makes the loss fall steadily, which makes the
step losses sensitive to the optimizer's lr, betas and weight decay). Everything lands in
tests/fixtures/<name>.safetensors, with the config and the optimizer settings in tests/fixtures/<name>.json.
A last fixture, adamw.*, checks the optimizer alone on stored gradients. npgpt is compared against the new
fixtures at the end, as a quick check.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import torch_ref  # noqa: E402
from npgpt.config import GPTConfig  # noqa: E402
from npgpt.model import GPT  # noqa: E402
from npgpt.params import make_views, param_shapes  # noqa: E402

FIXTURES = HERE / "fixtures"

# name -> (config, batch size, sequence length); sizes keep all fixtures together near half a megabyte
CONFIGS = {
    "pre_bias": (GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, ln="pre", bias=True), 2, 16),
    "post_bias": (GPTConfig(n_layer=2, n_head=3, n_embd=24, block_size=16, vocab_size=50, ln="post", bias=True), 2, 16),
    "pre_nobias": (GPTConfig(n_layer=2, n_head=2, n_embd=24, block_size=16, vocab_size=50, ln="pre",
                             bias=False), 2, 16),
    # other shapes: 4 heads of 4, an explicit MLP width, T shorter than the context, a non-default eps
    "post_nobias_small": (GPTConfig(n_layer=2, n_head=4, n_embd=16, block_size=20, vocab_size=40, ln="post",
                                    bias=False, n_inner=40, layer_norm_eps=1e-6), 3, 12),
}
SEED = 1234
STEPS = 10
OPTIM = dict(lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, clip=1.0)
N_IGNORED = 3  # targets set to -1 in every batch


def initial_flat(cfg: GPTConfig, seed: int) -> np.ndarray:
    """npgpt's init for `seed`, with every 1-D parameter (biases, layernorm gains/shifts) moved off its
    constant init value by N(0, 0.1) noise."""
    flat = GPT(cfg, seed=seed).flat.copy()
    rng = np.random.default_rng(seed + 1)
    for name, view in make_views(flat, param_shapes(cfg)).items():
        if view.ndim == 1:
            view += (0.1 * rng.standard_normal(view.shape)).astype(np.float32)
    return flat


def draw_batch(rng: np.random.Generator, cfg: GPTConfig, B: int, T: int):
    idx = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    flat_t = targets.reshape(-1)
    flat_t[rng.choice(flat_t.size, size=N_IGNORED, replace=False)] = -1
    return idx, targets


def make_fixture(name: str, cfg: GPTConfig, B: int, T: int, seed: int) -> dict:
    flat = initial_flat(cfg, seed)
    rng = np.random.default_rng(seed + 2)
    idx, targets = draw_batch(rng, cfg, B, T)

    ref = torch_ref.reference(cfg, flat, idx, targets)
    model = torch_ref.build_torch_model(cfg, flat)
    step_losses, grad_norms = torch_ref.train_steps(model, [(idx, targets)] * STEPS, lr=OPTIM["lr"], clip=OPTIM["clip"],
                                        weight_decay=OPTIM["weight_decay"],
                                        betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"])

    tensors = {
        "flat": flat,
        "idx": idx,
        "targets": targets,
        "logits": ref["logits"],
        "loss": np.array([ref["loss"]], np.float64),
        "step_losses": step_losses,
        "grad_norms": grad_norms,
        **{f"grad.{n}": g for n, g in ref["grads"].items()},
    }
    FIXTURES.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(FIXTURES / f"{name}.safetensors"))
    meta = {
        "config": dataclasses.asdict(cfg),
        "batch_size": B, "seq_len": T, "seed": seed, "steps": STEPS, "optim": OPTIM,
        "step_losses": f"AdamW on the fixture batch {STEPS} times: the loss of each step before its update, "
                       "then the loss after the last update",
        "grad_norms": "global gradient norm of each step, before clipping",
        "torch_version": torch.__version__,
    }
    (FIXTURES / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return tensors


ADAMW_SHAPES = [(12, 16), (16,), (16, 8), (8,)]  # the optimizer-only fixture: two weights, two vectors
ADAMW_CLIPS = [1.0, 0.05, 0.0, 0.05, 1.0, 0.05, 0.0, 1.0, 0.05, 1.0]  # active (0.05), inactive (1.0), off (0)


def adamw_case(seed: int) -> dict:
    """AdamW alone: torch's parameters after each of len(ADAMW_CLIPS) steps, from stored gradients whose
    magnitudes span 1e-9 .. 1e-1 (some exactly 0), so bias correction, eps, clipping and decoupled weight
    decay are all checked without a model in the loop."""
    rng = np.random.default_rng(seed)
    n = sum(int(np.prod(s)) for s in ADAMW_SHAPES)
    flat0 = (0.03 * rng.standard_normal(n)).astype(np.float32)  # small, so rounding of p stays << an update
    steps = len(ADAMW_CLIPS)
    grads = (rng.standard_normal((steps, n)) * 10.0 ** rng.uniform(-9, -1, (steps, n))).astype(np.float32)
    grads[:, :5] = 0.0
    params, norms = torch_ref.adamw_reference(ADAMW_SHAPES, flat0, grads, ADAMW_CLIPS, lr=OPTIM["lr"],
                                              weight_decay=OPTIM["weight_decay"],
                                              betas=(OPTIM["beta1"], OPTIM["beta2"]), eps=OPTIM["eps"])
    return {"flat0": flat0, "grads": grads, "clips": np.array(ADAMW_CLIPS, np.float64),
            "params": params, "grad_norms": norms}


def make_adamw_fixture(seed: int) -> dict:
    tensors = adamw_case(seed)
    save_file(tensors, str(FIXTURES / "adamw.safetensors"))
    meta = {"shapes": ADAMW_SHAPES, "optim": {k: v for k, v in OPTIM.items() if k != "clip"}, "seed": seed,
            "params": "parameters after each step", "clips": "clip_grad_norm_ max_norm per step (0: off)",
            "torch_version": torch.__version__}
    (FIXTURES / "adamw.json").write_text(json.dumps(meta, indent=2) + "\n")
    return tensors


def main():
    torch.manual_seed(0)
    for i, (name, (cfg, B, T)) in enumerate(CONFIGS.items()):
        make_fixture(name, cfg, B, T, SEED + 10 * i)
        size = (FIXTURES / f"{name}.safetensors").stat().st_size
        print(f"wrote {name}: {size / 1024:.0f} KiB")
    make_adamw_fixture(SEED + 1000)
    print(f"wrote adamw: {(FIXTURES / 'adamw.safetensors').stat().st_size / 1024:.0f} KiB")

    # quick check of npgpt against what was just written
    import test_reference as tr
    for name in CONFIGS:
        fx = tr.load_fixture(name)
        errs = tr.fixture_errors(fx)
        worst = max(errs.items(), key=lambda kv: kv[1])
        print(f"{name}: worst relative error {worst[1]:.2e} ({worst[0]}); "
              f"step loss max |diff| {tr.step_loss_diff(fx):.2e}")
    print(f"adamw alone: worst relative error {max(tr.adamw_fixture_errors(tr.load_adamw_fixture())):.2e}")


if __name__ == "__main__":
    main()
