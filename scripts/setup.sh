#!/usr/bin/env bash
# Create .venv (once) and install kpssl with the exact versions CI uses (requirements-ci.txt).
# Re-running is cheap: nothing is reinstalled while requirements-ci.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.kpssl-installed
want=$(cat requirements-ci.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-ci.txt
  python -m pip install -q --no-deps -e .
  python -m ipykernel install --sys-prefix --name python3 >/dev/null
  echo "$want" > "$stamp"
fi
