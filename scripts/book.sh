#!/usr/bin/env bash
# Set up, then build the book, executing every chapter on the built-in synthetic data.
# A failing cell fails the build. The HTML lands in _build/html/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
rm -rf _build/html _build/jupyter_execute
jupyter-book build . --keep-going
