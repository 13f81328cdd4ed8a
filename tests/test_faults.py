"""Faults (issue 15, part 5): each stage of the pipeline SIGKILLed at a chosen point, then run
again as ``dvc repro`` would, gives outputs identical to an uninterrupted run and leaves no
temporary directory (``<out>.tmp-<pid>``, ``<out>.old-<pid>``) or checkpoint behind.

The same points are also hit inside ``dvc repro``, killed with its stage (the whole process group,
``tests/faults_site``), and the pipeline then re-run by ``dvc repro``.

Each command runs in its own process (``tests/kill_at.py``: the stage's ``saelab`` command,
killed with SIGKILL at the n-th call of a library function), on the tiny Llama and corpus, with
one thread so that both runs compute the same floats. Outputs are compared file by file: bytes,
except JSON (parsed; wall-clock fields and MLflow run ids dropped) and ``.npz`` (arrays, since
their zip entries carry a timestamp).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.test_pipeline import _dvc, _env, _init_project

TESTS = Path(__file__).resolve().parent
VARIANT = "topk"
# what each stage writes, and its command (the arguments of dvc.yaml's stage)
STAGES = {
    "prepare": (["data/tokens"], ["prepare", "--out", "data/tokens"]),
    "cache": (["data/activations"],
              ["cache", "--tokens", "data/tokens", "--out", "data/activations"]),
    "train": ([f"models/{VARIANT}"],
              ["train", "--variant", VARIANT, "--activations", "data/activations",
               "--out", f"models/{VARIANT}", "--checkpoints", f"checkpoints/{VARIANT}"]),
    "baseline": (["data/baseline"], ["baseline", "--tokens", "data/tokens", "--activations",
                                     "data/activations", "--out", "data/baseline"]),
    "evaluate": ([f"metrics/{VARIANT}.json", f"plots/hist/{VARIANT}.json",
                  f"data/per_context/{VARIANT}.npz"],
                 ["evaluate", "--variant", VARIANT, "--tokens", "data/tokens", "--activations",
                  "data/activations", "--baseline", "data/baseline", "--sae", f"models/{VARIANT}",
                  "--out", f"metrics/{VARIANT}.json", "--hist", f"plots/hist/{VARIANT}.json",
                  "--per-context", f"data/per_context/{VARIANT}.npz"]),
}  # fmt: skip
# (stage, function whose n-th call kills, n, before/after it runs, what the kill leaves behind)
KILLS = [
    # the token group complete under data/tokens.tmp-<pid>, not yet moved into place
    ("prepare", "saelab.store:_commit", 1, "before", "data/tokens.tmp-*"),
    # mid-way through the train split: its second chunk about to be written
    ("cache", "saelab.store:ActivationWriter._flush", 2, "before", "data/activations.tmp-*"),
    # both splits done inside data/activations.tmp-<pid>, the directory not yet moved
    ("cache", "saelab.store:_commit", 2, "after", "data/activations.tmp-*"),
    # training at step 8 of 16, just after its checkpoint: the re-run resumes from it
    ("train", "saelab.train:save_checkpoint", 1, "after", f"checkpoints/{VARIANT}"),
    # the first chunk of the KL terms (expected_unembed/) written under data/baseline.tmp-<pid>
    ("baseline", "saelab.store:ActivationWriter._flush", 1, "after", "data/baseline.tmp-*"),
    # the spliced pass at its second batch (one CE per batch; nothing is written before the end)
    ("evaluate", "saelab.evaluate:token_ce", 2, "before", None),
]
VOLATILE = {
    "tokens_per_s",
    "seconds",
    "mlflow_run_id",
    "wall_s",
    "train_tokens_per_s",
    "train_seconds",
}  # differ between any two runs


def _command(root: Path, stage: str, kill: tuple | None) -> subprocess.CompletedProcess:
    target = ["-"] if kill is None else [kill[1], str(kill[2]), kill[3]]
    env = {k: v for k, v in os.environ.items()
           if k != "MLFLOW_TRACKING_URI" and not k.startswith("DVC_")}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd, params = STAGES[stage][1], ["--params", "params.yaml"]
    return subprocess.run(
        [sys.executable, str(TESTS / "kill_at.py"), *target, "--", *cmd[:1], *params, *cmd[1:]],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _debris(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or
        p.name == "checkpoints" and any(p.iterdir())
    )  # fmt: skip


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in VOLATILE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _assert_same(a: Path, b: Path) -> None:
    """``a`` and ``b`` (files or trees) hold the same files with the same content."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else []
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) if b.is_dir() else []
    assert files_a == files_b
    for rel in files_a or [Path()]:
        x, y = a / rel, b / rel
        if x.suffix == ".json":
            assert _strip(json.loads(x.read_text())) == _strip(json.loads(y.read_text())), x
        elif x.suffix == ".npz":
            with np.load(x) as nx, np.load(y) as ny:
                assert nx.files == ny.files
                for key in nx.files:
                    np.testing.assert_array_equal(nx[key], ny[key], err_msg=f"{x}:{key}")
        else:
            assert x.read_bytes() == y.read_bytes(), x


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_llama_dir, tiny_corpus_module, make_tiny_params):
    """Two project directories with the same params.yaml: ``clean`` (uninterrupted runs) and
    ``killed`` (each stage killed, then re-run)."""
    params = make_tiny_params(tiny_llama_dir, tiny_corpus_module, "sqlite:///mlflow.db")
    params["variants"] = [VARIANT]
    out = {}
    for name in ("clean", "killed"):
        root = tmp_path_factory.mktemp(name)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        out[name] = root
    return out


@pytest.mark.slow
def test_every_stage_killed_and_rerun_gives_the_uninterrupted_outputs(roots) -> None:
    """For prepare, cache, train, baseline and evaluate in pipeline order: the clean run; then in
    the other directory the stage SIGKILLed at each of its points in KILLS (exit -9, the
    leftover the point implies present), and run again: exit 0, nothing left over, outputs equal
    to the clean run's."""
    clean, killed = roots["clean"], roots["killed"]
    for stage, (outputs, _) in STAGES.items():
        done = _command(clean, stage, None)
        assert done.returncode == 0, done.stderr[-3000:]
        for kill in [k for k in KILLS if k[0] == stage]:
            result = _command(killed, stage, kill)
            assert result.returncode == -signal.SIGKILL, (kill, result.stderr[-3000:])
            if kill[4] is not None:
                assert list(killed.glob(kill[4])), (kill, _debris(killed))
        again = _command(killed, stage, None)
        assert again.returncode == 0, again.stderr[-3000:]
        assert _debris(killed) == [], stage
        for out in outputs:
            _assert_same(clean / out, killed / out)


def _dvc_repro(repo: Path, kill: tuple | None) -> subprocess.CompletedProcess:
    """``dvc repro <stage>`` in ``repo``, in a process group of its own; ``kill``: a KILLS row,
    armed in that stage's command by tests/faults_site (the whole group SIGKILLed), and the
    target is that stage (with what it depends on: DVC orders independent stages, such as
    train and baseline, as it likes); without ``kill``, evaluate@<VARIANT>."""
    env = _env(repo)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "faults_site"), env["PYTHONPATH"]])
    if kill is not None:
        env["SAELAB_KILL_AT"] = "|".join([f"stages/{kill[0]}.py", kill[1], str(kill[2]), kill[3]])
    dvc = str(Path(sys.executable).parent / "dvc")
    stage = f"evaluate@{VARIANT}" if kill is None else DVC_STAGES.get(kill[0], kill[0])
    return subprocess.run(
        [dvc, "repro", stage], cwd=repo, env=env, capture_output=True, text=True,
        timeout=900, start_new_session=True,
    )  # fmt: skip


DVC_STAGES = {"train": f"train@{VARIANT}", "evaluate": f"evaluate@{VARIANT}"}  # dvc.yaml names


def _dvc_project(root: Path, params: dict) -> Path:
    repo = root / "repo"
    _init_project(repo, params)
    return repo


def _running_mlflow_runs(repo: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids, "attributes.status = 'RUNNING'")]


@pytest.mark.slow
def test_dvc_repro_killed_in_every_stage_then_rerun_gives_the_uninterrupted_outputs(
    tmp_path_factory, tiny_llama_dir, tiny_corpus_module, make_tiny_params
) -> None:
    """``dvc repro <stage>`` SIGKILLed together with its stage (the whole process group) at each
    point of KILLS in turn, prepare to evaluate, each run re-doing what the last ones lost
    upstream of it; then ``dvc repro evaluate@<VARIANT>``: exit 0, outputs equal to an
    uninterrupted ``dvc repro`` in another copy,
    ``dvc status`` of the stages up to evaluate clean, no temporary directory or checkpoint
    left, and no MLflow run left RUNNING (a killed stage's run ends KILLED, or is reopened and
    finished)."""
    params = make_tiny_params(tiny_llama_dir, tiny_corpus_module, None)
    params["variants"] = [VARIANT]
    clean = _dvc_project(tmp_path_factory.mktemp("dvc-clean"), params)
    killed = _dvc_project(tmp_path_factory.mktemp("dvc-killed"), params)
    done = _dvc_repro(clean, None)
    assert done.returncode == 0, done.stderr[-3000:]
    for kill in KILLS:
        result = _dvc_repro(killed, kill)
        assert result.returncode == -signal.SIGKILL, (kill, result.stderr[-3000:])
        if kill[4] is not None:
            assert list(killed.glob(kill[4])), (kill, _debris(killed))
    again = _dvc_repro(killed, None)
    assert again.returncode == 0, again.stderr[-3000:]
    target = f"evaluate@{VARIANT}"
    assert json.loads(_dvc(killed, "status", target, "--with-deps", "--json")) == {}
    assert [p for p in _debris(killed) if ".dvc" not in p.parts] == []
    assert _running_mlflow_runs(killed) == []
    for outputs, _ in STAGES.values():
        for out in outputs:
            _assert_same(clean / out, killed / out)
