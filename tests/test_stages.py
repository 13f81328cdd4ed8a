"""stages/*.py: each DVC stage runs the saelab of the checkout it belongs to (a queued
`dvc exp run` executes a copy of the repository, while the environment's editable install points
at the original checkout)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(p.name for p in (REPO / "stages").glob("*.py") if not p.name.startswith("_"))


@pytest.fixture(scope="module")
def copy_with_marker(tmp_path_factory) -> Path:
    """A copy of stages/ and src/ whose saelab.cli.main prints a marker and its arguments."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "stages", root / "stages")
    shutil.copytree(REPO / "src" / "saelab", root / "src" / "saelab")
    (root / "src" / "saelab" / "cli.py").write_text(
        "def main(argv):\n    print('copy of the checkout:', ' '.join(argv))\n"
    )
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_its_own_checkout(copy_with_marker: Path, stage: str) -> None:
    """Run from the copy, every stage calls the copy's saelab, not the installed one."""
    done = subprocess.run(
        [sys.executable, str(copy_with_marker / "stages" / stage), "--params", "x.yaml"],
        cwd=copy_with_marker, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("copy of the checkout: "), (stage, done.stdout, done.stderr)
    assert done.stdout.rstrip().endswith("--params x.yaml")
