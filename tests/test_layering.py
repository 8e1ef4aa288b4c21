"""The package's layers (docs/design.md, "Package layers"), checked statically: every `import` statement of
ar2diff/, at any depth (inside functions too), is read from the source. An import may point down the order or stay
inside its layer, never up; no set of modules imports itself round (a cycle, counting imports inside functions); no
module imports another module's private name. Imports inside functions remain only to defer a heavy optional
library, each allowed by name below. A few command lines are also imported for real, to check that they answer
--help without DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ar2diff"

# Low to high. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("fs", ("ar2diff.fs", "ar2diff.dtypes")),
    ("config", ("ar2diff.config",)),
    ("export format", ("ar2diff.export_format",)),
    ("data", ("ar2diff.data",)),
    ("model", ("ar2diff.model",)),
    ("objective", ("ar2diff.objective",)),
    ("decode", ("ar2diff.decode",)),
    ("export read/write", ("ar2diff.checkpoint.export_layout", "ar2diff.checkpoint.safe_export",
                           "ar2diff.checkpoint.reader")),
    ("evaluation", ("ar2diff.evaluation",)),
    ("checkpoint", ("ar2diff.checkpoint",)),
    ("plan", ("ar2diff.plan",)),
    ("trainer", ("ar2diff.trainer", "ar2diff.logging")),
    ("pipeline", ("ar2diff.pipeline", "ar2diff.preflight", "ar2diff.run_folder", "ar2diff.launch", "ar2diff.analysis")),
    ("command lines", ("ar2diff.train", "ar2diff.export", "ar2diff.evaluate", "ar2diff.fetch", "ar2diff.cli_errors",
                       "ar2diff.decode.cli", "ar2diff.decode.cli_checks", "ar2diff.decode.__main__",
                       "ar2diff.plan.__main__", "ar2diff")),
]

# Libraries an import inside a function may defer (heavy, and not needed by every entry point).
DEFERRED_LIBRARIES = {"deepspeed", "matplotlib", "lm_eval", "wandb", "transformers", "hydra", "gguf"}
# Internal imports inside a function, each deferring one of those libraries.
DEFERRED_INTERNAL = {
    ("ar2diff.export", "ar2diff.checkpoint.export"): "DeepSpeed: `python -m ar2diff.export --help` without it",
    ("ar2diff.train", "ar2diff.pipeline"): "DeepSpeed: `python -m ar2diff.train --help` without it",
    ("ar2diff.evaluate", "ar2diff.evaluation.lm_eval_model"): "lm-eval-harness, an optional extra",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (the longest existing module path)
    names: tuple[str, ...]  # names imported from it (empty for `import x`)
    line: int
    nested: bool  # inside a function


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_imports(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under `root` and every import statement in it, at any depth."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pairs = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    package = package[:len(package) - node.level + 1]
                    base = ".".join(package + ([node.module] if node.module else []))
                pairs = [(f"{base}.{a.name}", ()) if f"{base}.{a.name}" in files else (base, (a.name,))
                         for a in node.names]
            else:
                continue
            for target, names in pairs:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.append(Import(module, target, names, node.lineno, id(node) in in_function))
    return set(files), found


def layer_of(module: str, layers=LAYERS) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(layers) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")
    return best[1]


def upward_imports(modules: set[str], imports: list[Import], layers=LAYERS) -> list[str]:
    return [f"{i.module} (layer {layers[layer_of(i.module, layers)][0]!r}) imports {i.target} (layer "
            f"{layers[layer_of(i.target, layers)][0]!r}), line {i.line}"
            for i in imports if i.target in modules and i.target != i.module
            and layer_of(i.target, layers) > layer_of(i.module, layers)]


def cycles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for i in imports:
        if i.target in modules and i.target != i.module:
            edges[i.module].add(i.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    return found


def private_imports(modules: set[str], imports: list[Import]) -> list[str]:
    return [f"{i.module} imports {i.names[0]} from {i.target}, line {i.line}" for i in imports
            if i.target in modules and i.target != i.module and i.names and i.names[0].startswith("_")
            and not i.names[0].startswith("__")]


def undeclared_deferred(modules: set[str], imports: list[Import]) -> list[str]:
    bad = []
    for i in imports:
        if not i.nested:
            continue
        if i.target in modules:
            if (i.module, i.target) not in DEFERRED_INTERNAL:
                bad.append(f"{i.module} imports {i.target} inside a function, line {i.line}")
        elif i.target.split(".")[0] not in DEFERRED_LIBRARIES:
            bad.append(f"{i.module} imports {i.target} inside a function, line {i.line}")
    return bad


MODULES, IMPORTS = read_imports(ROOT)


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_points_up_the_layers():
    assert upward_imports(MODULES, IMPORTS) == []


def test_no_import_cycle_counting_imports_inside_functions():
    assert cycles(MODULES, IMPORTS) == []


def test_no_module_imports_another_modules_private_name():
    assert private_imports(MODULES, IMPORTS) == []


def test_imports_inside_functions_only_defer_a_named_heavy_library():
    assert undeclared_deferred(MODULES, IMPORTS) == []
    used = {(i.module, i.target) for i in IMPORTS if i.nested}
    assert set(DEFERRED_INTERNAL) <= used, "an allowed deferred import no longer exists: drop it from the list"


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "ar2diff"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_planted_upward_import_a_cycle_and_a_private_name(tmp_path):
    """A test of the test: the same functions on a planted tree report what they must, including imports that
    hide inside a function (a relative one among them)."""
    root = _plant(tmp_path, {
        "fs.py": "def f():\n    from ar2diff.trainer import loop\n",
        "model/__init__.py": "",
        "model/a.py": "from ar2diff.model import b\n",
        "model/b.py": "def g():\n    from .a import _hidden\n",
        "trainer/__init__.py": "",
        "trainer/loop.py": "from ar2diff.model.a import x\n",
    })
    modules, imports = read_imports(root)
    assert upward_imports(modules, imports) == [
        "ar2diff.fs (layer 'fs') imports ar2diff.trainer.loop (layer 'trainer'), line 2"]
    assert cycles(modules, imports) == [["ar2diff.model.a", "ar2diff.model.b"]]
    assert private_imports(modules, imports) == ["ar2diff.model.b imports _hidden from ar2diff.model.a, line 2"]
    assert undeclared_deferred(modules, imports) == [
        "ar2diff.fs imports ar2diff.trainer.loop inside a function, line 2",
        "ar2diff.model.b imports ar2diff.model.a inside a function, line 2"]


def test_the_clean_planted_tree_passes(tmp_path):
    root = _plant(tmp_path, {"fs.py": "import json\n", "model/__init__.py": "from ar2diff import fs\n",
                             "trainer/__init__.py": "def f():\n    import deepspeed\n"})
    modules, imports = read_imports(root)
    assert not (upward_imports(modules, imports) or cycles(modules, imports) or private_imports(modules, imports)
                or undeclared_deferred(modules, imports))


@pytest.mark.e2e
@pytest.mark.parametrize("module,forbidden", [
    ("ar2diff.decode.cli", ("deepspeed", "ar2diff.trainer", "ar2diff.data.loader")),
    ("ar2diff.checkpoint.reader", ("deepspeed", "ar2diff.trainer")),
    ("ar2diff.export", ("deepspeed", "ar2diff.trainer")),
    ("ar2diff.train", ("deepspeed",)),
    ("ar2diff.model", ("deepspeed", "ar2diff.objective", "ar2diff.decode", "ar2diff.checkpoint")),
    ("ar2diff.config.schema", ("deepspeed", "torch", "transformers")),
    ("ar2diff.fs", ("torch",)),
])
def test_import_does_not_pull_in(module, forbidden):
    """What the static order cannot see: a library imported by a module below."""
    code = (f"import sys, {module}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{module} imports {proc.stdout.strip()}: {proc.stderr[-500:]}"


def test_model_adapter_has_no_loss():
    """The split: TidarLM computes hidden states and logits; losses live in ar2diff.objective."""
    from ar2diff.model.tidar import TidarLM

    assert not any(hasattr(TidarLM, name) for name in ("forward_ar", "balancing_loss", "alpha", "aux_coef"))
