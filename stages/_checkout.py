"""Put this checkout's ``src/`` first on ``sys.path``, so that a stage runs the saelab of the
checkout it belongs to, not the one the environment has installed: ``dvc exp run --queue`` and
``--temp`` run the stages in a copy of the repository under ``.dvc/tmp/exps/``, while the
editable install of ``scripts/setup.sh`` points at the original checkout, whose code may have
changed since the experiment was queued. Every stage imports this module first."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
