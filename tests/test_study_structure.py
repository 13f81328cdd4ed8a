"""saelab.study_structure: structure metrics of a study's finished dvc exp runs, measured from
each experiment's own params and SAE and merged into its runs-table row."""

import subprocess
from pathlib import Path

import pytest
import yaml

from saelab import study_structure
from saelab.config import ConfigError
from saelab.study_structure import (
    check_shared_inputs,
    exp_commits,
    exp_params,
    selection,
    structure_rows,
    task_means,
)

REPO = Path(__file__).resolve().parents[1]
WORKSPACE = yaml.safe_load((REPO / "params.yaml").read_text())


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def _repo_with_exps(tmp_path: Path, exps: dict[str, dict]) -> dict[str, str]:
    """A git repo whose ``refs/exps/<base>/<name>`` commits hold ``params.yaml`` as given (only
    the keys an old experiment had: the rest must come from the workspace)."""
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "base")
    base = _git(tmp_path, "rev-parse", "HEAD")
    shas = {}
    for name, params in exps.items():
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        _git(tmp_path, "add", "params.yaml")
        _git(tmp_path, "commit", "-q", "-m", name)
        shas[name] = _git(tmp_path, "rev-parse", "HEAD")
        _git(tmp_path, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", shas[name])
    _git(tmp_path, "update-ref", "refs/exps/celery/stash", base)
    return shas


def _old_params(**top) -> dict:
    """The workspace's params as an experiment of an older commit saw them: without
    ``variant_params.matryoshka`` and the ``distributed`` section (added since)."""
    old = yaml.safe_load(yaml.safe_dump(WORKSPACE))
    old["variant_params"].pop("matryoshka")
    old.pop("distributed")
    old.update(top)
    return old


def test_task_means_averages_only_complete_ks() -> None:
    """sp_mean_k<k> is the mean of the tasks' k-latent accuracies; random baselines, intervals
    and a k missing for one task do not enter."""
    metrics = {"sp_source_k1": 0.5, "sp_author_k1": 0.7, "sp_decade_k1": 0.9,
               "sp_source_random_k1": 0.1, "sp_source_k1_ci_low": 0.0,
               "sp_source_k5": 1.0, "sp_author_k5": 0.8}  # fmt: skip
    assert task_means(metrics) == {"sp_mean_k1": pytest.approx(0.7)}


def test_exp_commits_and_params_overlay(tmp_path: Path) -> None:
    """Experiments are found by name (queue refs skipped); their params.yaml is read at the
    experiment's commit, keys added to params.yaml since then come from the workspace, and the
    structure section (the measurement's settings) is the workspace's."""
    old = _old_params(k=16)
    old["structure"] = {**old["structure"], "random_draws": 7}  # the run's structure: not used
    shas = _repo_with_exps(tmp_path, {"a-k16": old, "b": _old_params()})
    assert exp_commits(tmp_path) == shas
    raw, cfg = exp_params(shas["a-k16"], WORKSPACE, tmp_path)
    assert cfg.k == 16 and raw["k"] == 16
    assert raw["structure"] == WORKSPACE["structure"]  # measured with the workspace's settings
    assert raw["variant_params"]["matryoshka"] == WORKSPACE["variant_params"]["matryoshka"]
    assert cfg.variant_params.sampled.l == WORKSPACE["variant_params"]["sampled"]["l"]
    with pytest.raises(ConfigError, match="has no params.yaml"):
        exp_params(_git(tmp_path, "rev-parse", "HEAD~2"), WORKSPACE, tmp_path)


def test_shared_inputs_must_match_the_workspace() -> None:
    """A run may differ in d_sae and anything outside the shared sections; a different model
    or cache setting names the key and both values."""
    run = yaml.safe_load(yaml.safe_dump(WORKSPACE))
    run["sae"]["d_sae"] = 9216
    run["k"] = 16
    check_shared_inputs("r", run, WORKSPACE)
    run["cache"]["max_train_tokens"] = 1024
    with pytest.raises(ConfigError) as err:
        check_shared_inputs("r", run, WORKSPACE)
    assert str(err.value) == (
        "run r: params cache.max_train_tokens is 1024 but the workspace's is "
        f"{WORKSPACE['cache']['max_train_tokens']}; its structure needs its own probe_data"
    )


def test_structure_rows_measure_each_run_under_its_own_params(tmp_path, monkeypatch) -> None:
    """Each row is measured with its experiment's config and SAE; timings and k are dropped,
    the task means and the probe data's hash added; a run without a ref here is unchanged;
    a run on another model is an error, not a silently wrong row."""
    shas = _repo_with_exps(
        tmp_path,
        {"s-l4": _old_params(variant_params={**_old_params()["variant_params"],
                                              "sampled": {"l": 4, "score": "l2",
                                                          "pool": "sample", "seed": 1}}),
         "other-model": _old_params(model={**WORKSPACE["model"],
                                           "hookpoint": "blocks.3.hook_resid_pre"})},
    )  # fmt: skip
    fetched = []

    def fake_fetch(commit, variant, out, cwd="."):
        fetched.append((commit, variant))
        out.mkdir(parents=True)
        (out / "cfg.json").write_text("{}")
        return out

    monkeypatch.setattr(study_structure, "fetch_sae", fake_fetch)
    seen = []

    def measure(cfg, sae_dir):
        seen.append((cfg.variant_params.sampled.l, (sae_dir / "cfg.json").is_file()))
        return {"sp_source_k1": 0.6, "sp_author_k1": 0.8, "k": cfg.k, "seconds_load": 1.0,
                "absorption_fraction": 0.1, "hist": [1, 2]}  # fmt: skip

    rows = [{"run": "s-l4", "variant": "sampled", "fvu": 0.4},
            {"run": "gone", "variant": "topk", "fvu": 0.3}]  # fmt: skip
    out = structure_rows(rows, measure, WORKSPACE, "abc.dir", tmp_path)
    assert fetched == [(shas["s-l4"], "sampled")] and seen == [(4, True)]
    assert out[0] == {"run": "s-l4", "variant": "sampled", "fvu": 0.4, "sp_source_k1": 0.6,
                      "sp_author_k1": 0.8, "absorption_fraction": 0.1,
                      "sp_mean_k1": pytest.approx(0.7), "structure_probes": "abc.dir"}  # fmt: skip
    assert out[1] == rows[1]
    with pytest.raises(ConfigError, match="params model.hookpoint is 'blocks.3.hook_resid_pre'"):
        structure_rows([{"run": "other-model", "variant": "topk"}], measure, WORKSPACE, None,
                       tmp_path)  # fmt: skip


def test_selection_of_the_main_study() -> None:
    """The main study measures its Sampled-SAE runs and the BatchTopK runs they are compared
    with; a missing or malformed entry is one clear error."""
    raw = yaml.safe_load((REPO / "reports" / "main" / "study.yaml").read_text())
    assert {"groups": "sampled_l"} in selection(raw)
    for bad in ({}, {"structure": {"groups": "x"}}, {"structure": ["x"]}):
        with pytest.raises(ConfigError, match="study: structure must be a non-empty list"):
            selection(bad)
