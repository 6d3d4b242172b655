"""models.package as a whole: its API is complete, and it stays torch-free (the edge installs it without the
``models`` extra)."""

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys

import models.package


def defined_names(module: str) -> set[str]:
    """The public names a module defines at its top level (functions, classes, constants), not those it imports."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_") and name != "log"}


def test_all_lists_every_public_name_of_every_module_and_nothing_else():
    public = set()
    for module in pkgutil.iter_modules(models.package.__path__):
        public |= defined_names(f"models.package.{module.name}")
    assert sorted(public - set(models.package.__all__)) == []
    assert sorted(set(models.package.__all__) - public) == []
    assert all(hasattr(models.package, name) for name in models.package.__all__)


def test_the_model_contract_and_its_edge_users_never_import_torch_or_onnx():
    code = (
        "import sys, models.package, models.package_cli, edge.agent, central.registry; "
        "sys.exit(('torch' in sys.modules) + 2 * ('onnx' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
