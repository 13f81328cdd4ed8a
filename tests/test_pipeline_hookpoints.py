"""The DVC side of several hookpoints (issue 14, part 3): params' model.extra_hookpoints adds
train_hp@<h>-<v>, baseline_hp@<h> and evaluate_hp@<h>-<v> for each extra hookpoint <h> and
leaves the pipeline of one hookpoint as it was; `dvc exp run -S 'model.extra_hookpoints=[...]'`
on the tiny Llama caches every hookpoint in the cache stage and gives each its own metrics."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from saelab.cli import main
from tests.test_hookpoints import _files
from tests.test_pipeline import METRIC_KEYS, REPO, _dvc, _init_project

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())
# The stages of dvc.yaml before model.extra_hookpoints, in its order, for variants `vs`.
ONE_HOOKPOINT = ("prepare", "cache", "train@*", "baseline", "evaluate@*", "summarize", "report",
                 "features@*", "features_index", "probe_data", "structure@*")  # fmt: skip
PRIMARY_ONLY = ("summarize", "features_index", "report")  # read models/, metrics/ or neither


def _one_hookpoint_stages(variants: list[str]) -> list[str]:
    """ONE_HOOKPOINT with each ``<stage>@*`` expanded to ``<stage>@<v>`` for ``variants``."""
    stages = []
    for name in ONE_HOOKPOINT:
        stages += [name.replace("*", v) for v in variants] if name.endswith("*") else [name]
    return stages


def _project(root: Path, extras: list[str], variants: list[str]) -> Path:
    params = {**DEFAULT, "variants": variants}
    params["model"] = {**DEFAULT["model"], "extra_hookpoints": extras}
    _init_project(root, params)
    return root


def test_no_extra_hookpoints_is_the_pipeline_of_one_hookpoint(tmp_path) -> None:
    """With params.yaml's model.extra_hookpoints: [] the stages are those of the pipeline of one
    hookpoint, in order; two extra hookpoints and two variants add exactly train_hp@<h>-<v> and
    evaluate_hp@<h>-<v> for each pair and baseline_hp@<h> for each hookpoint, none of them
    upstream of summarize, features_index or report."""
    assert DEFAULT["model"]["extra_hookpoints"] == []
    variants = DEFAULT["variants"]
    default = _project(tmp_path / "default", [], variants)
    assert _dvc(default, "stage", "list", "--name-only").split() == _one_hookpoint_stages(variants)

    extras, two = ["blocks.20.hook_resid_post", "blocks.3.hook_resid_pre"], ["topk", "relu"]
    repo = _project(tmp_path / "extras", extras, two)
    added = [f"train_hp@{h}-{v}" for h in extras for v in two]
    added += [f"baseline_hp@{h}" for h in extras]
    added += [f"evaluate_hp@{h}-{v}" for h in extras for v in two]
    assert _dvc(repo, "stage", "list", "--name-only").split() == _one_hookpoint_stages(two) + added
    for stage in PRIMARY_ONLY:
        assert "_hp@" not in _dvc(repo, "dag", "--dot", stage), stage


def test_hookpoint_not_in_params_is_one_line_before_work(tmp_path, capsys) -> None:
    """`saelab train --hookpoint <h>` with <h> not among params' model.extra_hookpoints exits 2
    with one line naming the option and the allowed hookpoints, writing nothing."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(DEFAULT))
    (tmp_path / "acts").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--params", str(tmp_path / "params.yaml"), "--variant", "topk",
              "--hookpoint", "blocks.3.hook_resid_pre", "--activations", str(tmp_path / "acts"),
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "saelab: error: --hookpoint blocks.3.hook_resid_pre must be model.hookpoint "
        "(blocks.15.hook_resid_pre) or one of params model.extra_hookpoints (none)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _ran(repo: Path, *args: str) -> list[str]:
    """The stages that the dvc command ``args`` ran, sorted."""
    out = _dvc(repo, *args).splitlines()
    return sorted(line.split("'")[1] for line in out if line.startswith("Running stage"))


def _metrics(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    assert all(math.isfinite(metrics[key]) for key in METRIC_KEYS), path
    return metrics


@pytest.mark.slow
def test_dvc_exp_run_with_an_extra_hookpoint(
    tmp_path, tiny_llama_dir, tiny_corpus, make_tiny_params, one_thread_module, monkeypatch
) -> None:
    """`dvc exp run -S 'model.extra_hookpoints=[blocks.3.hook_resid_pre]' cache` (an extra
    hookpoint deeper than model.hookpoint blocks.2.hook_resid_pre; one variant), then `dvc
    repro evaluate@topk` and `dvc repro evaluate_hp`, which run model.hookpoint's and the extra
    hookpoint's train, baseline and evaluate stages, each from the one cache stage's output: its
    stores of each hookpoint are those of the cache of that hookpoint alone, the extra
    hookpoint's SAE, baseline and metrics are its own (same clean CE, another FVU and ablated
    CE), its MLflow run is tagged with it under the pipeline's one parent run, and the stages
    run are up to date afterwards. (Three commands: each within _dvc's time limit on a loaded
    machine; the MLflow runs all in the workspace, not an experiment.)"""
    from mlflow import MlflowClient

    from saelab.cache import cache_activations
    from saelab.capture import load_model
    from saelab.config import load_params
    from saelab.sae import load_sae

    params = make_tiny_params(tiny_llama_dir, tiny_corpus, None)
    params["variants"] = ["topk"]
    repo, extra = tmp_path / "repo", "blocks.3.hook_resid_pre"
    _init_project(repo, params)
    assert _ran(repo, "exp", "run", "-S", f"model.extra_hookpoints=[{extra}]", "cache") == [
        "cache", "prepare"
    ]  # fmt: skip
    assert _ran(repo, "repro", "evaluate@topk") == ["baseline", "evaluate@topk", "train@topk"]
    assert _ran(repo, "repro", "evaluate_hp") == [
        f"baseline_hp@{extra}", f"evaluate_hp@{extra}-topk", f"train_hp@{extra}-topk"
    ]  # fmt: skip

    monkeypatch.chdir(repo)  # as the stage ran: repo root, relative --tokens
    cfg = load_params("params.yaml")
    assert cfg.model.extra_hookpoints == (extra,)
    model = load_model(cfg.model, torch.device("cpu"))
    alone = tmp_path / "alone"
    for hookpoint, got in [(cfg.model.hookpoint, "data/activations"),
                           (extra, f"data/hookpoints/{extra}")]:  # fmt: skip
        one = cfg.model.model_copy(update={"hookpoint": hookpoint, "extra_hookpoints": ()})
        cache_activations(model, cfg.model_copy(update={"model": one}), "data/tokens",
                          alone / hookpoint)  # fmt: skip
        assert _files(repo / got) == _files(alone / hookpoint), hookpoint
    assert sorted(p.name for p in (repo / "data" / "hookpoints").iterdir()) == [extra]

    primary = _metrics(repo / "metrics" / "topk.json")
    at_extra = _metrics(repo / "metrics_hp" / extra / "topk.json")
    assert at_extra["ce_clean"] == primary["ce_clean"]  # the LM's own CE: no hookpoint in it
    for key in ("fvu", "ce_zero_ablated", "ce_spliced"):
        assert at_extra[key] != primary[key], key
    assert load_sae(repo / "models_hp" / extra / "topk").metadata["hookpoint"] == extra
    baseline = json.loads((repo / "data" / "baseline_hp" / extra / "baseline.json").read_text())
    assert baseline["hookpoint"] == extra

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(params["tracking"]["experiment"])
    runs = client.search_runs([experiment.experiment_id])
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs if "variant" in r.data.tags}
    assert len(parents) == 1  # both hookpoints' runs nest under the one pipeline parent
    tagged = {r.info.run_name: r.data.tags.get("saelab.hookpoint") for r in runs
              if "variant" in r.data.tags}  # fmt: skip
    assert tagged == {"topk": None, f"topk {extra}": extra}
    assert json.loads(_dvc(repo, "status", "--json", "evaluate@topk", "evaluate_hp")) == {}
