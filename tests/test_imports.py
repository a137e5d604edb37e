"""The import rules of issue 13, read from the source (ast, every import in a file, lazy ones
included): the checkpoint, tracking and dataset format modules are leaves, the model code imports
no Ray, MLflow or DeepSpeed, kernels/ holds tensor ops, bitlm never imports pipeline, training
never imports evaluation (the job layer, jobs/, wires them), and no two modules import each
other."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["bitlm.model", "bitlm.backbone", "bitlm.head", "bitlm.diffusion", "bitlm.codec"]
MODEL += ["bitlm.config"]
SERVICES = ("ray", "mlflow", "deepspeed")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("bitlm", "pipeline"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


MODULES = _modules()


@cache
def imports(name: str, top_level_only: bool = False) -> frozenset[str]:
    """The modules ``name`` imports (``from a import b`` counts a.b when it is a module)."""
    path = MODULES[name]
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, *([mod] if mod else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
    parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return frozenset(out - parents)  # a package's own __init__ runs anyway


def closure(name: str, packages: bool = True, top_level_only: bool = False) -> set[str]:
    """Every module ``name`` imports, directly or through this repository's modules (with
    ``packages``, also the packages whose ``__init__`` importing a submodule runs; with
    ``top_level_only``, only what importing it runs: no lazy import inside a function)."""
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        for i in imports(m, top_level_only):
            ancestors = (
                [i.rsplit(".", k)[0] for k in range(1, i.count(".") + 1)] if packages else []
            )
            for j in [i, *ancestors]:
                if j not in seen:
                    seen.add(j)
                    todo += [j] if j in MODULES else []
    return seen


def _under(mods: set[str], *roots: str) -> list[str]:
    return sorted(m for m in mods if m.split(".")[0] in roots or m.startswith(roots))


def test_the_checkpoint_module_is_a_leaf():
    assert not _under(closure("bitlm.checkpoint"), "bitlm.train", "bitlm.eval", "ray", "mlflow")
    assert not _under(set(imports("bitlm.checkpoint", top_level_only=True)), "deepspeed")


def test_the_tracking_module_is_a_leaf():
    """Nothing of this repository; MLflow only lazily (``import bitlm.tracking`` stays cheap)."""
    assert not _under(closure("bitlm.tracking", packages=False), "bitlm", "pipeline", "ray")
    assert not _under(set(imports("bitlm.tracking", top_level_only=True)), "mlflow")


def test_the_dataset_format_module_is_a_leaf():
    """Preprocessing and training both import it: nothing of theirs, no service, and importing
    it (the package ``bitlm`` included) loads no torch, which preprocessing's workers avoid."""
    got = closure("bitlm.dataset_format", packages=False)
    assert not _under(got, "bitlm.train", "bitlm.eval", "pipeline", *SERVICES)
    assert not _under(closure("bitlm.dataset_format", top_level_only=True), "torch")
    assert not _under(closure("pipeline.units", top_level_only=True), "torch")


@pytest.mark.parametrize("module", MODEL)
def test_model_code_imports_no_services(module):
    assert not _under(closure(module), *SERVICES)


KERNELS = sorted(m for m in MODULES if m.startswith("bitlm.kernels"))


@pytest.mark.parametrize("module", KERNELS)
def test_kernels_are_tensor_ops(module):
    """kernels/ takes tensors and returns tensors: nothing there walks the model's modules."""
    assert not _under(
        closure(module, packages=False), "bitlm.head", "bitlm.model", "bitlm.backbone"
    )


def _cycles() -> list[tuple[str, str]]:
    """Pairs of this repository's modules that import each other, directly or not."""
    mods = sorted(MODULES)
    reach = {m: closure(m, packages=False) for m in mods}
    return [(a, b) for a in mods for b in mods if a < b and b in reach[a] and a in reach[b]]


def test_bitlm_never_imports_pipeline():
    got = [m for m in MODULES if m.startswith("bitlm") and _under(closure(m), "pipeline")]
    assert got == []


def test_training_never_imports_evaluation():
    """Not even through another module (training's modules reach bitlm.eval in no way)."""
    train = [m for m in MODULES if m.startswith("bitlm.train")]
    assert [m for m in train if _under(closure(m, packages=False), "bitlm.eval")] == []


def test_no_import_cycles():
    assert _cycles() == []
