"""The house stays in order: the library's modules import each other without circles, and never upward
(a module imports only from its own floor or the floors below). Function-local imports count too: a
circle hidden inside a function is still a circle."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "npgpt"
FLOORS = [  # bottom to top
    {"errors", "config", "threads", "kernels", "malloc", "assets", "files", "tensorfile"},
    {"layers", "params", "optim", "tokenizer"},
    {"model"},
    {"checkpoint", "sampling", "quant", "data"},
    {"adapt", "train", "finetune", "evaluate", "convert", "chat", "sft", "reward", "ppo", "dpo", "label", "scale", "distributed", "serve"},
    {"__init__"},
]


def imports() -> dict[str, set[str]]:
    """{module: npgpt modules it imports anywhere in its source}."""
    mods = {p.stem for p in PKG.glob("*.py")}
    out = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((PKG / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps |= {a.name for a in node.names}
                elif node.module and node.module.startswith("npgpt."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("npgpt.")}
        out[m] = deps & mods - {m}
    return out


def test_every_module_has_a_floor():
    placed = set().union(*FLOORS)
    assert {p.stem for p in PKG.glob("*.py")} == placed


def test_no_module_imports_upward():
    floor = {m: i for i, f in enumerate(FLOORS) for m in f}
    bad = [f"{m} ({floor[m]}) imports {d} ({floor[d]})" for m, deps in imports().items() for d in deps
           if floor[d] > floor[m]]
    assert not bad, bad


def test_no_import_circles():
    graph = imports()
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
