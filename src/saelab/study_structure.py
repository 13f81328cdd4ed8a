"""Structure metrics of a study's runs: ``saelab study structure`` (issue 12 §4, issue 13).

A study's runs are ``dvc exp`` experiments that reproduce ``evaluate@<variant>`` only (the
structure stages would re-run ``probe_data`` in every experiment's temporary copy). This module
measures them afterwards, from what each experiment committed: its SAE (``models/<variant>``, a
DVC output held in the local DVC cache, fetched with ``dvc get --rev``) and its ``params.yaml``
(``git show``), against the workspace's ``probe_data`` output and eval activations. Those are
the same for every run of a study as long as the study does not override ``data``, ``model`` or
``cache`` params (checked: :func:`check_shared_inputs`); every run is measured with the
workspace's ``structure`` settings. The metrics are
:func:`saelab.structure.run_structure`'s (sparse probing, absorption, feature sharing), merged
into the run's row of ``runs.csv``, with ``structure_probes`` naming the probe data's DVC hash.

Like the runs themselves, this needs the experiments' refs and DVC cache, which do not travel
with the repository: run it on the machine that ran the study, then commit ``runs.csv``.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from saelab.config import ConfigError, PipelineConfig, parse_params
from saelab.study import experiment_refs, scalar_metrics

log = logging.getLogger(__name__)

SHARED_SECTIONS = ("data", "model", "cache", "sae")
"""params.yaml sections that must equal the workspace's for the workspace's probe data and eval
activations to be the run's (``sae.d_sae`` may differ: it is compared without it). The
``structure`` section is the measurement's, not the run's: every run is measured with the
workspace's (:func:`exp_params`), the settings the probe data was built with."""


def exp_commits(cwd: str | Path = ".") -> dict[str, str]:
    """``{experiment name: commit}`` of every finished ``dvc exp`` in the repository at ``cwd``
    (:func:`saelab.study.experiment_refs`; a name under several baselines: the most recent
    commit)."""
    latest: dict[str, tuple[int, str]] = {}
    for _, name, commit, when in experiment_refs(cwd):
        if name not in latest or when >= latest[name][0]:
            latest[name] = (when, commit)
    return {name: commit for name, (_, commit) in latest.items()}


def _overlay(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values in place of its own, mapping by mapping."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(base.get(key), Mapping)
        out[key] = _overlay(base[key], value) if both else value
    return out


def exp_params(
    commit: str, workspace: Mapping[str, Any], cwd: str | Path = "."
) -> tuple[dict[str, Any], PipelineConfig]:
    """The experiment's ``params.yaml`` at ``commit`` over ``workspace`` (the workspace's params
    as a mapping, which fills keys added to params.yaml since the experiment ran), with the
    workspace's ``structure`` section (the measurement's settings): the merged mapping and its
    validated config.

    Raises:
        ConfigError: the file is missing at that commit or the merged params are invalid.
    """
    shown = subprocess.run(
        ["git", "show", f"{commit}:params.yaml"], cwd=cwd, capture_output=True, text=True
    )
    if shown.returncode != 0:
        raise ConfigError(f"params: experiment commit {commit} has no params.yaml")
    raw = _overlay(workspace, yaml.safe_load(shown.stdout))
    raw["structure"] = workspace["structure"]
    return raw, parse_params(raw)


def check_shared_inputs(run: str, raw: Mapping[str, Any], workspace: Mapping[str, Any]) -> None:
    """ConfigError unless the run's :data:`SHARED_SECTIONS` equal the workspace's (``sae.d_sae``
    excepted): otherwise the workspace's probe data or eval activations are not the run's."""
    for section in SHARED_SECTIONS:
        a, b = dict(raw.get(section) or {}), dict(workspace.get(section) or {})
        if section == "sae":
            a.pop("d_sae", None), b.pop("d_sae", None)
        if a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ConfigError(
                f"run {run}: params {section}.{keys[0]} is {a.get(keys[0])!r} but the "
                f"workspace's is {b.get(keys[0])!r}; its structure needs its own probe_data"
            )


def fetch_sae(commit: str, variant: str, out: Path, cwd: str | Path = ".") -> Path:
    """Copy the experiment's ``models/<variant>`` (from the local DVC cache) to ``out``.

    Raises:
        subprocess.CalledProcessError: ``dvc get`` failed (e.g. the DVC cache no longer holds
            that output).
    """
    subprocess.run(
        ["dvc", "get", ".", f"models/{variant}", "--rev", commit, "-o", str(out)],
        cwd=cwd, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out


def probes_hash(lock: str | Path = "dvc.lock") -> str | None:
    """The DVC md5 of the ``probe_data`` stage's output in ``lock`` (None if not recorded)."""
    path = Path(lock)
    if not path.is_file():
        return None
    stage = (yaml.safe_load(path.read_text()).get("stages") or {}).get("probe_data") or {}
    outs = stage.get("outs") or []
    return outs[0].get("md5") if outs else None


def task_means(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``sp_mean_k<k>``: the mean over the sparse-probing tasks of ``sp_<task>_k<k>`` (held-out
    balanced accuracy with the k best latents; SAEBench's ``sae_top_k_test_accuracy`` is such a
    mean over its datasets), for every k that every task has."""
    by_k: dict[str, list[float]] = {}
    tasks = set()
    for key, value in metrics.items():
        m = re.fullmatch(r"sp_([a-z]+)_k(\d+)", key)
        if m and m.group(1) not in ("mean", "random"):
            tasks.add(m.group(1))
            by_k.setdefault(m.group(2), []).append(float(value))
    return {f"sp_mean_k{k}": sum(v) / len(v) for k, v in by_k.items() if len(v) == len(tasks)}


Measure = Callable[[PipelineConfig, Path], Mapping[str, Any]]


def structure_rows(
    rows: Sequence[Mapping[str, Any]],
    measure: Measure,
    workspace: Mapping[str, Any],
    probes_id: str | None,
    cwd: str | Path = ".",
) -> list[dict[str, Any]]:
    """``rows`` (runs-table rows from ``dvc exp`` runs) with the structure metrics of each run's
    SAE merged in: ``measure(cfg, sae_dir)`` (e.g. :func:`saelab.structure.run_structure` bound
    to the probe data and activations) under the run's own params. Rows whose run has no
    experiment ref here are logged and returned unchanged.

    Raises:
        ConfigError: a run's params differ from ``workspace`` in a shared section.
    """
    commits = exp_commits(cwd)
    out = []
    for row in rows:
        commit = commits.get(str(row["run"]))
        if commit is None:
            log.warning("run %s: no dvc exp ref on this machine; structure skipped", row["run"])
            out.append(dict(row))
            continue
        raw, cfg = exp_params(commit, workspace, cwd)
        check_shared_inputs(str(row["run"]), raw, workspace)
        with tempfile.TemporaryDirectory(prefix="saelab-structure-") as tmp:
            sae_dir = fetch_sae(commit, str(row["variant"]), Path(tmp) / "sae", cwd)
            metrics = measure(cfg, sae_dir)
        log.info("run %s: structure measured", row["run"])
        kept = {k: v for k, v in scalar_metrics(metrics).items() if not k.startswith("seconds_")}
        kept.pop("k", None)
        out.append({**row, **kept, **task_means(kept), "structure_probes": probes_id or ""})
    return out


def selection(raw_study: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The study's ``structure:`` entry: a list of runs-table filters (the claims' ``where``
    grammar, :func:`saelab.report.select`); the runs any of them selects are measured.

    Raises:
        ConfigError: the entry is missing or not a list of mappings.
    """
    wanted = raw_study.get("structure")
    if (
        not isinstance(wanted, list)
        or not wanted
        or not all(isinstance(w, Mapping) for w in wanted)
    ):
        raise ConfigError(
            "study: structure must be a non-empty list of runs-table filters, e.g. "
            "[{groups: sampled_l}]"
        )
    return wanted
