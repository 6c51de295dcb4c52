"""The shape of the training code: every function in kpssl/train reads in about a page."""

from __future__ import annotations

import ast
from pathlib import Path

import kpssl.train

LIMIT = 60  # lines, signature and docstring included


def function_lengths(folder: Path) -> dict[str, int]:
    """``"file.py:qualified.name" -> lines`` for every function and method defined under ``folder``."""
    lengths = {}
    for path in sorted(folder.glob("*.py")):
        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        lengths[f"{path.name}:{name}"] = child.end_lineno - child.lineno + 1
                    visit(child, f"{name}.")

        visit(ast.parse(path.read_text(), str(path)), "")
    return lengths


def test_no_function_in_train_is_longer_than_a_page():
    lengths = function_lengths(Path(kpssl.train.__file__).parent)
    assert "finetune.py:finetune" in lengths and "pretrain.py:_PretrainRun.train" in lengths  # the walk finds them
    too_long = {name: n for name, n in lengths.items() if n > LIMIT}
    assert not too_long, f"functions over {LIMIT} lines (split them): {too_long}"


def test_the_length_check_sees_nested_and_long_functions(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(LIMIT))
    (tmp_path / "long.py").write_text(f"class A:\n    def f(self):\n{body}\n")
    assert function_lengths(tmp_path) == {"long.py:A.f": LIMIT + 1}
