"""DESIGN rule: parallel/ is generic and never imports pretrain/ (nor the launchers)."""
import ast
from pathlib import Path

PARALLEL = Path(__file__).resolve().parents[2] / "parallel"


def test_parallel_never_imports_pretrain():
    offenders = []
    for path in PARALLEL.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("pretrain", "launch")]
    assert not offenders, offenders
