#!/usr/bin/env bash
# Set up, then run every test: the unit tests and the chapters (executed with nbval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider tests --nbval-lax notebooks "$@"
