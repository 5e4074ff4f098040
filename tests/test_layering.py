"""Imports point one way: the graph of eexit's modules, read from the source, has no cycle.

Module-level and function-level imports both count (a lazy import inside a function is still a dependency
that makes two files impossible to understand alone); imports under ``if TYPE_CHECKING:`` do not, since they
exist only for annotations. A package's ``__init__`` importing its own submodules is an edge like any other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "eexit"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level:
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    # `from pkg import name` imports the submodule pkg.name when there is one, else pkg itself
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """eexit module -> the eexit modules it imports (outside ``TYPE_CHECKING`` blocks)."""
    known = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skipped:
                continue
            for target in _targets(module, path, node, known):
                while target and target not in known:  # `eexit.x.attr` -> the module eexit.x
                    target = target.rpartition(".")[0]
                if target and target != module:
                    deps.add(target)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_finder_sees_cycles_and_type_checking_exceptions(tmp_path: Path) -> None:
    pkg = tmp_path / "eexit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")  # function-level: counts
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n")
    (pkg / "sub" / "__init__.py").write_text("from ..c import z\nfrom . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("import eexit.c\n")
    graph = import_graph(pkg)
    assert graph["eexit.a"] == {"eexit.b"} and graph["eexit.b"] == {"eexit.a"}
    assert graph["eexit.c"] == set()  # annotations only
    assert graph["eexit.sub"] == {"eexit.c", "eexit.sub.leaf"} and graph["eexit.sub.leaf"] == {"eexit.c"}
    assert find_cycle(graph) in (["eexit.a", "eexit.b", "eexit.a"], ["eexit.b", "eexit.a", "eexit.b"])
    (pkg / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_eexit_has_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("eexit.backbones.base", "eexit.backbones.timm_vit"),  # the registry imports no spec
        ("eexit._fingerprint", "eexit.model"),
        ("eexit.hub", "eexit.attaching"),
        ("eexit.model", "eexit.attaching"),
        ("eexit.staged", "eexit.model"),  # the drivers sit below the model they run for
        ("eexit.hooked", "eexit.model"),
        ("eexit.recorder", "eexit.hooked"),  # and the recorder below both drivers
        ("eexit.recorder", "eexit.staged"),
        ("eexit.config", "eexit"),
        ("eexit.adapters", "eexit.model"),  # adapter records are plain data the model holds
        ("eexit.hub", "eexit.model"),  # the file format and the Hub see adapter snapshots, not the model
        ("eexit._peft", "eexit._fingerprint"),  # seeing through a PeftModel sits below everything that uses it
        ("eexit._peft", "eexit.backbones.base"),
    ],
)
def test_lower_layers_do_not_reach_up(low: str, high: str) -> None:
    graph = import_graph()
    seen, todo = set(), [low]
    while todo:  # everything `low` depends on, directly or not
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert high not in seen, f"{low} depends on {high}"


def test_import_eexit_registers_the_specs_and_loads_no_model_library() -> None:
    code = (
        "import sys, eexit\n"
        "heavy = [m for m in ('timm', 'transformers', 'huggingface_hub', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from eexit.backbones import base\n"
        "assert {'timm_vit', 'hf_vit', 'dyn_perceiver', 't2t_vit'} <= set(base._REGISTRY), sorted(base._REGISTRY)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "code",
    [
        # timm imported after eexit: the registration waits for it, and then the names exist
        "import sys, eexit\nassert 'timm' not in sys.modules\nimport timm\n",
        # timm imported first, or through one of its submodules
        "import timm, eexit\n",
        "import eexit, timm.layers\nimport timm\n",
    ],
    ids=["eexit-then-timm", "timm-then-eexit", "timm-submodule"],
)
def test_import_eexit_registers_its_timm_models_whenever_timm_comes(code: str) -> None:
    check = (
        "assert timm.is_model('t2t_vit_14') and timm.is_model('dyn_perceiver_tiny'), 'not registered'\n"
        "assert type(timm.create_model('t2t_vit_7', num_classes=3)).__name__ == 'T2TViT'\n"
        "assert not any(type(f).__name__ == '_TimmFinder' for f in sys.meta_path)\n"
    )
    subprocess.run([sys.executable, "-c", "import sys\n" + code + check], check=True)


def test_public_api_exports_policies_errors_and_spec_classes() -> None:
    import eexit
    import eexit.backbones
    import eexit.errors
    import eexit.inference
    import eexit.staged

    for name in ("GatePolicy", "ThresholdPolicy", "FixedExitPolicy", "ExitPolicy"):
        assert getattr(eexit, name) is getattr(eexit.inference, name)
    for name in ("EexitError", "EexitValueError", "EexitTypeError", "BackboneError", "AdapterError", "TrainingError"):
        assert getattr(eexit, name) is getattr(eexit.errors, name)
    assert set(eexit.__all__) <= set(dir(eexit))
    assert {"BackboneSpec", "StagedSpec", "GenericSpec"} <= set(eexit.backbones.__all__)
    assert eexit.staged.StagedSpec is eexit.backbones.StagedSpec  # where it used to live still works


def test_no_submodule_is_shadowed_by_a_function() -> None:
    # `import eexit.attach as m` used to give the function attach, not the module that defines it.
    import eexit

    modules = {name.removeprefix("eexit.") for name in module_files() if name.count(".") == 1}
    shadowed = sorted(n for n in eexit.__all__ if n in modules and not isinstance(getattr(eexit, n), type(eexit)))
    assert not shadowed, shadowed
