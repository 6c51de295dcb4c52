#!/usr/bin/env bash
# Set up, then build the book, executing every chapter on the built-in synthetic data.
# A failing cell fails the build. The HTML lands in _build/html/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# MathJax ships in book/_static/mathjax (committed) so that maths renders offline; restore it if absent.
[ -f book/_static/mathjax/tex-chtml-full.js ] || bash scripts/vendor-mathjax.sh
rm -rf _build/html _build/jupyter_execute
jupyter-book build . --keep-going
