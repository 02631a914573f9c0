"""model/ is single-device code: no torch.distributed, no deepspeed (DESIGN.md, rule 3.1)."""

from __future__ import annotations

import ast
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
FORBIDDEN = ("torch.distributed", "deepspeed")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def violations(source: str) -> list[str]:
    """Names of forbidden imports / attribute uses in a Python source string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [node.module for _ in [0] if _forbidden(node.module)]
            found += [f"{node.module}.{a.name}" for a in node.names if _forbidden(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if _forbidden(f"{node.value.id}.{node.attr}"):
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_checker_catches_every_form():
    assert violations("import torch.distributed as dist")
    assert violations("from torch.distributed.tensor import DTensor")
    assert violations("from torch import distributed")
    assert violations("import deepspeed")
    assert violations("import torch\nx = torch.distributed.get_rank()")
    assert not violations("import torch\nfrom torch import nn")


def test_model_package_imports_no_distributed_code():
    files = sorted(MODEL_DIR.glob("**/*.py"))
    assert len(files) >= 7
    bad = {str(f.relative_to(MODEL_DIR)): v for f in files if (v := violations(f.read_text()))}
    assert not bad, bad
