"""The student edition of the book: the same chapters and pages with the exercise solutions removed.

A solution is
- a MyST ``admonition`` or ``dropdown`` directive (colon or backtick fence) whose title starts with
  "Solution", or whose ``:class:`` option names ``solution``; or
- a notebook cell tagged ``solution`` (for example the filled-in answer of a code exercise).

Exercises, their numbering and everything else stay as they are, outputs included. The teacher's
edition (the repository) is the source; the student edition is written from it by one command::

    python -m kpssl.book student-edition OUT
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["strip_solutions", "strip_notebook", "write_student_edition", "EditionReport"]

_OPEN = re.compile(r"^(?P<indent>\s*)(?P<fence>:{3,}|`{3,})\{(?P<name>[\w-]+)\}\s*(?P<title>.*)$")
_OPTION = re.compile(r"^\s*:(?P<key>[\w-]+):\s*(?P<value>.*)$")
SOLUTION_DIRECTIVES = ("admonition", "dropdown")
SOLUTION_TAG = "solution"


def _is_solution(name: str, title: str, options: dict[str, str]) -> bool:
    if name not in SOLUTION_DIRECTIVES:
        return False
    classes = options.get("class", "").split()
    return title.strip().lower().startswith("solution") or SOLUTION_TAG in classes


def _closes(line: str, fence: str) -> bool:
    """A closing fence: only fence characters, at least as many as the opening one."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def strip_solutions(text: str) -> tuple[str, int]:
    """Remove solution directives from MyST Markdown; return the text and how many were removed.

    Nested fences inside a solution (a code block, an inner directive) go with it: a colon fence closes
    at the first line of at least as many colons, a backtick fence likewise, as in MyST. Runs of blank
    lines left behind shrink to one.
    """
    lines = text.split("\n")
    out: list[str] = []
    removed = 0
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match:
            options: dict[str, str] = {}
            j = i + 1
            while j < len(lines) and (option := _OPTION.match(lines[j])):
                options[option["key"]] = option["value"]
                j += 1
            if _is_solution(match["name"], match["title"], options):
                while j < len(lines) and not _closes(lines[j], match["fence"]):
                    j += 1
                i = j + 1  # skip the closing fence too (or run off the end of an unclosed one)
                removed += 1
                continue
        out.append(lines[i])
        i += 1
    result = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    if text.endswith("\n") and not result.endswith("\n"):
        result += "\n"
    return result, removed


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def strip_notebook(notebook: dict) -> tuple[dict, int]:
    """A copy of a notebook (nbformat 4 as a dict) without solution cells and solution directives."""
    cells = []
    removed = 0
    for cell in notebook["cells"]:
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            removed += 1
            continue
        if cell["cell_type"] == "markdown":
            text, count = strip_solutions(_source(cell))
            removed += count
            if count and not text.strip():
                continue
            cell = {**cell, "source": text.splitlines(keepends=True)}
        cells.append(cell)
    return {**notebook, "cells": cells}, removed


@dataclass
class EditionReport:
    out: Path
    removed: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    def summary(self) -> str:
        lines = [f"student edition in {self.out}: {self.total} solutions removed"]
        lines += [f"  {name}: {count}" for name, count in sorted(self.removed.items()) if count]
        return "\n".join(lines)


BOOK_PATHS = ("_config.yml", "_toc.yml", "book", "notebooks")


def write_student_edition(source: Path, out: Path) -> EditionReport:
    """Write the student edition of the book at ``source`` (the repository root) into ``out``.

    ``out`` must not exist or be empty. The book's configuration, table of contents, pages and
    chapters are copied; solutions are removed from every notebook and Markdown page, and the book's
    title says "student edition".
    """
    source, out = Path(source).resolve(), Path(out).resolve()
    if not (source / "_config.yml").is_file() or not (source / "_toc.yml").is_file():
        raise FileNotFoundError(f"{source}: not a book root (expected _config.yml and _toc.yml)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    if out == source or source in out.parents:
        raise ValueError(f"{out}: must lie outside the book at {source}")
    report = EditionReport(out)
    ignore = shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__", "_build")
    out.mkdir(parents=True, exist_ok=True)
    for name in BOOK_PATHS:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, out / name, ignore=ignore)
        elif path.is_file():
            shutil.copy2(path, out / name)
    for path in sorted(out.rglob("*.ipynb")):
        notebook = json.loads(path.read_text(encoding="utf-8"))
        stripped, count = strip_notebook(notebook)
        path.write_text(json.dumps(stripped, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        report.removed[str(path.relative_to(out))] = count
    for path in sorted(out.rglob("*.md")):
        text, count = strip_solutions(path.read_text(encoding="utf-8"))
        path.write_text(text, encoding="utf-8")
        report.removed[str(path.relative_to(out))] = count
    config = out / "_config.yml"
    config.write_text(
        re.sub(r'^title:\s*"(.*)"\s*$', r'title: "\1 (student edition)"', config.read_text(), count=1,
               flags=re.M)
    )
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kpssl.book", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    student = commands.add_parser("student-edition", help="write the book without exercise solutions")
    student.add_argument("out", type=Path, help="a new or empty folder")
    student.add_argument("--source", type=Path, default=None,
                         help="the book root (default: the working folder if it is one, else the checkout "
                              "kpssl was installed from)")
    args = parser.parse_args(argv)
    cwd = Path.cwd()
    source = args.source or (cwd if (cwd / "_toc.yml").is_file() else Path(__file__).resolve().parents[1])
    print(write_student_edition(source, args.out).summary())
    return 0
