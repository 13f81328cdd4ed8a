"""tracking.py: where runs are logged (repo root, URI precedence), run lifecycle, metrics JSON."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saelab.config import repo_root
from saelab.tracking import (
    HOST_TAG,
    PID_TAG,
    flatten,
    mlflow_run,
    tracking_uri,
    write_json_atomic,
    write_npz_atomic,
)


@pytest.fixture
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Neither DVC_ROOT nor MLFLOW_TRACKING_URI leaks in from the environment running pytest."""
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return monkeypatch


def test_repo_root_climbs_out_of_a_dvc_exp_temp_copy(tmp_path: Path, no_tracking_env) -> None:
    """A temp `dvc exp run` executes in <repo>/.dvc/tmp/exps/<tmpdir>: the root is <repo>, so
    runs land in the store that outlives the throw-away copy."""
    repo = tmp_path / "repo"
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp_copy.mkdir(parents=True)
    no_tracking_env.setenv("DVC_ROOT", str(exp_copy))
    assert repo_root() == repo.resolve()


def test_repo_root_is_dvc_root_otherwise(tmp_path: Path, no_tracking_env) -> None:
    """An ordinary DVC_ROOT is the root as is (resolved), even with a `.dvc` folder inside it."""
    repo = tmp_path / "repo"
    (repo / ".dvc" / "tmp").mkdir(parents=True)
    no_tracking_env.setenv("DVC_ROOT", str(repo))
    assert repo_root() == repo.resolve()


def test_repo_root_without_dvc_root_is_cwd(tmp_path: Path, no_tracking_env) -> None:
    """Outside DVC (no DVC_ROOT) the root is the working directory."""
    no_tracking_env.chdir(tmp_path)
    assert repo_root() == tmp_path.resolve()


def test_tracking_uri_precedence(tmp_path: Path, no_tracking_env) -> None:
    """MLFLOW_TRACKING_URI beats params' tracking_uri, which beats sqlite:///<root>/mlflow.db."""
    no_tracking_env.setenv("DVC_ROOT", str(tmp_path))
    default = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(None) == default
    assert tracking_uri("sqlite:///configured.db") == "sqlite:///configured.db"
    no_tracking_env.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking_uri("sqlite:///configured.db") == "sqlite:///from-env.db"
    assert tracking_uri(None) == "sqlite:///from-env.db"


def test_default_tracking_uri_under_exp_copy_points_at_repo(tmp_path: Path, no_tracking_env):
    """Under a `dvc exp` temp copy the default store is the repo's mlflow.db, not the copy's."""
    repo = tmp_path / "repo"
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpxyz"
    exp_copy.mkdir(parents=True)
    no_tracking_env.setenv("DVC_ROOT", str(exp_copy))
    assert tracking_uri(None) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"


def test_flatten_joins_nested_keys_with_dots() -> None:
    """Nested mappings become dotted keys; lists, None and scalars are leaves, kept as they are."""
    tree = {"k": 8, "data": {"corpus_dirs": ["a", "b"], "split": {"seed": 0}}, "lr": None}
    assert flatten(tree) == {
        "k": 8,
        "data.corpus_dirs": ["a", "b"],
        "data.split.seed": 0,
        "lr": None,
    }
    assert flatten({}) == {}


def test_write_json_atomic_writes_json_and_no_temp_file(tmp_path: Path) -> None:
    """The file holds exactly the data as JSON (parents created, an old file replaced) and no
    temporary sibling is left in the directory."""
    path = tmp_path / "metrics" / "topk.json"
    write_json_atomic(path, {"fvu": 0.5, "variant": "old"})
    data = {"variant": "topk", "k": 8, "fvu": 0.25, "l0": 8.0}
    write_json_atomic(path, data)
    assert json.loads(path.read_text()) == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["topk.json"]


def test_mlflow_run_creates_reopens_and_finishes(tmp_path: Path) -> None:
    """A first call creates a run (FINISHED on exit, tags and metrics kept); a second call with
    its run_id logs into the same run instead of creating another."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_run("exp", uri, "topk", {"variant": "topk"}) as tracker:
        tracker.log_params({"k": 8})
        tracker.log_metrics({"train/fvu": 0.5}, step=3)
        run_id = tracker.run_id
    with mlflow_run("exp", uri, "topk", {"variant": "topk"}, run_id) as tracker:
        assert tracker.run_id == run_id
        tracker.log_metrics({"eval/fvu": 0.25})

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["variant"] == "topk"
    assert run.data.params == {"k": "8"}
    assert run.data.metrics == {"train/fvu": 0.5, "eval/fvu": 0.25}
    assert [m.step for m in client.get_metric_history(run_id, "train/fvu")] == [3]


def test_mlflow_run_with_unknown_run_id_starts_a_new_run(tmp_path: Path) -> None:
    """A run_id missing from the store (e.g. the SAE was trained against another store) starts
    a fresh run rather than failing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_run("exp", uri, "topk", {}, run_id="0" * 32) as tracker:
        assert tracker.run_id != "0" * 32


def test_mlflow_run_marks_failed_and_reraises(tmp_path: Path) -> None:
    """An exception inside the block ends the run FAILED and propagates unchanged."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="boom"):
        with mlflow_run("exp", uri, "batchtopk", {}) as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"


def test_reopened_run_keeps_logged_params_and_takes_tags(tmp_path: Path, caplog) -> None:
    """Logging params into a reopened run (a resumed training) adds the new ones and keeps the
    first value of a changed one (MLflow forbids changing it) with a warning naming it, instead
    of failing; set_tags adds tags."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_run("exp", uri, "topk", {}) as tracker:
        tracker.log_params({"k": 8, "evaluate.n_ctx": 64})
        run_id = tracker.run_id
    with mlflow_run("exp", uri, "topk", {}, run_id) as tracker:
        tracker.log_params({"k": 8, "evaluate.n_ctx": 32, "train.checkpoint_every": 56})
        tracker.set_tags({"resumed_from_step": "10"})
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params == {"k": "8", "evaluate.n_ctx": "64", "train.checkpoint_every": "56"}
    assert run.data.tags["resumed_from_step"] == "10"
    assert "keeps its logged values of ['evaluate.n_ctx']" in caplog.text


def test_params_hash_is_stable_and_order_free() -> None:
    """The same params in any key order hash alike; one changed value changes the hash."""
    from saelab.tracking import params_hash

    a = params_hash({"k": 8, "train": {"lr": None, "seed": 0}})
    assert a == params_hash({"train": {"seed": 0, "lr": None}, "k": 8})
    assert a != params_hash({"k": 16, "train": {"lr": None, "seed": 0}})
    assert len(a) == 12


def test_artifacts_go_next_to_the_sqlite_store(tmp_path: Path) -> None:
    """An experiment created for sqlite:///<dir>/mlflow.db stores artifacts in <dir>/mlartifacts
    (not ./mlruns of the working directory); logged files land there."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cfg.json").write_text("{}")
    with mlflow_run("exp", uri, "topk", {}) as tracker:
        tracker.log_artifacts(tmp_path / "model", "models/topk")
        run_id = tracker.run_id
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert list((tmp_path / "mlartifacts").rglob("models/topk/cfg.json"))
    assert run_id in str(next((tmp_path / "mlartifacts").rglob("cfg.json")))


def test_pipeline_parent_is_got_or_created_per_params_and_exp(
    tmp_path: Path, no_tracking_env
) -> None:
    """The first call creates a parent run tagged saelab.role=pipeline and the params hash; a
    second call with the same hash (another stage of the same pipeline run) finds it; another
    hash or another DVC experiment name gets its own parent."""
    from mlflow import MlflowClient

    from saelab.tracking import pipeline_run_id

    no_tracking_env.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = pipeline_run_id("exp", uri, "abc123")
    assert pipeline_run_id("exp", uri, "abc123") == first
    assert pipeline_run_id("exp", uri, "def456") != first
    no_tracking_env.setenv("DVC_EXP_NAME", "comic-gram")
    other = pipeline_run_id("exp", uri, "abc123")
    assert other != first and pipeline_run_id("exp", uri, "abc123") == other
    tags = MlflowClient(tracking_uri=uri).get_run(other).data.tags
    assert tags["saelab.role"] == "pipeline" and tags["saelab.params_hash"] == "abc123"
    assert tags["dvc_exp_name"] == "comic-gram"


def test_pipeline_parent_race_keeps_the_oldest(tmp_path: Path, no_tracking_env) -> None:
    """When another process created a parent with the same tags first (simulated: an older run
    already carries them but was not found by this caller's first search), the oldest one is
    returned and no duplicate remains active."""
    from mlflow import MlflowClient

    import saelab.tracking as tracking

    no_tracking_env.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    winner = tracking.pipeline_run_id("exp", uri, "abc123")
    real_find, calls = tracking._find_parents, []

    def miss_first(*args):
        calls.append(1)
        return [] if len(calls) == 1 else real_find(*args)

    no_tracking_env.setattr(tracking, "_find_parents", miss_first)
    assert tracking.pipeline_run_id("exp", uri, "abc123") == winner
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.get_experiment_by_name("exp").experiment_id
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [winner]


def test_experiments_are_marked_as_model_training(tmp_path: Path) -> None:
    """A new experiment carries mlflow.experimentKind = custom_model_development (so that MLflow
    3's UI opens it on its runs); an older untagged one gets the tag when next used; a kind
    someone chose is kept."""
    from mlflow import MlflowClient

    from saelab.tracking import EXPERIMENT_KIND

    key, kind = EXPERIMENT_KIND
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    with mlflow_run("new", uri, "topk", {}):
        pass
    assert client.get_experiment_by_name("new").tags[key] == kind == "custom_model_development"
    old = client.create_experiment("old")
    run_id = client.create_run(old).info.run_id
    client.set_terminated(run_id)
    assert key not in client.get_experiment(old).tags
    with mlflow_run("old", uri, "topk", {}, run_id):  # a reopened run tags its experiment
        pass
    assert client.get_experiment(old).tags[key] == kind
    chosen = client.create_experiment("chosen", tags={key: "genai_development"})
    with mlflow_run("chosen", uri, "topk", {}):
        pass
    assert client.get_experiment(chosen).tags[key] == "genai_development"


def _statuses(uri: str) -> dict[str, str]:
    """Run name -> status of every run of the store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return {r.info.run_name: r.info.status for r in client.search_runs(exps)}


def test_adhoc_runs_are_standalone(tmp_path: Path, no_tracking_env) -> None:
    """Outside DVC ($DVC_STAGE unset) a variant run gets no parent and none is created: the
    store holds one FINISHED run, tagged saelab.role=standalone."""
    from saelab.tracking import PARENT_TAG, variant_run_tags

    no_tracking_env.delenv("DVC_STAGE", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = variant_run_tags("exp", uri, "topk", "abc123")
    assert PARENT_TAG not in tags and tags["saelab.role"] == "standalone"
    with mlflow_run("exp", uri, "topk", tags):
        pass
    assert _statuses(uri) == {"topk": "FINISHED"}


def test_a_stage_closes_the_pipeline_parent(tmp_path: Path, no_tracking_env) -> None:
    """Under DVC a variant run nests under the pipeline's parent, which is RUNNING while the
    stage runs and takes the stage's end status after it: FINISHED, or FAILED when the stage
    raised; a reopened run (evaluate after train) does the same. Tags given as a callable are
    only asked for when a run is created."""
    from mlflow import MlflowClient

    from saelab.tracking import PARENT_TAG, variant_run_tags

    no_tracking_env.setenv("DVC_STAGE", "train@topk")
    no_tracking_env.delenv("DVC_EXP_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    with mlflow_run("exp", uri, "topk", lambda: variant_run_tags("exp", uri, "topk", "h")) as t:
        parent = client.get_run(t.run_id).data.tags[PARENT_TAG]
        assert client.get_run(parent).info.status == "RUNNING"
        run_id = t.run_id
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).info.run_name == "pipeline workspace h"

    def no_new_run() -> dict:
        raise AssertionError("tags asked for, but the run exists")

    with pytest.raises(RuntimeError), mlflow_run("exp", uri, "topk", no_new_run, run_id):
        assert client.get_run(parent).info.status == "RUNNING"
        raise RuntimeError("evaluate failed")
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.get_run(parent).info.status == "FAILED"
    with mlflow_run("exp", uri, "topk", no_new_run, run_id):
        pass
    assert set(_statuses(uri).values()) == {"FINISHED"}


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


@pytest.mark.parametrize("write", [write_json_atomic, write_npz_atomic])
def test_atomic_file_writes_remove_what_killed_processes_left(tmp_path: Path, write) -> None:
    """A writer killed between writing its temp file and the rename leaves ``<file>.tmp-<pid>``:
    the next write of that file removes a dead process's one, keeps a live process's one and
    files of other names, and leaves no temp file of its own."""
    path = tmp_path / "metrics" / "topk.json"
    path.parent.mkdir()
    stale = path.with_name(f"topk.json.tmp-{_dead_pid()}")
    kept = [path.with_name(f"topk.json.tmp-{os.getppid()}"), path.with_name("relu.json.tmp-1")]
    for p in (stale, *kept):
        p.write_text("{half")
    write(path, {"fvu": np.ones(2)} if write is write_npz_atomic else {"fvu": 0.5})
    assert sorted(path.parent.iterdir()) == sorted([path, *kept])


KILLED_INSIDE_A_RUN = """
import os, signal, sys
from saelab.tracking import mlflow_run
with mlflow_run("exp", sys.argv[1], "topk", {"variant": "topk"}) as tracker:
    print(tracker.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_whose_process_was_killed_ends_killed_when_the_next_run_opens(tmp_path) -> None:
    """A process SIGKILLed inside :func:`mlflow_run` leaves its run RUNNING; the next run opened
    in the experiment ends it KILLED. A RUNNING run of a live process, one of another host and
    one without owner tags stay RUNNING; the new run ends FINISHED."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = subprocess.run([sys.executable, "-c", KILLED_INSIDE_A_RUN, uri],
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    orphan = killed.stdout.split()[0]
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(orphan).info.status == "RUNNING"
    exp_id = client.get_experiment_by_name("exp").experiment_id
    host = socket.gethostname()
    others = [
        client.create_run(exp_id, tags=tags).info.run_id
        for tags in (
            {HOST_TAG: host, PID_TAG: str(os.getppid())},
            {HOST_TAG: f"{host}-elsewhere", PID_TAG: str(_dead_pid())},
            {},
        )
    ]
    with mlflow_run("exp", uri, "topk", {"variant": "topk"}) as tracker:
        new = tracker.run_id
    status = {rid: client.get_run(rid).info.status for rid in (orphan, new, *others)}
    assert status == {orphan: "KILLED", new: "FINISHED", **dict.fromkeys(others, "RUNNING")}
