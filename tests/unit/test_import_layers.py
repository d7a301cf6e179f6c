"""The package layers of docs/architecture.md, enforced: a module imports only its own layer
and the layers below it, so package cycles cannot come back.

Every import counts, those inside functions too (a deferred import hides a cycle from the
interpreter, not from the design). Imports under ``if TYPE_CHECKING:`` are exempt: they name a
type for an annotation and never run. The order is written once, here, and explained in the
doc."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_vwn"

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = [
    ["megatron_vwn", "megatron_vwn.log", "megatron_vwn.config.errors"],
    ["megatron_vwn.compat"],
    ["megatron_vwn.model.width"],
    ["megatron_vwn.config"],
    ["megatron_vwn.runs"],
    ["megatron_vwn.data"],
    ["megatron_vwn.model"],
    ["megatron_vwn.parallel"],
    ["megatron_vwn.optim"],
    ["megatron_vwn.checkpoint"],
    ["megatron_vwn.training"],
    ["megatron_vwn.launch"],
    ["megatron_vwn.convert"],
    ["megatron_vwn.studies"],
    ["megatron_vwn.tools"],
    ["megatron_vwn.cli", "megatron_vwn.__main__"],
]
RANK = {prefix: rank for rank, prefixes in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module: str) -> str:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in RANK:
            return ".".join(parts[:end])
    raise AssertionError(f"{module} is in no layer of LAYERS")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def imports(source: str, module: str, is_package: bool):
    """``(line, imported module)`` for every import of ``source`` (``module``'s text)."""
    tree = ast.parse(source)
    skipped = _type_checking_only(tree)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            # `from megatron_vwn import cli` imports the module megatron_vwn.cli
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path)
        mine = layer_of(module)
        for lineno, target in imports(path.read_text(), module, path.name == "__init__.py"):
            if target.split(".")[0] != "megatron_vwn":
                continue
            theirs = layer_of(target)
            if RANK[theirs] > RANK[mine]:
                found.append(f"{path.relative_to(package.parent)}:{lineno}: {module} ({mine}) "
                             f"imports {target} ({theirs}, a higher layer)")
    return found


def test_no_module_imports_a_higher_layer():
    found = violations()
    assert not found, "\n".join(found)


def test_every_package_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_the_check_sees_deferred_relative_and_from_package_imports():
    """The three forms a cycle hid behind before: an import inside a function, a relative one,
    and ``from megatron_vwn import <module>``; a TYPE_CHECKING import is not one."""
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from megatron_vwn.training.trainer import Trainer
def f():
    from megatron_vwn.training import trainer
from ..training import hooks
from megatron_vwn import cli
"""
    builder = RANK[layer_of("megatron_vwn.model.builder")]
    found = sorted((line, target) for line, target in
                   imports(source, "megatron_vwn.model.builder", is_package=False)
                   if target.startswith("megatron_vwn.") and RANK[layer_of(target)] > builder)
    assert found == [(6, "megatron_vwn.training.trainer"), (7, "megatron_vwn.training.hooks"),
                     (8, "megatron_vwn.cli")]
