"""Run tracking: an MLflow tracker, a null tracker, and the metrics JSON that DVC reads.

The MLflow store defaults to ``sqlite:///<repo root>/mlflow.db``, the root of
:func:`saelab.config.repo_root` (``$DVC_ROOT``), which is also what relative paths in params are
relative to: a queued/temporary ``dvc exp run`` executes in a throw-away copy under
``<repo>/.dvc/tmp/exps/``, and runs logged there would be deleted with it.
``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` in params override the default.
Artifacts of an experiment created here go to ``<directory of mlflow.db>/mlartifacts``
(git-ignored), not MLflow's default ``./mlruns`` relative to the working directory, which under
a temporary ``dvc exp run`` copy would be deleted with it.

One pipeline run = one MLflow parent run with a nested run per variant (tag
``mlflow.parentRunId``), and one per variant and extra hookpoint (``model.extra_hookpoints``;
tagged :data:`HOOKPOINT_TAG`, named ``<variant> <hookpoint>``). Stages run as separate
processes, so the parent is found by its tags:
``saelab.role=pipeline``, the git commit, the DVC experiment name and ``saelab.params_hash``
(a hash of every parameter). Whichever stage comes first creates it (:func:`pipeline_run_id`);
when two processes race, both search again after creating and keep the oldest run, deleting the
other, which is as race-free as MLflow's SQLite store allows (DVC runs stages one at a time).

Only stages run by DVC (``$DVC_STAGE`` set, as DVC sets it for every stage command) nest under
the pipeline parent; an ad-hoc ``saelab train`` / ``evaluate`` is a standalone run (tag
``saelab.role=standalone``) and creates no parent (:func:`variant_run_tags`). The parent's
status follows its stages: RUNNING while one of its nested runs is open, then that run's end
status (:func:`mlflow_run`), and FINISHED once ``summarize`` has logged to it, so no run stays
RUNNING after the process that opened it has exited. A process killed outright (SIGKILL, the OOM
killer) cannot end its run: the next run opened in that experiment on the same host ends it
KILLED (:func:`close_orphaned_runs`, by the ``saelab.host`` / ``saelab.pid`` tags).

Every experiment is tagged ``mlflow.experimentKind = custom_model_development``
(:data:`EXPERIMENT_KIND`), the tag by which MLflow 3's UI tells a model-training experiment
from a GenAI one; untagged, ``mlflow ui`` may open the experiment on its GenAI overview instead
of the runs table. An experiment created before gets the tag when next used, unless it has one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from saelab.config import repo_root

log = logging.getLogger(__name__)

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_TAG = "mlflow.parentRunId"
HOST_TAG, PID_TAG = "saelab.host", "saelab.pid"  # the process holding a run open
HOOKPOINT_TAG = "saelab.hookpoint"  # a run of an extra hookpoint (params model.extra_hookpoints)


class Tracker(Protocol):
    """What the training loop and the stages log to; ``run_id`` names the run (None: none)."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None: ...


class NullTracker:
    """Logs nothing: lets the loop run without asking whether logging is on."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker:
    """Logs to one MLflow run (``run_id``), through the client API (no global active run)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log ``params`` (values as strings, at most 6000 characters). MLflow forbids changing
        a logged param: in a reopened run (a resumed training), params already logged are
        skipped, and those whose value changed keep the old value, with a warning naming them."""
        from mlflow.entities import Param

        new = {k: str(v)[:6000] for k, v in params.items()}
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in new.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("MLflow run %s keeps its logged values of %s", self.run_id, changed)
        items = [Param(k, v) for k, v in new.items() if k not in logged]
        for i in range(0, len(items), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Copy the files of ``local_dir`` into the run's artifacts (under ``artifact_path``)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_file: str | Path, artifact_path: str | None = None) -> None:
        """Copy the file ``local_file`` into the run's artifacts (under ``artifact_path``)."""
        self.client.log_artifact(self.run_id, str(local_file), artifact_path)


def tracking_uri(configured: str | None) -> str:
    """``MLFLOW_TRACKING_URI``, else params' ``tracking.tracking_uri``, else the sqlite default."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or configured
        or f"sqlite:///{repo_root() / 'mlflow.db'}"
    )


def run_tags(variant: str) -> dict[str, str]:
    """Tags of a run: variant, git commit, DVC experiment name and baseline (when under dvc exp)."""
    tags = {"variant": variant, "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
    baseline = os.environ.get("DVC_EXP_BASELINE_REV")
    if baseline:
        tags["dvc_exp_baseline_rev"] = baseline
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def params_hash(params: Mapping[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of ``params`` as canonical JSON (sorted keys)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def artifact_location(uri: str) -> str | None:
    """``<directory of the sqlite file>/mlartifacts`` for a ``sqlite:///`` URI, else None (the
    server's default)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts: :func:`artifact_location`) if new, and
    tagged :data:`EXPERIMENT_KIND` unless it already has a kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(
            name, artifact_location=artifact_location(uri), tags=dict([EXPERIMENT_KIND])
        )
    _tag_kind(client, exp)
    return exp.experiment_id


def _tag_kind(client: Any, exp: Any) -> None:
    """Give experiment ``exp`` the :data:`EXPERIMENT_KIND` tag unless it has a kind."""
    key, kind = EXPERIMENT_KIND
    if key not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, key, kind)


def in_pipeline() -> bool:
    """True when run as a DVC stage (DVC sets ``$DVC_STAGE`` for every stage command)."""
    return bool(os.environ.get("DVC_STAGE"))


def variant_run_tags(experiment: str, uri: str, variant: str, params_digest: str) -> dict:
    """Tags of a new variant run: :func:`run_tags` and the params hash; under DVC
    (:func:`in_pipeline`) also ``mlflow.parentRunId`` of the pipeline's parent (got or created),
    else ``saelab.role=standalone`` and no parent."""
    tags = {**run_tags(variant), "saelab.params_hash": params_digest}
    if not in_pipeline():
        return {**tags, "saelab.role": "standalone"}
    return {**tags, PARENT_TAG: pipeline_run_id(experiment, uri, params_digest)}


def pipeline_tags(params_digest: str) -> dict[str, str]:
    """The tags that identify one pipeline run's parent (module docstring)."""
    tags = {k: v for k, v in run_tags("").items() if k != "variant"}
    return {**tags, "saelab.role": "pipeline", "saelab.params_hash": params_digest}


def _find_parents(client: Any, exp_id: str, tags: Mapping[str, str]) -> list:
    """Runs of ``exp_id`` carrying every tag of ``tags``, oldest first."""
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items() if v]  # empty: checked below
    runs = client.search_runs(
        [exp_id], " and ".join(clauses), order_by=["attributes.start_time ASC"]
    )
    return [r for r in runs if all(r.data.tags.get(k, "") == v for k, v in tags.items())]


def pipeline_run_id(experiment: str, uri: str, params_digest: str) -> str:
    """The parent run of this pipeline run: found by :func:`pipeline_tags`, created if none
    (module docstring: get-or-create, the oldest wins a race)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)
    tags = pipeline_tags(params_digest)
    found = _find_parents(client, exp_id, tags)
    if found:
        return found[0].info.run_id
    name = f"pipeline {tags.get('dvc_exp_name') or 'workspace'} {params_digest}"
    created = client.create_run(exp_id, run_name=name, tags={k: v for k, v in tags.items() if v})
    oldest = _find_parents(client, exp_id, tags)[0].info.run_id
    if oldest != created.info.run_id:  # another stage created one meanwhile
        client.delete_run(created.info.run_id)
    return oldest


def _owner_tags() -> dict[str, str]:
    """Tags naming the process that holds a run open: ``saelab.host`` and ``saelab.pid``."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def close_orphaned_runs(client: Any, exp_id: str) -> list[str]:
    """End as KILLED every RUNNING run of experiment ``exp_id`` whose process (tags
    ``saelab.host``, ``saelab.pid``, :func:`_owner_tags`) ran on this host and no longer runs:
    a stage killed by SIGKILL or the OOM killer never reaches :func:`mlflow_run`'s end, and its
    run would otherwise stay RUNNING forever. Its parent run, if RUNNING, ends KILLED too (a
    re-run of the stage sets the parent RUNNING again). Runs of other hosts, or without the
    tags, are left alone. Returns the ids ended."""
    from saelab.store import pid_alive

    host = socket.gethostname()
    running = client.search_runs(
        [exp_id], f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    ended = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        for rid in (run.info.run_id, run.data.tags.get(PARENT_TAG)):
            if rid is not None and client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, status="KILLED")
                ended.append(rid)
        log.info("MLflow run %s ended KILLED: its process %s no longer runs", run.info.run_id, pid)
    return ended


@contextmanager
def mlflow_run(
    experiment: str,
    uri: str,
    run_name: str,
    tags: Mapping[str, str] | Callable[[], Mapping[str, str]],
    run_id: str | None = None,
) -> Iterator[MlflowTracker]:
    """Open (or, with ``run_id`` that exists in the store, reopen) an MLflow run.

    ``tags``: of a new run (a callable is called only when a run is created). The run ends
    FINISHED on success and FAILED on an exception (which is re-raised); its parent run, if it
    has one, is RUNNING meanwhile and then takes the same end status (module docstring).
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri)
    run = None
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            log.info("MLflow run %s is not in %s; starting a new run", run_id, uri)
    if run is None:
        exp_id = experiment_id(client, experiment, uri)
        close_orphaned_runs(client, exp_id)
        new_tags = {**(tags() if callable(tags) else tags), **_owner_tags()}
        run = client.create_run(exp_id, run_name=run_name, tags=new_tags)
    else:
        _tag_kind(client, client.get_experiment(run.info.experiment_id))
        close_orphaned_runs(client, run.info.experiment_id)
        MlflowTracker(client, run.info.run_id).set_tags(_owner_tags())
        client.update_run(run.info.run_id, status="RUNNING")
    parent = run.data.tags.get(PARENT_TAG)
    runs = [run.info.run_id] if parent is None else [run.info.run_id, parent]
    if parent is not None:
        client.update_run(parent, status="RUNNING")
    tracker = MlflowTracker(client, run.info.run_id)
    try:
        yield tracker
    except BaseException:
        for rid in runs:
            client.set_terminated(rid, status="FAILED")
        raise
    for rid in runs:
        client.set_terminated(rid, status="FINISHED")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def write_json_atomic(path: str | Path, data: Mapping[str, Any] | list) -> None:
    """Write ``data`` (a mapping, or a list of rows for DVC plots) as indented JSON via a temp
    file ``<path>.tmp-<pid>`` + rename: never a half-written file. A temp file left by a killed
    process is removed first (:func:`saelab.store.remove_stale_siblings`)."""
    path = _begin_file(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_npz_atomic(path: str | Path, arrays: Mapping[str, Any]) -> None:
    """Write numpy arrays (name -> array) to an uncompressed ``.npz`` via a temp file
    ``<path>.tmp-<pid>`` + rename: never a half-written file; stale temp files are removed first,
    as by :func:`write_json_atomic`."""
    import numpy as np

    path = _begin_file(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:  # a file object: np.savez appends no ".npz" to the name
            np.savez(f, **arrays)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _begin_file(path: str | Path) -> Path:
    """``path`` as a Path, its directory created and the ``.tmp-<pid>`` files that killed
    processes left beside it removed."""
    from saelab.store import remove_stale_siblings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    return path
