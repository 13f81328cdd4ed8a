"""saelab.study: the grid of a study.yaml, the dvc exp run lines, and the runs table that
collect fills from `dvc exp show --json` or from a metrics directory."""

import copy
import json
from pathlib import Path

import pytest
import yaml

from saelab.cli import main
from saelab.config import ConfigError
from saelab.study import collect as collect_rows
from saelab.study import (
    collect_curves,
    curves_from_mlflow,
    exp_run_args,
    expand,
    experiment_baselines,
    finished_experiments,
    load_study,
    match_run,
    parse_study,
    pending,
    read_table,
    rows_from_experiments,
    rows_from_metrics,
    run_name,
)

REPO = Path(__file__).resolve().parents[1]
# `dvc exp show --json --all-commits` of DVC 3.67 on a two-variant repo shaped like ours (deps
# and outs dropped): experiments a-k4, b-k8 (target evaluate@b), bad and waiting succeeded,
# bad2 failed, queued1 is queued.
EXP_SHOW = Path(__file__).parent / "data" / "dvc_exp_show.json"

SMALL = {
    "name": "small",
    "seeds": [0, 1],
    "seed_params": {"*": ["train.seed"], "sampled": ["variant_params.sampled.seed"]},
    "base": {"k": 32, "sae.d_sae": 64},
    "variant_base": {"sampled": {"variant_params.sampled.l": 4}},
    "groups": [
        {"name": "k", "variants": ["topk", "sampled"], "axes": {"k": [8, 32]}},
        {"name": "d", "variants": ["topk"], "axes": {"sae.d_sae": [32, 64]}},
        {
            "name": "pts",
            "variants": ["switch"],
            "points": [
                {"variant_params.switch.n_experts": 2, "sae.d_sae": 128},
                {"variant_params.switch.n_experts": 4, "sae.d_sae": 256},
            ],
        },
    ],
}


def _study(tmp_path: Path, raw: dict = SMALL) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    return load_study(tmp_path)


def test_expand_counts_dedups_and_seeds(tmp_path) -> None:
    """k: 2 variants x 2 k x 2 seeds = 8; d: 1 x 2 x 2 = 4, of which d_sae 64 (k 32) is k's
    run too; pts: 2 points x 2 seeds = 4: 14 distinct runs. A shared run lists both groups;
    every run trains one variant; sampled's pool seed is the training seed."""
    runs = expand(_study(tmp_path))
    assert len(runs) == 14
    assert len({r.name for r in runs}) == 14
    shared = next(r for r in runs if r.name == "topk-k32-d64-s1")
    assert shared.groups == ("k", "d")
    assert shared.overrides == {"k": 32, "sae.d_sae": 64, "train.seed": 1, "variants": ["topk"]}
    sampled = next(
        r for r in runs if r.variant == "sampled" and r.seed == 1 and r.overrides["k"] == 8
    )
    assert sampled.overrides["variant_params.sampled.seed"] == 1
    assert sampled.overrides["variant_params.sampled.l"] == 4
    assert sampled.name == "sampled-k8-d64-s1-l4"  # the copied seed key is not in the name
    switch = [r for r in runs if r.variant == "switch"]
    shapes = {
        (r.overrides["sae.d_sae"], r.overrides["variant_params.switch.n_experts"]) for r in switch
    }
    assert shapes == {(128, 2), (256, 4)}


def test_run_name_is_from_overrides_only() -> None:
    """Sorted keys, aliases, dots in values as p, variants left out; the order given is moot."""
    a = run_name("sampled", {"variant_params.sampled.score": "squared_l2", "k": 16,
                             "train.lr": 0.0003, "variants": ["sampled"]})  # fmt: skip
    b = run_name(
        "sampled", {"train.lr": 0.0003, "k": 16, "variant_params.sampled.score": "squared_l2"}
    )
    assert a == b == "sampled-k16-train_lr0p0003-squared_l2"


def test_main_study_grid() -> None:
    """reports/main/study.yaml: 2 x 3 x 3 (k sweep) + 3 (JumpReLU) + 2 x 3 (4x tokens) + 3 x 3
    (width-matched E) + 4 x 3 (Sampled l) + 2 x 3 (FLOP-matched) + 2 x 2 x 3 (new dictionary
    sizes) + 2 x 3 (JumpReLU k = 16, 64) + 2 x 3 (Sampled squared_l2, entropy) + 2 x 3 (Switch
    k = 16, 64) = 84 runs, every one on the same 128 eval contexts."""
    runs = expand(load_study(REPO / "reports" / "main"))
    assert len(runs) == 84
    flop = [r for r in runs if "switch_flop" in r.groups]
    shapes = {
        (r.overrides["variant_params.switch.n_experts"], r.overrides["sae.d_sae"]) for r in flop
    }
    assert shapes == {(2, 9216), (4, 18432)}
    assert all(r.overrides["variants"] == [r.variant] for r in runs)
    assert {r.overrides["evaluate.n_ctx"] for r in runs} == {128}
    assert [r.groups[0] for r in runs][:18] == ["k_sweep"] * 18  # queued first
    assert {r.overrides["model.dtype"] for r in runs} == {"float32"}  # pinned: runs.csv's LM
    assert not any("dtype" in r.name for r in runs)


def test_pinned_params_are_set_but_stay_out_of_the_names(tmp_path) -> None:
    """A pinned key is in every run's overrides and in no name while a run keeps its pinned
    value (the names of a study's committed runs survive a pin); a group that sets it to
    another value names it."""
    raw = copy.deepcopy(SMALL)
    before = {r.name for r in expand(_study(tmp_path / "a", raw))}
    raw["pinned"] = {"model.dtype": "float32"}
    raw["groups"].append({"name": "lm", "variants": ["topk"], "base": {"model.dtype": "auto"}})
    runs = expand(_study(tmp_path / "b", raw))
    assert all(r.overrides["model.dtype"] in ("float32", "auto") for r in runs)
    pinned = {r.name for r in runs if r.overrides["model.dtype"] == "float32"}
    assert pinned == before
    assert {r.name for r in runs} - pinned == {"topk-k32-model_dtypeauto-d64-s0",
                                               "topk-k32-model_dtypeauto-d64-s1"}  # fmt: skip


def test_experiment_baselines_from_git_refs(tmp_path: Path) -> None:
    """Baselines come from DVC 3's ``refs/exps/<sha[:2]>/<sha[2:]>/<name>`` refs, once each;
    the queue's and executors' refs are not experiments."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    head = git("rev-parse", "HEAD")
    for ref in (f"refs/exps/{head[:2]}/{head[2:]}/a-k4", f"refs/exps/{head[:2]}/{head[2:]}/b",
                "refs/exps/celery/stash", "refs/exps/exec/EXEC_BASELINE"):  # fmt: skip
        git("update-ref", ref, head)
    assert experiment_baselines(tmp_path) == [head]
    assert experiment_baselines(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("seeds"), "study: missing key seeds"),
        (lambda s: s["groups"][0].update(variants=["gated"]), "study: groups[0].variants must be"),
        (lambda s: s["groups"][1]["axes"].update({"k": []}), "study: groups[1].axes.k must be"),
        (lambda s: s.update(seed_params={"topk": ["train.seed"]}), 'must be a mapping with a "*"'),
        (lambda s: s["groups"][0].update(axis={"k": [1]}), "study: groups[0].axis must be absent"),
    ],
)
def test_bad_study_is_one_clear_error(tmp_path, edit, message) -> None:
    raw = copy.deepcopy(SMALL)
    edit(raw)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("*", r"\*")):
        parse_study(raw, tmp_path)


def test_exp_run_args_and_pending(tmp_path) -> None:
    """The dvc exp run line of a run (Hydra override values; --targets: evaluate@<variant>);
    runs already in the table are not planned again."""
    study = _study(tmp_path)
    run = next(r for r in expand(study) if r.name == "sampled-k8-d64-s0-l4")
    assert exp_run_args(run) == [
        "dvc", "exp", "run", "--queue", "--name", "sampled-k8-d64-s0-l4",
        "-S", "k=8", "-S", "sae.d_sae=64", "-S", "train.seed=0",
        "-S", "variant_params.sampled.l=4", "-S", "variant_params.sampled.seed=0",
        "-S", "variants=[sampled]",
    ]  # fmt: skip
    assert exp_run_args(run, targets=True)[6] == "evaluate@sampled"
    assert len(pending(study, [run.name])) == 13
    assert [r.name for r in pending(study, [], group="pts")] == [
        "switch-k32-d128-s0-E2", "switch-k32-d128-s1-E2",
        "switch-k32-d256-s0-E4", "switch-k32-d256-s1-E4",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="--group must be one of k, d, pts"):
        pending(study, [], group="nope")


def test_finished_experiments_of_real_exp_show() -> None:
    """The DVC 3 format: successful named experiments with their baseline commit, params and
    metrics; the failed (bad2) and the queued (queued1) one left out."""
    shown = json.loads(EXP_SHOW.read_text())
    found = {f.name: f for f in finished_experiments(shown)}
    assert set(found) == {"a-k4", "b-k8", "bad", "waiting"}
    a = found["a-k4"]
    assert a.params["k"] == 4 and a.params["variants"] == ["a"]
    assert a.metrics["metrics/a.json"]["fvu"] == 0.25
    assert a.baseline == "285f91c8602a8d35d0d5fb4e3c4e07e134a8f9f9"
    assert "metrics/a.json" not in found["b-k8"].metrics  # only variant b ran
    assert finished_experiments({"not": "a list"}) == []
    assert finished_experiments([{"rev": "x", "experiments": [None, {"revs": [7]}]}]) == []


def _params(**over) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in over.items():
        node = params
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return params


def _exp_show(study, names: list[str]) -> list[dict]:
    """A `dvc exp show --json` in the real format (EXP_SHOW) holding the study runs `names`,
    each with params.yaml = defaults + its overrides and a metrics file for its variant."""
    shown = json.loads(EXP_SHOW.read_text())
    baseline = copy.deepcopy(shown[1])
    template = baseline["experiments"][0]
    runs = {r.name: r for r in expand(study)}
    baseline["experiments"] = []
    for name in names:
        run = runs[name]
        params = _params()
        for key, value in run.overrides.items():
            node = params
            *parents, last = key.split(".")
            for p in parents:
                node = node[p]
            node[last] = value
        k = run.overrides["k"]
        metrics = {"variant": run.variant, "k": k, "fvu": 0.3 + run.seed / 100, "l0": float(k),
                   "train_seconds": 60.0, "hist": [1, 2]}  # fmt: skip
        exp = copy.deepcopy(template)
        exp["name"] = exp["revs"][0]["name"] = name
        exp["revs"][0]["data"]["params"] = {"params.yaml": {"data": params}}
        exp["revs"][0]["data"]["metrics"] = {f"metrics/{run.variant}.json": {"data": metrics}}
        baseline["experiments"].append(exp)
    return [shown[0], baseline]


def test_collect_from_exp_show_is_idempotent(tmp_path) -> None:
    """Two runs collected: one row each with identity, param: and metric columns (arrays
    dropped); collecting the same experiments again adds nothing and leaves the file
    byte-identical; a third experiment is appended; an experiment whose params do not match
    its name's run is skipped."""
    study = _study(tmp_path)
    names = ["topk-k8-d64-s0", "sampled-k32-d64-s1-l4"]
    rows = rows_from_experiments(study, finished_experiments(_exp_show(study, names)))
    assert collect_rows(study, rows) == 2
    first = study.runs_path.read_text()
    table = {r["run"]: r for r in read_table(study.runs_path)}
    s = table["sampled-k32-d64-s1-l4"]
    assert (s["variant"], s["seed"], s["k"], s["d_sae"], s["l"], s["groups"]) == (
        "sampled", "1", "32", "64", "4", "k"
    )  # fmt: skip
    assert s["param:variant_params.sampled.seed"] == "1" and s["fvu"] == "0.31"
    assert s["source"] == "dvc-exp:sampled-k32-d64-s1-l4" and s["cpu_capability"]
    assert "hist" not in s and table["topk-k8-d64-s0"]["l"] == ""

    rows = rows_from_experiments(study, finished_experiments(_exp_show(study, names)))
    assert collect_rows(study, rows) == 0
    assert study.runs_path.read_text() == first
    more = _exp_show(study, [*names, "topk-k32-d32-s0"])
    more[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["k"] = 9
    rows = rows_from_experiments(study, finished_experiments(more))
    assert [r["run"] for r in rows] == ["sampled-k32-d64-s1-l4", "topk-k32-d32-s0"]
    assert collect_rows(study, rows) == 1
    assert len(read_table(study.runs_path)) == 3


def test_match_run_prefers_the_most_specific_run(tmp_path) -> None:
    """Group d2 adds train.lr to a run of group k: params with that lr are the d2 run, params
    without it the k run; an experiment named as the d2 run is collected as it."""
    raw = copy.deepcopy(SMALL)
    raw["groups"].append({"name": "d2", "variants": ["topk"], "base": {"train.lr": 0.001}})
    study = _study(tmp_path, raw)
    params = _params(k=32, sae__d_sae=64)
    assert match_run(study, "topk", params).name == "topk-k32-d64-s0"
    params["train"]["lr"] = 0.001
    assert match_run(study, "topk", params).name == "topk-k32-d64-train_lr0p001-s0"
    shown = _exp_show(study, ["topk-k32-d64-train_lr0p001-s0"])
    (row,) = rows_from_experiments(study, finished_experiments(shown))
    assert row["run"] == "topk-k32-d64-train_lr0p001-s0" and row["groups"] == "d2"


def test_collect_from_metrics_dir(tmp_path) -> None:
    """The workspace's metrics/<variant>.json under params.yaml fill the study's matching run;
    a variant whose params are no run of the study, or whose metrics' k disagrees, is skipped."""
    study = _study(tmp_path / "study")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    for v, k in (("topk", 32), ("relu", 32), ("sampled", 16)):
        (metrics / f"{v}.json").write_text(json.dumps({"variant": v, "k": k, "fvu": 0.5}))
    params = _params(k=32, sae__d_sae=64, variants=["topk", "relu", "sampled"])
    params["variant_params"]["sampled"]["l"] = 4
    rows = rows_from_metrics(study, metrics, params, lambda path: "abc123")
    assert [(r["run"], r["saelab_commit"], r["fvu"]) for r in rows] == [
        ("topk-k32-d64-s0", "abc123", 0.5)
    ]


def test_cli_plan_and_collect(tmp_path, capsys, monkeypatch) -> None:
    """`saelab study plan` prints one quoted line per pending run; `saelab study collect
    --exp-json` fills the table, after which plan leaves those runs out; a bad study file
    exits 2 with one line. By default a run reproduces only ``evaluate@<variant>`` (a queued run
    of the whole pipeline would also build probe_data, structure and features pages);
    ``--all-stages`` queues the whole pipeline of its one variant."""
    study = _study(tmp_path)
    main(["study", "plan", "--study", str(tmp_path), "--group", "pts", "--all-stages"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].endswith("-S 'variants=[switch]'")
    assert "evaluate@" not in lines[0]
    main(["study", "plan", "--study", str(tmp_path), "--group", "pts"])
    targeted = capsys.readouterr().out.splitlines()
    assert [line.split()[6] for line in targeted] == ["evaluate@switch"] * 4
    shown = tmp_path / "shown.json"
    shown.write_text(json.dumps(_exp_show(study, ["switch-k32-d128-s0-E2"])))
    main(["study", "collect", "--study", str(tmp_path), "--exp-json", str(shown), "--no-curves"])
    main(["study", "plan", "--study", str(tmp_path), "--group", "pts"])
    assert len(capsys.readouterr().out.splitlines()) == 3
    (tmp_path / "study.yaml").write_text("name: x\n")
    with pytest.raises(SystemExit) as exc:
        main(["study", "plan", "--study", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == "saelab: error: study: missing key seeds"


def test_learning_curves_from_mlflow(tmp_path) -> None:
    """The nested run tagged with a run's name and variant gives one curve row per logged step
    (tokens = step x batch), not a later run of an extra hookpoint with the same tags; a run
    without an MLflow run has no curve; collecting twice adds the runs' curves once."""
    from saelab.tracking import HOOKPOINT_TAG, mlflow_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"variant": "topk", "dvc_exp_name": "topk-k8-d64-s0"}
    with mlflow_run("saelab", uri, "topk", tags) as tracker:
        for step, fvu in ((4, 0.9), (8, 0.5)):
            tracker.log_metrics({"train/fvu": fvu, "train/l0": 8.0, "train/lr": 1e-4}, step=step)
    with mlflow_run("saelab", uri, "topk", {**tags, "dvc_exp_name": "other"}) as tracker:
        tracker.log_metrics({"train/fvu": 0.1}, step=4)
    extra = {**tags, HOOKPOINT_TAG: "blocks.3.hook_resid_pre"}  # model.extra_hookpoints' run
    with mlflow_run("saelab", uri, "topk blocks.3.hook_resid_pre", extra) as tracker:
        tracker.log_metrics({"train/fvu": 0.2}, step=4)
    rows = [
        {"run": "topk-k8-d64-s0", "variant": "topk"},
        {"run": "topk-k8-d64-s1", "variant": "topk"},
    ]
    curves = curves_from_mlflow(uri, "saelab", rows, batch_size=16)
    assert curves == [
        {"run": "topk-k8-d64-s0", "step": 4, "tokens": 64, "train_fvu": 0.9, "train_l0": 8.0},
        {"run": "topk-k8-d64-s0", "step": 8, "tokens": 128, "train_fvu": 0.5, "train_l0": 8.0},
    ]
    assert curves_from_mlflow(uri, "absent", rows, 16) == []
    study = _study(tmp_path / "s")
    assert collect_curves(study, curves) == 1
    assert collect_curves(study, curves) == 0
    table = read_table(study.curves_path)
    assert [(r["step"], r["tokens"], r["train_fvu"]) for r in table] == [
        ("4", "64", "0.9"),
        ("8", "128", "0.5"),
    ]


@pytest.mark.slow
def test_plan_lines_are_accepted_by_dvc(tmp_path) -> None:
    """Queued with the project's dvc.yaml and params.yaml (DVC 3, nothing run): each planned
    run's `-S` overrides (Hydra's grammar: lists, strings, dotted keys) give params in which
    match_run finds exactly that run, and its variants list is the one variant."""
    import os
    import shutil
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t.invalid", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t.invalid")  # fmt: skip
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, repo / name)

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "project")
    study = load_study(REPO / "reports" / "main")
    runs = [
        next(r for r in expand(study) if "switch_flop" in r.groups and r.seed == 1),
        next(r for r in expand(study) if r.name == "sampled-c128-k32-d4608-t917504-s2-l4-l2"),
    ]
    for r in runs:
        run(*exp_run_args(r))
    shown = json.loads(run("dvc", "exp", "show", "--json"))
    queued = {
        exp["name"]: exp["revs"][0]["data"]["params"]["params.yaml"]["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
        if (exp.get("executor") or {}).get("state") == "queued"
    }
    assert set(queued) == {r.name for r in runs}
    for r in runs:
        params = queued[r.name]
        assert params["variants"] == [r.variant]
        assert match_run(study, r.variant, params) == r
