"""The student edition: solutions go, everything else stays."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kpssl.edition import strip_notebook, strip_solutions, write_student_edition

ROOT = Path(__file__).resolve().parents[1]

EXERCISES = """## Exercises

1. Compute it.
2. Explain it.

:::{admonition} Solution 1
:class: dropdown
```python
print(1)
```
:::

:::{admonition} A hint, not a solution
:class: dropdown
Look at chapter 2.
:::

::::{admonition} Solution 2
:class: dropdown
Nested:
:::{note}
inner
:::
::::

```{dropdown} Worked answer
:class: solution
gone
```

## References
"""


def test_strip_solutions_removes_only_solutions():
    text, removed = strip_solutions(EXERCISES)
    assert removed == 3
    assert "Solution" not in text and "print(1)" not in text and "inner" not in text and "gone" not in text
    assert "A hint, not a solution" in text and "Look at chapter 2." in text
    assert "1. Compute it." in text and "## References" in text
    assert "\n\n\n" not in text
    assert strip_solutions(text) == (text, 0)  # idempotent


def test_strip_solutions_leaves_text_without_solutions_alone():
    text = "# Title\n\n:::{note}\nkeep\n:::\n\n```python\nx = 1\n```\n"
    assert strip_solutions(text) == (text, 0)


def test_unclosed_solution_runs_to_the_end():
    text, removed = strip_solutions("before\n\n:::{admonition} Solution 1\n:class: dropdown\nno end")
    assert (text, removed) == ("before\n", 1)


def test_strip_notebook_drops_tagged_cells_and_empty_markdown():
    notebook = {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": ["answer = ...\n"], "outputs": []},
            {"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "answer = 42",
             "outputs": []},
            {"cell_type": "markdown", "metadata": {},
             "source": [":::{admonition} Solution 1\n", ":class: dropdown\n", "42\n", ":::\n"]},
            {"cell_type": "markdown", "metadata": {}, "source": ["## Summary\n"]},
        ],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }
    stripped, removed = strip_notebook(notebook)
    assert removed == 2
    assert [c["source"] for c in stripped["cells"]] == [["answer = ...\n"], ["## Summary\n"]]
    assert len(notebook["cells"]) == 4  # the input is not modified


def test_student_edition_of_this_book(tmp_path):
    out = tmp_path / "student"
    report = write_student_edition(ROOT, out)
    chapters = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert chapters and report.total >= len(chapters)
    for chapter in chapters:
        teacher = json.loads(chapter.read_text())
        student = json.loads((out / "notebooks" / chapter.name).read_text())
        text = "".join("".join(c["source"]) for c in student["cells"])
        assert "{admonition} Solution" not in text, chapter.name
        assert text.count("## Exercises") == 1, chapter.name
        code = [c for c in teacher["cells"]
                if c["cell_type"] == "code" and "solution" not in c["metadata"].get("tags", [])]
        assert [c for c in student["cells"] if c["cell_type"] == "code"] == code  # only solutions go
    assert "(student edition)" in (out / "_config.yml").read_text()
    assert (out / "_toc.yml").read_text() == (ROOT / "_toc.yml").read_text()
    with pytest.raises(FileExistsError):
        write_student_edition(ROOT, out)
    with pytest.raises(ValueError):
        write_student_edition(ROOT, ROOT / "student")


def test_one_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kpssl.book", "student-edition", str(tmp_path / "s"),
                             "--source", str(ROOT)], capture_output=True, text=True, check=True)
    assert "solutions removed" in result.stdout
    assert (tmp_path / "s" / "notebooks").is_dir()


def test_fill_in_exercises_have_their_solution_next():
    """A code exercise (tag ``exercise``, its blanks written ``...``) is followed by its solution (tag
    ``solution``, removed from the student edition), so the teacher's edition, which CI runs, passes
    the check cell after it."""
    found = 0
    for chapter in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(chapter.read_text())["cells"]
        for index, cell in enumerate(cells):
            if "exercise" not in cell.get("metadata", {}).get("tags", []):
                continue
            found += 1
            assert "..." in "".join(cell["source"]), f"{chapter.name} cell {index}: an exercise has blanks"
            following = cells[index + 1].get("metadata", {}).get("tags", []) if index + 1 < len(cells) else []
            assert "solution" in following, f"{chapter.name} cell {index}: no solution cell after the exercise"
    assert found
