"""The DVC pipeline end to end: `dvc repro`, `dvc exp run` and two queued experiments run in
parallel (`dvc exp run --queue` + `dvc queue start -j 2`) in a fresh copy of the project on the
tiny Llama, with data and model beside the repo named by relative paths (as params.yaml names
../shared) and MLflow's default store at the repo root."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("topk", "batchtopk", "jumprelu", "relu", "sampled", "switch")  # params.yaml
PROJECT_FILES = ("dvc.yaml", "pyproject.toml", ".gitignore", ".dvcignore")
PROJECT_DIRS = ("stages", "src", "plots/templates", "reports/main")  # report stage: its deps
QUEUED = {"queued-nctx4": 4, "queued-nctx3": 3}  # queued experiment -> its evaluate.n_ctx
METRIC_KEYS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_loss_recovered", "fvu", "l0")


def _copy_project(dest: Path) -> None:
    for name in PROJECT_FILES:
        shutil.copy(REPO / name, dest / name)
    for name in PROJECT_DIRS:
        shutil.copytree(
            REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )


def _env(repo: Path) -> dict[str, str]:
    """The venv's python and dvc first on PATH, the copied src importable, a git identity, no
    MLflow or DVC variables inherited from the shell running pytest, one thread per stage."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "MLFLOW_TRACKING_URI" and not k.startswith(("DVC_", "GIT_"))
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo / "src"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="saelab-test",
        GIT_AUTHOR_EMAIL="test@saelab.invalid",
        GIT_COMMITTER_NAME="saelab-test",
        GIT_COMMITTER_EMAIL="test@saelab.invalid",
    )
    return env


def _run(repo: Path, *cmd: str) -> str:
    """Run ``cmd`` in ``repo``; its stdout, or a failure showing both streams."""
    result = subprocess.run(
        cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-8000:]}"
        )
    return result.stdout


def _dvc(repo: Path, *args: str) -> str:
    return _run(repo, str(Path(sys.executable).parent / "dvc"), *args)


def _init_project(repo: Path, params: dict) -> None:
    """A fresh clone at ``repo`` (created): the project's files, ``params``, git and DVC
    initialised, everything committed."""
    repo.mkdir()
    _copy_project(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(repo, "git", "init", "-q")
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "project")


def _metrics(repo: Path) -> dict[str, dict]:
    return {v: json.loads((repo / "metrics" / f"{v}.json").read_text()) for v in VARIANTS}


def _assert_finite(metrics: dict[str, dict], k: int) -> None:
    for variant, m in metrics.items():
        assert m["variant"] == variant and m["k"] == k
        for key in METRIC_KEYS:
            assert math.isfinite(m[key]), (variant, key)


def _wait_for_queue(repo: Path, timeout_s: float = 600.0) -> str:
    """Poll `dvc queue status` until no task is queued or running; the last status table."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = _dvc(repo, "queue", "status")
        rows = [line.split() for line in table.splitlines()[1:] if line.strip()]
        if not any(("Queued" in row or "Running" in row) for row in rows):
            return table
        if time.monotonic() > deadline:
            pytest.fail(f"queued experiment still unfinished after {timeout_s:.0f} s:\n{table}")
        time.sleep(2)


def _experiments(shown: list[dict]) -> list[dict]:
    """The experiment entries (with name, params and metrics) of ``dvc exp show --json``."""
    found = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            found.extend(exp.get("revs") or [])
    return found


@pytest.mark.slow
def test_dvc_repro_and_exp_run(tmp_path, tiny_llama_dir, tiny_corpus, make_tiny_params) -> None:
    """`dvc repro` on a fresh clone writes finite metrics for every variant, which `dvc metrics
    show` lists; `dvc exp run -S k=4` re-trains with k=4 (recorded by `dvc exp show`, the
    metrics JSON and MLflow); every run logs to <repo root>/mlflow.db by default (2 variants x
    2 pipeline runs, each under its parent run, artifacts in <repo root>/mlartifacts), the
    experiment's runs tagged with its name; two queued experiments, run at once by
    `dvc queue start -j 2`, each in a copy under .dvc/tmp/exps/, find the data through the same
    relative paths, show their metrics in `dvc exp show` and log to the repo's mlflow.db; the
    pipeline ends up to date."""
    repo = tmp_path / "repo"
    # Relative to the repo root, like params.yaml's ../shared/...: they must mean the same in
    # the workspace and in the temporary copies where queued experiments run.
    corpus = [os.path.relpath(d, repo) for d in tiny_corpus]
    params = make_tiny_params(Path(os.path.relpath(tiny_llama_dir, repo)), corpus, None)
    assert all(p.startswith("..") for p in (*corpus, params["model"]["name_or_path"]))
    _init_project(repo, params)

    _dvc(repo, "repro")
    _assert_finite(_metrics(repo), k=params["k"])
    shown = json.loads(_dvc(repo, "metrics", "show", "--json"))
    (workspace,) = shown.values()  # keyed "" or "workspace", depending on the DVC version
    listed = workspace["data"]
    assert {f"metrics/{v}.json" for v in VARIANTS} <= set(listed)
    assert listed["metrics/topk.json"]["data"]["fvu"] == _metrics(repo)["topk"]["fvu"]
    _run(repo, "git", "add", "-A")
    _run(repo, "git", "commit", "-q", "-m", "baseline")
    baseline = _run(repo, "git", "rev-parse", "HEAD").strip()

    _dvc(repo, "exp", "run", "-S", "k=4")
    _assert_finite(_metrics(repo), k=4)
    assert _metrics(repo)["topk"]["l0"] == 4
    exps = _experiments(json.loads(_dvc(repo, "exp", "show", "--json")))
    assert len(exps) == 1
    exp = exps[0]
    assert exp["data"]["params"]["params.yaml"]["data"]["k"] == 4
    exp_metrics = exp["data"]["metrics"]
    for v in VARIANTS:
        assert exp_metrics[f"metrics/{v}.json"]["data"]["k"] == 4
    exp_name = exp["name"]
    assert exp_name

    from mlflow import MlflowClient

    db = repo / "mlflow.db"
    assert db.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    all_runs = client.search_runs([experiment.experiment_id])
    runs = [r for r in all_runs if "variant" in r.data.tags]
    parents = {r.info.run_id: r for r in all_runs if r.data.tags.get("saelab.role") == "pipeline"}
    assert len(parents) == 2  # one per pipeline run, each with a nested run per variant
    for run in runs:
        parent = parents[run.data.tags["mlflow.parentRunId"]]
        assert parent.data.tags.get("dvc_exp_name", "") == run.data.tags["dvc_exp_name"]
        assert parent.info.status == "FINISHED"
    assert list((repo / "mlartifacts").rglob("sae.safetensors"))
    assert sorted((r.data.params["k"], r.data.tags["variant"]) for r in runs) == sorted(
        (k, v) for k in ("4", str(params["k"])) for v in VARIANTS
    )
    for run in runs:
        assert run.info.status == "FINISHED"
        in_exp = run.data.params["k"] == "4"
        assert run.data.tags["dvc_exp_name"] == (exp_name if in_exp else "")
        assert run.data.tags.get("dvc_exp_baseline_rev") == (baseline if in_exp else None)

    _check_queued_experiment(repo, params["tracking"]["experiment"], exp_name)
    assert json.loads(_dvc(repo, "status", "--json")) == {}


def _check_queued_experiment(repo: Path, tracking_experiment: str, first_exp: str) -> None:
    """Two experiments queued (`dvc exp run --queue -S evaluate.n_ctx=4`, `=3`) and run by
    `dvc queue start -j 2`, two workers at once (issue 14, part 4): both succeed in their
    temporary copies, `dvc exp show` lists each one's metrics (CE on 4 / 3 contexts: a ce_clean
    of its own), and each one's MLflow parent run is FINISHED in the one <repo>/mlflow.db both
    wrote to concurrently."""
    from mlflow import MlflowClient

    for name, n_ctx in QUEUED.items():
        _dvc(repo, "exp", "run", "--queue", "-S", f"evaluate.n_ctx={n_ctx}", "--name", name)
    # Not _dvc: the worker's monitor inherits the command's stdout/stderr, so captured pipes
    # would stay open (and block) until the worker exits.
    log_path = repo.parent / "queue-start.log"
    with log_path.open("w") as log:
        cmd = (str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", "2")
        started = subprocess.run(cmd, cwd=repo, env=_env(repo), stdout=log, stderr=log, timeout=300)
    assert started.returncode == 0, log_path.read_text()
    table = _wait_for_queue(repo, timeout_s=900.0)
    rows = {row[1]: row for row in (line.split() for line in table.splitlines()[1:]) if row[1:]}
    for name in QUEUED:
        if "Success" not in rows.get(name, ()):
            pytest.fail(f"{table}\n{_dvc(repo, 'queue', 'logs', name)[-8000:]}")
    _dvc(repo, "queue", "stop")
    exps = {e["name"]: e for e in _experiments(json.loads(_dvc(repo, "exp", "show", "--json")))}
    assert set(exps) == {first_exp, *QUEUED}
    first = exps[first_exp]["data"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking_experiment)
    for name, n_ctx in QUEUED.items():
        queued = exps[name]["data"]
        assert queued["params"]["params.yaml"]["data"]["evaluate"]["n_ctx"] == n_ctx
        for v in VARIANTS:
            m = queued["metrics"][f"metrics/{v}.json"]["data"]
            assert m["k"] == 4 and all(math.isfinite(m[key]) for key in METRIC_KEYS), (name, v)
            assert m["ce_n_contexts"] == n_ctx, (name, v)
            assert m["ce_clean"] != first["metrics"][f"metrics/{v}.json"]["data"]["ce_clean"]
        parents = client.search_runs(
            [experiment.experiment_id],
            f"tags.`saelab.role` = 'pipeline' and tags.dvc_exp_name = '{name}'",
        )
        assert [r.info.status for r in parents] == ["FINISHED"], name
