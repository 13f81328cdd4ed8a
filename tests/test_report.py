"""saelab.report: the verdict rules on hand-made runs tables with known answers, and the report
rendered from a synthetic runs table of reports/main's grid."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from saelab.cli import main
from saelab.config import ConfigError
from saelab.report import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_RUN,
    Interval,
    claims_table,
    derived_columns,
    equivalence_verdict,
    evaluate_claim,
    plot_specs,
    select,
    sign_verdict,
    t_interval,
)
from saelab.study import expand, load_study, write_table

REPO = Path(__file__).resolve().parents[1]


def test_t_interval_known_answer() -> None:
    """[1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.302653; half-width 4.302653 / sqrt(3)."""
    iv = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.low == pytest.approx(2 - half, rel=1e-9) and iv.high == pytest.approx(2 + half)
    assert t_interval([5.0]) == Interval(5.0, 5.0, 5.0, 1)
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)


@pytest.mark.parametrize(
    ("iv", "expect_negative", "verdict"),
    [
        (Interval(-2, -3, -1, 3), True, HOLDS),
        (Interval(-2, -3, -1, 3), False, FAILS),
        (Interval(2, 1, 3, 3), False, HOLDS),
        (Interval(2, 1, 3, 3), True, FAILS),
        (Interval(0.5, -1, 2, 3), True, INCONCLUSIVE),
        (Interval(-2, -3, -1, 2), True, INCONCLUSIVE),  # n < 3
        (Interval(math.nan, math.nan, math.nan, 0), True, NOT_RUN),
    ],
)
def test_sign_verdict(iv, expect_negative, verdict) -> None:
    assert sign_verdict(iv, expect_negative) == verdict


def test_equivalence_verdict() -> None:
    assert equivalence_verdict(Interval(0, -0.04, 0.04, 3), 0.05) == HOLDS
    assert equivalence_verdict(Interval(0.1, 0.06, 0.14, 3), 0.05) == FAILS
    assert equivalence_verdict(Interval(-0.1, -0.14, -0.06, 3), 0.05) == FAILS
    assert equivalence_verdict(Interval(0.05, 0.0, 0.1, 3), 0.05) == INCONCLUSIVE
    assert equivalence_verdict(Interval(0, -0.01, 0.01, 2), 0.05) == INCONCLUSIVE


def _rows(values: dict[tuple[str, int], list[float]], metric: str = "nmse") -> list[dict]:
    """Runs-table rows (strings, as read from CSV): one per (variant, k) and seed."""
    return [
        {
            "run": f"{v}-k{k}-s{s}",
            "variant": v,
            "k": str(k),
            "seed": str(s),
            metric: repr(x),
            "groups": "k_sweep",
            "train.n_tokens": "917504",
        }  # fmt: skip
        for (v, k), xs in values.items()
        for s, x in enumerate(xs)
    ]


CLAIM = {
    "claim": "a lower NMSE than b", "paper": "fig. 1", "kind": "paired", "metric": "nmse",
    "expect": "lower", "a": {"variant": "a"}, "b": {"variant": "b"}, "pair_on": ["k"],
    "where": {"groups": "k_sweep"},
    "cases": [{"label": f"k = {k}", "where": {"k": k}} for k in (16, 32, 64, 128)],
}  # fmt: skip


def test_paired_claim_each_verdict() -> None:
    """k 16: a below b on every seed by 0.1, 0.12, 0.08 -> holds (interval of the mean
    difference -0.1 ± 4.303 * 0.02 / sqrt(3)); k 32: a above b -> does not hold; k 64: the
    differences change sign -> inconclusive; k 128: only b ran -> not run. Seeds pair by
    seed: the seed-0 rows of a and b, and so on."""
    rows = _rows({
        ("a", 16): [0.4, 0.38, 0.42], ("b", 16): [0.5, 0.5, 0.5],
        ("a", 32): [0.6, 0.61, 0.62], ("b", 32): [0.5, 0.5, 0.5],
        ("a", 64): [0.45, 0.55, 0.5], ("b", 64): [0.5, 0.5, 0.51],
        ("b", 128): [0.5, 0.5, 0.5],
    })  # fmt: skip
    out = evaluate_claim(CLAIM, rows)
    assert [r.verdict for r in out] == [HOLDS, FAILS, INCONCLUSIVE, NOT_RUN]
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert out[0].measurement == (
        f"nmse: {-0.1:+.4g} [{-0.1 - half:+.4g}, {-0.1 + half:+.4g}] (n=3)"
    )
    assert out[0].claim == "a lower NMSE than b: k = 16" and out[0].paper == "fig. 1"
    assert "0.92M tokens" in out[0].ours
    assert out[3].measurement == "nmse: —"


def test_paired_claim_with_two_seeds_is_inconclusive_and_says_n() -> None:
    rows = _rows({("a", 16): [0.4, 0.38], ("b", 16): [0.5, 0.5, 0.5]})
    (row,) = evaluate_claim({**CLAIM, "cases": [{"where": {"k": 16}}]}, rows)
    assert row.verdict == "inconclusive (n=2 < 3)" and "(n=2)" in row.measurement


def test_relative_paired_claim() -> None:
    """relative: a / b - 1 per seed: 1.1/1 - 1, 2.2/2 - 1, 3.3/3 - 1 = +10% each (interval of
    width 0)."""
    rows = _rows({("a", 32): [1.1, 2.2, 3.3], ("b", 32): [1.0, 2.0, 3.0]}, "mse")
    claim = {**CLAIM, "metric": "mse", "expect": "higher", "relative": True, "cases": None}
    (row,) = evaluate_claim(claim, rows)
    assert row.verdict == HOLDS
    assert row.measurement == "mse: +10.0% [+10.0%, +10.0%] (n=3)"


def test_threshold_and_trend_claims() -> None:
    """threshold: mean l0_max over seeds (90, 95, 100) against 80 -> holds, against 120 ->
    does not hold. trend: fvu = 1 - 0.1 log2(l) (+ a seed offset) -> slope -0.1 on every seed:
    decreasing holds, increasing does not."""
    rows = [{"variant": "b", "seed": str(s), "l0_max": str(x)} for s, x in enumerate([90, 95, 100])]
    base = {"claim": "c", "paper": "p", "kind": "threshold", "metric": "l0_max", "value": 80}
    assert evaluate_claim({**base, "expect": "above"}, rows)[0].verdict == HOLDS
    assert evaluate_claim({**base, "expect": "above", "value": 120}, rows)[0].verdict == FAILS
    assert evaluate_claim({**base, "expect": "below", "value": 120}, rows)[0].verdict == HOLDS
    rows = [
        {"variant": "s", "seed": str(s), "l": str(l), "fvu": str(1 - 0.1 * math.log2(l) + s / 50)}
        for s in range(3)
        for l in (1, 4, 16, 64)  # noqa: E741
    ]
    trend = {"claim": "c", "paper": "p", "kind": "trend", "metric": "fvu", "x": "l", "log_x": True}
    (row,) = evaluate_claim({**trend, "expect": "decreasing"}, rows)
    assert row.verdict == HOLDS and row.measurement.startswith("fvu: -0.1 [-0.1, -0.1]")
    assert evaluate_claim({**trend, "expect": "increasing"}, rows)[0].verdict == FAILS


def test_equivalent_claim_and_bad_claims() -> None:
    rows = _rows({("a", 32): [1.01, 1.99, 3.0], ("b", 32): [1.0, 2.0, 3.0]})
    claim = {**CLAIM, "kind": "equivalent", "expect": "comparable", "margin": 0.05,
             "relative": True, "cases": None}  # fmt: skip
    assert evaluate_claim(claim, rows)[0].verdict == HOLDS
    with pytest.raises(ConfigError, match=r"study: claims\[0\]\.margin must be a number"):
        claims_table([{**claim, "margin": None}], rows)
    with pytest.raises(ConfigError, match=r"study: claims\[1\]\.expect must be one of lower"):
        claims_table([CLAIM, {**CLAIM, "expect": "smaller"}], rows)


def test_select_and_derived_columns() -> None:
    """Numbers compare as numbers, groups by membership; Switch's encoder FLOPs per token are
    2 d_in d_sae / E + 2 d_in E; seconds per step = train_seconds / train_steps."""
    rows = [{"k": "32", "groups": "k_sweep;dict_size"}, {"k": "32.0", "groups": "dict_size"}]
    assert len(select(rows, {"k": 32, "groups": "dict_size"})) == 2
    assert len(select(rows, {"groups": "k_sweep"})) == 1
    assert len(select(rows, {"k": [16, 32]})) == 2
    assert len(select(rows, {"groups": ["k_sweep", "length"]})) == 1  # a list: any of the groups
    assert len(select(rows, {"groups": ["length"]})) == 0
    row = {"variant": "switch", "d_sae": "4608", "n_experts": "8", "train_seconds": "10",
           "train_steps": "4"}  # fmt: skip
    d = derived_columns(row)
    assert d["encoder_flops_per_token"] == 2 * 576 * 576 + 2 * 576 * 8
    assert d["seconds_per_step"] == 2.5
    assert derived_columns({"variant": "topk", "d_sae": "4608"})["encoder_flops_per_token"] == (
        2 * 576 * 4608
    )


def test_pareto_lines_or_one_line_per_variant_of_a_group() -> None:
    """``pareto_lines`` draws the fronts' lines as given (``by`` k unless set); without it,
    ``pareto_group`` gives one line per variant of that group."""
    by_group = plot_specs({"pareto_group": "k_sweep"}, ["topk", "relu"])
    assert [s.file for s in by_group] == ["pareto_l0_fvu.png", "pareto_l0_delta_ce.png"]
    assert [(ln.label, ln.where, ln.by) for ln in by_group[0].lines] == [
        ("topk", {"groups": "k_sweep", "variant": "topk"}, "k"),
        ("relu", {"groups": "k_sweep", "variant": "relu"}, "k"),
    ]
    given = [
        {"label": "j", "where": {"groups": ["a", "b"]}},
        {"label": "s", "where": {}, "by": "l"},
    ]
    specs = plot_specs({"pareto_group": "k_sweep", "pareto_lines": given}, ["topk"])
    assert [(ln.label, ln.by) for ln in specs[1].lines] == [("j", "k"), ("s", "l")]
    assert specs[1].y == "delta_ce" and plot_specs({}, ["topk"]) == []


def _synthetic_runs(study) -> list[dict]:
    """One row per run of the study, metrics made up so that BatchTopK's NMSE is 5% below
    TopK's on every seed and size."""
    rows = []
    for r in expand(study):
        o = r.overrides
        k, d_sae = o["k"], o["sae.d_sae"]
        nmse = (
            0.2
            * (32 / k) ** 0.3
            * (4608 / d_sae) ** 0.1
            * (0.95 if r.variant == "batchtopk" else 1)
        )
        nmse *= 1 + 0.01 * r.seed
        rows.append({
            "run": r.name, "groups": ";".join(r.groups), "variant": r.variant, "seed": r.seed,
            "k": k, "d_sae": d_sae, "n_experts": o.get("variant_params.switch.n_experts"),
            "l": o.get("variant_params.sampled.l"), "score": o.get("variant_params.sampled.score"),
            "train.n_tokens": o["train.n_tokens"], "cpu_capability": "AVX2",
            "cpu_model": "AMD EPYC",
            "nmse": nmse, "fvu": 2 * nmse, "mse": 10 * nmse, "delta_ce": 2 * nmse, "l0": float(k),
            "l0_p99": 2.5 * k, "l0_max": 3.0 * k + r.seed, "train_seconds": 60 + r.seed,
            "train_steps": 224, "fvu_ci_low": 2 * nmse - 0.01, "fvu_ci_high": 2 * nmse + 0.01,
        })  # fmt: skip
    return rows


def _claim_lines(text: str) -> list[str]:
    """The body rows of the claims table of a report."""
    section = text.split("## Claims")[1].split("## Plots")[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def test_report_renders_from_a_runs_table(tmp_path) -> None:
    """`saelab report` on reports/main's study.yaml and a synthetic runs table: report.md with
    the setting, every claim row (BatchTopK's NMSE claims hold), the runs with their own FVU
    intervals, and the PNGs it links; the learning curves are skipped without curves.csv."""
    study_dir = tmp_path / "reports" / "main"
    study_dir.mkdir(parents=True)
    shutil.copy(REPO / "reports" / "main" / "study.yaml", study_dir)
    study = load_study(study_dir)
    write_table(study.runs_path, _synthetic_runs(study), ["run"])
    main(["report", "--study", str(study_dir), "--params", str(REPO / "params.yaml")])
    text = (study_dir / "report.md").read_text()
    assert "hookpoint `blocks.15.hook_resid_pre`" in text and "917,504" in text
    assert "runs in the table: 84 of the 84" in text and "AMD EPYC (torch capability AVX2)" in text
    n_claim_rows = sum(len(c.get("cases") or [{}]) for c in yaml.safe_load(
        (study_dir / "study.yaml").read_text())["claims"])  # fmt: skip
    claim_lines = _claim_lines(text)
    assert len(claim_lines) == n_claim_rows
    nmse_k = [
        line for line in claim_lines if line.startswith("| BatchTopK lower NMSE than TopK: k")
    ]
    assert len(nmse_k) == 4 and all(line.endswith("| holds |") for line in nmse_k)
    assert "No learning-curve data" in text
    pngs = sorted(p.name for p in (study_dir / "png").iterdir())
    assert pngs == sorted([
        "pareto_l0_fvu.png", "pareto_l0_delta_ce.png", "switch_flops_fvu.png",
        "switch_wallclock_fvu.png", "dict_size_nmse.png", "sampled_l_fvu.png",
    ])  # fmt: skip
    for name in pngs:
        assert f"(png/{name})" in text
        assert (study_dir / "png" / name).read_bytes()[:4] == b"\x89PNG"
    topk = next(r for r in _synthetic_runs(study) if r["run"] == "topk-c128-k32-d4608-t917504-s0")
    assert f"{topk['fvu']:.4g} [{topk['fvu_ci_low']:.4g}, {topk['fvu_ci_high']:.4g}]" in text
    fronts = sorted(p.name for p in (study_dir / "fronts").iterdir())
    assert fronts == sorted(n.replace(".png", ".json") for n in pngs)  # DVC plot data per PNG
    points = json.loads((study_dir / "fronts" / "pareto_l0_fvu.json").read_text())["points"]
    runs = _synthetic_runs(study)
    groups = {  # study.yaml's pareto_lines, spelled out: label -> (its groups, variant)
        "topk": ({"k_sweep"}, "topk"), "batchtopk": ({"k_sweep"}, "batchtopk"),
        "jumprelu": ({"jumprelu", "jumprelu_k"}, "jumprelu"),
        "switch (E = 8)": ({"switch_width", "switch_k"}, "switch"),
    }  # fmt: skip
    for p in points:  # each point: the mean over the 3 seeds of its line's runs at one k
        names, variant = groups[p["line"]]
        same = [r for r in runs if names & set(r["groups"].split(";")) and r["variant"] == variant
                and r["l0"] == p["x"] and r["n_experts"] in (None, 8)]  # fmt: skip
        assert p["n"] == 3 == len(same)
        assert p["y"] == pytest.approx(sum(r["fvu"] for r in same) / 3)
        assert p["y_low"] <= p["y"] <= p["y_high"]
    assert {p["line"] for p in points} == set(groups)
    assert len(points) == 3 * len(groups)  # k = 16, 32, 64 on every line


def test_report_without_runs_says_not_run(tmp_path) -> None:
    """No runs table: every claim row is 'not run' and no PNG is written."""
    study_dir = tmp_path / "s"
    study_dir.mkdir()
    shutil.copy(REPO / "reports" / "main" / "study.yaml", study_dir)
    main(["report", "--study", str(study_dir), "--params", str(REPO / "params.yaml")])
    text = (study_dir / "report.md").read_text()
    verdicts = [line.rsplit("|", 2)[1].strip() for line in _claim_lines(text)]
    assert len(verdicts) == 52 and set(verdicts) == {NOT_RUN}  # 16 claims, their cases
    assert list((study_dir / "png").iterdir()) == []


def test_report_draws_learning_curves(tmp_path) -> None:
    """With curves.csv rows for runs the study's curves_where selects, the report links
    png/learning_curves.png."""
    study_dir = tmp_path / "s"
    study_dir.mkdir()
    shutil.copy(REPO / "reports" / "main" / "study.yaml", study_dir)
    study = load_study(study_dir)
    runs = [r for r in _synthetic_runs(study) if "length" in r["groups"]]
    write_table(study.runs_path, runs, ["run"])
    curves = [{"run": r["run"], "step": s, "tokens": 4096 * s, "train_fvu": 1 / s}
              for r in runs for s in (4, 8, 12)]  # fmt: skip
    write_table(study.curves_path, curves, ["run"])
    main(["report", "--study", str(study_dir), "--params", str(REPO / "params.yaml")])
    text = (study_dir / "report.md").read_text()
    assert "![learning curves](png/learning_curves.png)" in text
    assert (study_dir / "png" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
