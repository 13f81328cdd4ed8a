"""summarize.py: the comparison table and plot rows from per-variant metrics, PNG rendering, and
the dvc.yaml plots rendering those rows in a small DVC repo (no pipeline run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from saelab.summarize import PLOT_FILES, comparison, render_pngs
from saelab.tracking import write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def _inputs() -> tuple[list[dict], list[dict]]:
    """Two variants' metrics (batchtopk with l0_batch_mode) and tiny histograms."""
    metrics = [
        {"variant": "topk", "k": 8, "l0": 8.0, "fvu": 0.3, "delta_ce": 0.4, "mse": 1.0},
        {"variant": "batchtopk", "k": 8, "l0": 7.5, "l0_batch_mode": 8.0, "fvu": 0.32,
         "delta_ce": 0.5},
    ]  # fmt: skip
    hists = [
        {"variant": v, "l0_hist": [{"l0": 7, "tokens": 0.5}, {"l0": 8, "tokens": 0.5}],
         "density_hist": [{"log10_density": -1.125, "latents": 3}]}
        for v in ("topk", "batchtopk")
    ]  # fmt: skip
    return metrics, hists


def test_comparison_rows_one_per_variant_with_summary_keys() -> None:
    """summary maps each variant to its summary keys (mse is not one; l0_batch_mode only where
    present); pareto has one row per variant with the keys all rows share (DVC needs uniform
    rows); histogram rows are tagged with their variant."""
    data = comparison(*_inputs())
    assert data["summary"] == {
        "topk": {"k": 8, "l0": 8.0, "fvu": 0.3, "delta_ce": 0.4},
        "batchtopk": {"k": 8, "l0": 7.5, "l0_batch_mode": 8.0, "fvu": 0.32, "delta_ce": 0.5},
    }
    assert [r["variant"] for r in data["pareto.json"]] == ["topk", "batchtopk"]
    assert all("l0_batch_mode" not in r for r in data["pareto.json"])  # not in every row
    assert data["l0_hist.json"][2] == {"variant": "batchtopk", "l0": 7, "tokens": 0.5}
    assert len(data["density_hist.json"]) == 2


def test_render_pngs_writes_four_images(tmp_path: Path) -> None:
    """Both Pareto fronts and both histograms become non-empty PNG files."""
    paths = render_pngs(comparison(*_inputs()), tmp_path)
    assert sorted(p.name for p in paths) == [
        "density_hist.png", "l0_hist.png", "pareto_l0_delta_ce.png", "pareto_l0_fvu.png",
    ]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_dvc_plots_show_renders_the_declared_plots(tmp_path: Path) -> None:
    """dvc.yaml's top-level plots, over summarize's rows in a fresh DVC repo, render as four
    vega plots whose data rows carry variant and rev and whose colour encodes the variant;
    `dvc plots show -o` writes an HTML page."""
    dvc = Path(sys.executable).parent / "dvc"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    full = yaml.safe_load((REPO / "dvc.yaml").read_text())
    # the pipeline's plots; the study_* plots read the report stage's reports/main/fronts/
    # (tests/test_plots_html.py renders them)
    pipeline = [p for p in full["plots"] if not next(iter(p)).startswith("study_")]
    assert len(pipeline) == len(full["plots"]) - 5
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": pipeline}))
    shutil.copytree(REPO / "plots" / "templates", tmp_path / "plots" / "templates")
    data = comparison(*_inputs())
    for name in PLOT_FILES:
        write_json_atomic(tmp_path / "plots" / name, data[name])
    run = dict(cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=300)
    subprocess.run(["git", "init", "-q"], **run)
    subprocess.run([str(dvc), "init", "-q"], **run)
    shown = json.loads(subprocess.run([str(dvc), "plots", "show", "--json"], **run).stdout)
    plots = shown["data"]
    assert sorted(plots) == ["density_hist", "l0_hist", "pareto_l0_delta_ce", "pareto_l0_fvu"]
    spec = plots["pareto_l0_fvu"][0]["content"]
    assert spec["encoding"]["color"]["field"] == "variant"
    values = spec["data"]["values"]
    assert {(r["variant"], r["l0"], r["fvu"], r["rev"]) for r in values} == {
        ("topk", 8.0, 0.3, "workspace"),
        ("batchtopk", 7.5, 0.32, "workspace"),
    }
    subprocess.run([str(dvc), "plots", "show", "-o", "html"], **run)
    assert (tmp_path / "html" / "index.html").stat().st_size > 0


@pytest.mark.parametrize("name", PLOT_FILES)
def test_plot_files_are_summarize_outputs(name: str) -> None:
    """Every plot data file the dvc.yaml plots read is an output of the summarize stage."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["summarize"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert f"plots/{name}" in outs


def _sums(ce_spliced, sq_err, rng) -> dict:
    """Per-context sums of 50 contexts of 10 predictions / tokens each, shared clean CE and
    activations, given spliced CE and squared errors per context."""
    n = len(ce_spliced)
    return {
        "ce_clean": np.full(n, 30.0), "ce_spliced": ce_spliced, "kl_div": ce_spliced - 30.0,
        "n_pred": np.full(n, 10.0), "sq_err": sq_err, "sq_norm": np.full(n, 100.0),
        "n_tok": np.full(n, 10.0), "x_sum": rng.normal(size=(n, 3)),
    }  # fmt: skip


def test_paired_differences_known_answers() -> None:
    """b's spliced CE is a's + 0.2 per prediction on every context (2 per context of 10) while
    contexts vary a lot: the paired ΔCE difference a − b is −0.2 with a zero-width interval; FVU
    differs by a's and b's squared errors only (same x), so its difference is exact too."""
    from saelab.summarize import paired_differences

    rng = np.random.default_rng(0)
    ce = rng.normal(40.0, 5.0, 50)
    err = rng.uniform(1.0, 5.0, 50)
    a, b = _sums(ce, err, rng), _sums(ce + 2.0, err * 2, rng)
    b["x_sum"] = a["x_sum"]
    out = paired_differences({"a": a, "b": b}, n_resamples=200, seed=0)
    row = out["a-b"]
    assert row["delta_ce_diff"] == pytest.approx(-0.2)
    assert row["delta_ce_diff_ci_low"] == pytest.approx(-0.2)
    assert row["delta_ce_diff_ci_high"] == pytest.approx(-0.2)
    assert row["fvu_diff"] < 0 and row["fvu_diff_ci_high"] < 0  # b's errors are twice a's
    with pytest.raises(ValueError, match="different contexts"):
        paired_differences({"a": a, "c": _sums(ce[:10], err[:10], rng)}, 200, 0)


def test_error_bars_of_an_interval_that_excludes_its_point_are_not_negative() -> None:
    """A percentile interval above its point estimate (possible for a ratio on few contexts)
    draws a zero lower bar instead of a negative one, which matplotlib refuses."""
    from saelab.summarize import _yerr

    rows = [{"fvu": 0.30, "fvu_ci_low": 0.31, "fvu_ci_high": 0.35},
            {"fvu": 0.40, "fvu_ci_low": 0.38, "fvu_ci_high": 0.41}]  # fmt: skip
    assert _yerr(rows, "fvu") == pytest.approx(np.array([[0.0, 0.02], [0.05, 0.01]]))
    assert _yerr([{"fvu": 0.3}], "fvu") is None
