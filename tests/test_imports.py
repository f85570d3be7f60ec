"""The import graph of the project (every ``import``, also those inside functions): no cycle, and no import from a
lower room to a higher one. A room may import its own room and the rooms below it (lower rank), never above."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

# rank of each room, from the bottom of the house up (the first matching prefix counts)
ROOMS: list[tuple[str, int]] = [
    ("ldm.errors", 0), ("ldm.io", 0),
    ("ldm.util", 1), ("ldm.checkpoint", 1), ("ldm.provenance", 1), ("ldm.lr_scheduler", 1),
    ("ldm.config", 2),
    ("ldm.modules", 3),
    ("ldm.models", 4), ("ldm.data", 4),
    ("ldm.inference", 5),
    # generation, evaluation and the embedding tools: never training
    ("ldm.generate", 6), ("evaluation", 6), ("merge_embeddings", 6), ("scripts.txt2img", 6), ("scripts.stable_txt2img", 6),
    ("scripts.embedding_tool", 6), ("scripts.evaluate_model", 6), ("scripts.evaluate_vae", 6), ("scripts.export_ema_weights", 6),
    ("scripts.peer_step", 6), ("ldm.diffusers_export", 6), ("scripts.convert_to_diffusers", 6), ("scripts.draw_in_diffusers", 6),
    ("ldm.train", 7),
    ("main", 8), ("scripts.benchmark", 8), ("scripts.gpu_check", 8), ("scripts.robustness", 8), ("scripts.peer_invert", 8),
    ("ldm", 0),  # the package's own __init__ (empty)
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [p for room in ("ldm", "evaluation", "scripts") for p in (REPO / room).rglob("*.py")]
    return {module_name(p): p for p in files + [REPO / "main.py", REPO / "merge_embeddings.py"]}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (a ``from package import module`` names the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if name.startswith("scripts.") and f"scripts.{target}" in modules:  # scripts import each other by file name
                target = f"scripts.{target}"
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def rank(name: str) -> int:
    for prefix, value in ROOMS:
        if name == prefix or name.startswith(prefix + "."):
            return value
    raise AssertionError(f"module {name} is in no room of tests/test_imports.py: add it to ROOMS")


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_room(graph):
    for name in graph:
        rank(name)


def test_no_import_from_a_lower_room_to_a_higher_one(graph):
    upward = sorted((a, b) for a, deps in graph.items() for b in deps if rank(b) > rank(a))
    assert not upward, "imports up the house (importer -> imported): " + ", ".join(f"{a} -> {b}" for a, b in upward)


def test_no_import_cycle(graph):
    found = [sorted(c) for c in cycles(graph)]
    assert not found, f"import cycles: {found}"


def test_the_walk_sees_cycles_and_upward_imports():
    """The checks themselves: a made-up graph with a cycle and an upward import is caught."""
    graph = {"ldm.modules.a": {"ldm.modules.b", "ldm.train.cli"}, "ldm.modules.b": {"ldm.modules.a"}, "ldm.train.cli": set()}
    assert cycles(graph) == [frozenset({"ldm.modules.a", "ldm.modules.b"})]
    assert rank("ldm.train.cli") > rank("ldm.modules.a") and rank("ldm.generate") < rank("ldm.train.data")


@pytest.mark.slow
def test_generation_does_not_load_training_code():
    """What the graph says, at run time: the generation and evaluation modules load nothing of ldm.train."""
    code = ("import sys, ldm.generate, ldm.inference, evaluation.clip_eval, evaluation.shapes_eval;"
            "print(sorted(m for m in sys.modules if m.startswith('ldm.train')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_commands_do_not_load_diffusers():
    """diffusers is a test/peer extra: the three commands and the embedding tools run without it."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import main, merge_embeddings, txt2img, stable_txt2img, embedding_tool;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
