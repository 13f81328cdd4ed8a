"""bench/gpu_check.sh --dry-run: every part of the GPU check runs on the CPU (tiny shapes, a
random tiny Llama) and the script reports success; a part that fails fails the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ("device", "CUDA-marked tests", "bench/train_step.py", "bench/topk.py",
         "bench/ddp_step.py (2 gloo processes)", "short bf16 pipeline")  # fmt: skip


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )  # fmt: skip


@pytest.mark.slow  # the whole check in tiny: ~1 min on 2 cores
def test_gpu_check_dry_run_runs_every_part(tmp_path: Path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    headers = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert [h[3:].rsplit(" (at ", 1)[0] for h in headers] == list(PARTS)
    assert "CPU capability" in done.stdout
    assert "  topk: " in done.stdout and "  batchtopk: " in done.stdout  # pipeline metrics
    assert "gpu_check: all parts passed" in done.stdout


def test_gpu_check_fails_when_a_part_fails(tmp_path: Path):
    """A python that exits 1 makes the first part fail, and the script with it."""
    done = _run(tmp_path, PYTHON="false")
    assert done.returncode != 0
    assert "all parts passed" not in done.stdout


def test_gpu_check_rejects_unknown_options(tmp_path: Path):
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--bogus"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "usage:" in done.stderr
