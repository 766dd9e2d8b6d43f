"""npgpt: a framework-free GPT engine in NumPy and Numba.

    import npgpt
    model = npgpt.load("weights/shakespeare-char")        # any checkpoint dir; weights are memory-mapped
    logits = model.forward([[1, 2, 3]])                   # [B, T, V] float32
    ids = npgpt.generate(model, "ROMEO:", max_new_tokens=100, temperature=0.8, seed=0)
    print(model.tokenizer.decode(ids[0]))
"""
from .checkpoint import load_model as load
from .config import GPTConfig, TrainConfig, preset
from .data import prepare
from .errors import NpgptError
from .model import GPT
from .sampling import generate
from .threads import set_threads
from .tokenizer import Tokenizer
from .train import train

__version__ = "0.1.0"
__all__ = ["load", "GPT", "GPTConfig", "TrainConfig", "preset", "prepare", "train", "generate", "Tokenizer",
           "NpgptError", "set_threads", "__version__"]
