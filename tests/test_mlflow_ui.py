"""The MLflow UI in a real browser: two `dvc exp` runs logged as the pipeline logs them (a
nested variant run each, then summarize's metrics on their parents), served by `mlflow ui` on
loopback, opened in headless Chromium with every other host unresolvable. The compare view of
the two parent runs shows both runs' params and metrics; the experiment page, opened with the
URL the README gives, shows the runs table (not MLflow 3's GenAI overview). A screenshot of the
compare view is left in the test's tmp directory (``compare.png``).

Needs a Chromium (`apt-get install chromium`; .ci/run installs it); skipped without one, except
under CI, where a missing browser fails. Nothing waits on a clock: the server is polled until
it answers (within a generous deadline) and Chromium's virtual time does not advance while a
request is pending."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_plots_html import _browser  # headless Chromium, or skip (fail under CI)

# (exp name, k, topk/fvu, topk/delta_ce): summarize's `<variant>/<metric>` on each parent
RUNS = (("exp-a", 32, 0.316, 0.491), ("exp-b", 64, 0.298, 0.452))


def _log_two_exp_runs(uri: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str]]:
    """The experiment id and the two parent run ids, logged through saelab.tracking as two
    `dvc exp run`s would (DVC_STAGE and DVC_EXP_NAME set)."""
    from mlflow import MlflowClient

    from saelab.tracking import mlflow_run, pipeline_run_id, variant_run_tags

    monkeypatch.setenv("DVC_STAGE", "train@topk")
    parents = []
    for name, k, fvu, delta_ce in RUNS:
        monkeypatch.setenv("DVC_EXP_NAME", name)
        with mlflow_run("saelab", uri, "topk", variant_run_tags("saelab", uri, "topk", name)) as t:
            t.log_metrics({"eval/fvu": fvu})
        parent = pipeline_run_id("saelab", uri, name)
        with mlflow_run("saelab", uri, "pipeline", {}, parent) as t:
            t.log_params({"k": k})
            t.log_metrics({"topk/fvu": fvu, "topk/delta_ce": delta_ce})
        parents.append(parent)
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("saelab")
    return exp.experiment_id, parents


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 600) -> None:
    """Poll ``url`` until it answers 200; fail if the server exits or the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"mlflow ui exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow ui did not answer {url} in {deadline_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory: pytest.TempPathFactory):
    """(base URL, experiment id, parent run ids, tmp dir) of a running `mlflow ui`."""
    tmp = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        exp_id, parents = _log_two_exp_runs(uri, mp)
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_up(proc, f"{base}/health", log)
        yield base, exp_id, parents, tmp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the job runner it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _chromium(browser: str, url: str, profile: Path, *out: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, hosts other than loopback unresolvable, 30 s of virtual
    time (which waits for pending requests), a window tall enough to render every table row."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           "--window-size=1600,2400", "--virtual-time-budget=30000", *out, url]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_compare_view_renders_both_runs_metrics(mlflow_ui) -> None:
    """The compare view of the two parent runs: "Comparing 2 Runs", both run names, and the
    params and metrics table with each run's values (rows k, topk/delta_ce, topk/fvu; one
    column per run, in the order given)."""
    browser = _browser()
    base, exp_id, parents, tmp = mlflow_ui
    url = f"{base}/#/compare-runs?runs={json.dumps(parents)}&experiments={json.dumps([exp_id])}"
    dom = _chromium(browser, url, tmp / "profile-compare", "--dump-dom").stdout
    assert "Comparing 2 Runs from 1 Experiment" in dom
    for name, *_ in RUNS:
        assert f"pipeline {name} {name}" in dom
    assert "topk/fvu" in dom and "topk/delta_ce" in dom
    cells = re.findall(r'tooltip-data-state="closed">([0-9.]+)</span>', dom)  # numeric cells
    # minus each run's saelab.pid tag (the process that held it open: this one)
    cells = [c for c in cells if c != str(os.getpid())]
    (_, k_a, fvu_a, dce_a), (_, k_b, fvu_b, dce_b) = RUNS
    assert cells == [str(k_a), str(k_b), str(dce_a), str(dce_b), str(fvu_a), str(fvu_b)]
    _chromium(browser, url, tmp / "profile-shot", f"--screenshot={tmp / 'compare.png'}")
    assert (tmp / "compare.png").stat().st_size > 10_000


def test_experiment_page_opens_on_its_runs(mlflow_ui) -> None:
    """The README's URL for the experiment (``?workflowType=machine_learning``: MLflow 3.17's UI
    takes the page kind from this toggle, GenAI by default, not from the experiment's tag) shows
    the runs table with both pipeline runs."""
    browser = _browser()
    base, exp_id, _, tmp = mlflow_ui
    url = f"{base}/#/experiments/{exp_id}?workflowType=machine_learning"
    dom = _chromium(browser, url, tmp / "profile-runs", "--dump-dom").stdout
    for name, *_ in RUNS:
        assert f"pipeline {name} {name}" in dom
    assert "matching runs" in dom
