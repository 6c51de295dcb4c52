#!/usr/bin/env bash
# One prepared GPU check: the CUDA tests, every chapter as a script under the colab preset (all at once
# on the one card), then benchmarks/gpu.py; one archive of the logs and the benchmark JSON in $OUT.
#
# For a GPU machine that has PyTorch, torchvision, opencv, scipy, matplotlib, pandas, tqdm, pyyaml and
# pytest but not nibabel, monai, nilearn, pydicom or ipywidgets: those come from wheels in .whl/
# (git-ignored), fetched beforehand on a machine with the package index (versions of requirements-ci.txt):
#
#     bash scripts/gpu-check.sh --fetch-wheels
#
# They are installed into a temporary folder (pip --no-index --no-deps --target) put on PYTHONPATH.
#
#     OUT=/some/folder bash scripts/gpu-check.sh          # on the GPU machine, under 8 minutes
#     KPSSL_GPU_CHECK_SMALL=1 bash scripts/gpu-check.sh   # toy size on a CPU: tiny preset, chapters
#                                                         # 04 and 05 (or KPSSL_GPU_CHECK_CHAPTERS),
#                                                         # benchmarks --small, no CUDA-only parts
# Exit status: 0 when every part passed, 1 otherwise (the archive is written either way).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
WHEELS="nibabel monai nilearn pydicom ipywidgets comm widgetsnbextension jupyterlab_widgets traitlets ipython
jedi parso matplotlib-inline pexpect ptyprocess prompt_toolkit wcwidth Pygments stack-data asttokens executing
pure_eval ipython_pygments_lexers"

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .whl
    for name in $WHEELS; do
        pin=$(grep -i "^${name}==" requirements-ci.txt) || { echo "no pin for $name in requirements-ci.txt"; exit 1; }
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux2014_x86_64 -d .whl "$pin" || exit 1
    done
    ls .whl
    exit 0
fi

SMALL=${KPSSL_GPU_CHECK_SMALL:-0}
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOGS=$WORK/gpu-check
mkdir -p "$LOGS"
STATUS=0
STARTED=$(date +%s)
note() { echo "$*" | tee -a "$LOGS/summary.txt"; }
finish() {
    note "total $(( $(date +%s) - STARTED )) s, status $STATUS"
    tar -czf "$OUT/gpu-check.tar.gz" -C "$WORK" gpu-check && echo "archive: $OUT/gpu-check.tar.gz"
    rm -rf "$WORK"
    exit $STATUS
}

# 1. dependencies from the wheels, where they are missing
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl > "$LOGS/wheels.log" 2>&1 \
        || { note "FAILED: installing the wheels (wheels.log)"; STATUS=1; finish; }
    export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
"$PYTHON" - > "$LOGS/environment.txt" 2>&1 <<'PY'
import importlib, platform, torch
print(platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("kpssl", "nibabel", "monai", "nilearn", "pydicom", "ipywidgets", "cv2", "scipy", "pandas"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
PY
[ $? -eq 0 ] || { note "FAILED: imports (environment.txt)"; STATUS=1; }

# 2. the CUDA tests (and the CPU tests of the GPU path)
if [ "$SMALL" = 1 ]; then TESTS=(tests/test_gpu.py -k "precision or rng_states"); else TESTS=(tests/test_gpu.py); fi
start=$(date +%s)
"$PYTHON" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" > "$LOGS/tests.log" 2>&1
rc=$?
note "tests: rc=$rc $(( $(date +%s) - start )) s: $(tail -n 1 "$LOGS/tests.log")"
[ $rc -eq 0 ] || STATUS=1

# 3. every chapter as a script, all at once on the one card, on data prepared beforehand
if [ "$SMALL" = 1 ]; then
    export KPSSL_PRESET=${KPSSL_PRESET:-tiny}
    CHAPTERS=${KPSSL_GPU_CHECK_CHAPTERS:-04 05}
else
    export KPSSL_PRESET=${KPSSL_PRESET:-colab}
    CHAPTERS=${KPSSL_GPU_CHECK_CHAPTERS:-01 02 03 04 05 06 07 08 09}
fi
export KPSSL_DATA=$WORK/data
start=$(date +%s)
"$PYTHON" - > "$LOGS/data.log" 2>&1 <<'PY'
import os
from pathlib import Path
from kpssl.book import ensure_synthetic
from kpssl.keypoints import fill_cache
from kpssl.settings import preset
root = ensure_synthetic(Path(os.environ["KPSSL_DATA"]))
print(fill_cache(root, preset(os.environ["KPSSL_PRESET"]), progress=False))
PY
[ $? -eq 0 ] || { note "FAILED: data preparation (data.log)"; STATUS=1; }
note "data and keypoints: $(( $(date +%s) - start )) s"
mkdir -p "$WORK/chapters"
pids=()
for number in $CHAPTERS; do
    notebook=$(ls notebooks/${number}_*.ipynb)
    name=$(basename "$notebook" .ipynb)
    "$PYTHON" scripts/notebook_script.py "$notebook" "$WORK/chapters/$name.py" || STATUS=1
    (
        cd notebooks
        begin=$(date +%s)
        "$PYTHON" "$WORK/chapters/$name.py" > "$LOGS/ch_$name.log" 2>&1
        echo "rc=$? seconds=$(( $(date +%s) - begin ))" >> "$LOGS/ch_$name.log"
    ) &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for log in "$LOGS"/ch_*.log; do
    last=$(tail -n 1 "$log")
    note "$(basename "$log" .log): $last"
    case "$last" in rc=0*) ;; *) STATUS=1 ;; esac
done

# 4. the benchmark on the idle card
start=$(date +%s)
if [ "$SMALL" = 1 ]; then BENCH="--small --skip variants finetune"; else BENCH="--repeats 6 --skip compile"; fi
"$PYTHON" benchmarks/gpu.py $BENCH --out "$LOGS/gpu.json" > "$LOGS/benchmark.log" 2>&1
rc=$?
note "benchmark: rc=$rc $(( $(date +%s) - start )) s"
[ $rc -eq 0 ] || STATUS=1
finish
