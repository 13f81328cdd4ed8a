#!/usr/bin/env bash
# Set up a fresh clone: a virtual environment in .venv with saelab and its dependencies, and the
# offline page template of `dvc plots show` (build/dvc-plots.html, see scripts/plots_template.py).
# TORCH_SPEC picks the torch build (default: the CPU wheel torch==2.13.0; on a GPU machine e.g.
# TORCH_SPEC="torch --index-url <your CUDA wheel index>"). Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q -e ".[dev,plots]"
[ build/dvc-plots.html -nt scripts/plots_template.py ] || .venv/bin/python scripts/plots_template.py --out build/dvc-plots.html
