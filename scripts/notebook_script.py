"""Write a chapter's code cells as one Python script (for machines without nbconvert).

    python scripts/notebook_script.py notebooks/06_pretraining.ipynb /tmp/06_pretraining.py

IPython magics and shell lines (``%...``, ``!...``) become comments; ``display`` falls back to ``print``
where IPython is missing. The script is meant to run from the ``notebooks/`` folder, as the chapter does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PRELUDE = """\
try:
    from IPython.display import display
except ImportError:  # no IPython: show what a cell would display as text
    display = print
import matplotlib
matplotlib.use("Agg")
"""


def notebook_script(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    parts = [PRELUDE]
    for number, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        lines = [f"# {line}" if line.lstrip().startswith(("%", "!")) else line for line in lines]
        parts.append(f"# --- cell {number}\n" + "\n".join(lines) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: notebook_script.py NOTEBOOK.ipynb SCRIPT.py")
    Path(sys.argv[2]).write_text(notebook_script(Path(sys.argv[1])))
