#!/usr/bin/env bash
# The separate virtual environment .venv-interop with the real SAELens and sparsify, for
# tests/test_interop.py (which loads saelab's exports there) and scripts/interop_check.py.
# Kept apart from .venv so that neither library's dependencies ever enter saelab's. torch is
# pinned to the local CPU wheel (unpinned, pip would take a multi-GB CUDA build); sae-lens and
# eai-sparsify to the versions last checked with it. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
INTEROP_SPEC=${INTEROP_SPEC:-"torch==2.13.0 sae-lens==6.54.12 eai-sparsify==1.3.3"}
[ -x .venv-interop/bin/python ] || "$PYTHON" -m venv .venv-interop
# shellcheck disable=SC2086
.venv-interop/bin/python -m pip install -q $INTEROP_SPEC
