"""Clear the outputs of the chapters before they are committed, except the reference outputs.

The book executes every chapter when it is built, so stored outputs only matter to the tests: nbval
(``--nbval-lax``) compares a cell tagged ``nbval-check-output`` with the output stored in the
notebook. Those outputs are kept (as text: images are dropped) with their execution counts (nbval
skips a reference cell without one); every other output and execution count is cleared.

    python scripts/strip_outputs.py notebooks/*.ipynb          # rewrite in place
    python scripts/strip_outputs.py --check notebooks/*.ipynb  # exit 1 if a file would change
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECKED = "nbval-check-output"
TEXT = ("text/plain",)


def stripped(notebook: dict) -> dict:
    """The notebook with only the reference outputs of checked cells (their text and counts)."""
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)  # timings written by the executor
        if cell["cell_type"] != "code":
            continue
        if CHECKED not in cell.get("metadata", {}).get("tags", []):
            cell["execution_count"] = None
            cell["outputs"] = []
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                kept.append(output)
            elif output["output_type"] in ("execute_result", "display_data"):
                data = {k: v for k, v in output.get("data", {}).items() if k in TEXT}
                if data:
                    kept.append({**output, "data": data, "metadata": {}})
        cell["outputs"] = kept
    return notebook


def text(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    changed = []
    for path in args.notebooks:
        before = path.read_text()
        after = text(stripped(json.loads(before)))
        if after != before:
            changed.append(path)
            if not args.check:
                path.write_text(after)
    for path in changed:
        print(f"{path}: {'would change' if args.check else 'stripped'}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
