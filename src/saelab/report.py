"""The study report: ``reports/<study>/report.md`` and ``reports/<study>/png/``, regenerated from
the committed runs table (``runs.csv``, :mod:`saelab.study`) and ``study.yaml``'s claims.

Verdict rules (every claim row):

- The measurement is a difference between two sets of runs, **paired by seed** (and by the
  claim's ``pair_on`` columns, e.g. ``k``): ``a - b`` (or ``a / b - 1`` with ``relative``) per
  seed, then the mean over the n pairs and its 95% t-interval, ``mean ± t_{0.975, n-1} s /
  sqrt(n)`` (Student's t, n - 1 degrees of freedom: 4.30 for n = 3 seeds).
- ``paired`` claims (the paper says a is lower, or higher, than b): **holds** when the interval
  excludes 0 on the paper's side, **does not hold** when it excludes 0 on the other side,
  **inconclusive** otherwise.
- ``equivalent`` claims (a comparable to b): **holds** when the interval lies inside
  ``[-margin, +margin]``, **does not hold** when it lies wholly outside it, inconclusive
  otherwise.
- ``threshold`` claims (a metric of one set of runs is above, or below, a value): the interval
  of the metric's mean over seeds against the value, as for ``paired``.
- ``trend`` claims (a metric falls, or rises, with a swept column): per seed, the least-squares
  slope of the metric against the column (log2 of it with ``log_x``); the slopes' interval
  against 0, as for ``paired``.
- Fewer than ``min_seeds`` (3) pairs: **inconclusive** whatever the interval (n is shown);
  no pair at all (runs missing from the table, or a metric their runs lack): **not run**.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.config import ConfigError

MIN_SEEDS = 3
KINDS = ("paired", "equivalent", "threshold", "trend")
EXPECT = {
    "paired": ("lower", "higher"),
    "threshold": ("above", "below"),
    "trend": ("decreasing", "increasing"),
    "equivalent": ("comparable",),
}
HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its two-sided 95% t-interval (``low == high == mean`` for n = 1;
    NaN bounds for n = 0)."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (i.i.d. across seeds): ``mean ±
    t_{(1+c)/2, n-1} s / sqrt(n)`` with the sample standard deviation ``s``. n = 1: a
    degenerate interval at the value; n = 0: NaNs."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, mean, mean, 1)
    half = t.ppf((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def sign_verdict(iv: Interval, expect_negative: bool, min_seeds: int = MIN_SEEDS) -> str:
    """``holds`` when the interval excludes 0 on the expected side (below 0 when
    ``expect_negative``), ``does not hold`` when it excludes 0 on the other side, else
    ``inconclusive``; ``not run`` for n = 0 and ``inconclusive`` for n < ``min_seeds``."""
    if iv.n == 0:
        return NOT_RUN
    if iv.n < min_seeds:
        return INCONCLUSIVE
    below, above = iv.high < 0, iv.low > 0
    if (below and expect_negative) or (above and not expect_negative):
        return HOLDS
    if below or above:
        return FAILS
    return INCONCLUSIVE


def equivalence_verdict(iv: Interval, margin: float, min_seeds: int = MIN_SEEDS) -> str:
    """``holds`` when the interval lies within ``[-margin, margin]``, ``does not hold`` when it
    lies wholly outside, else ``inconclusive`` (``not run``/n rules as :func:`sign_verdict`)."""
    if iv.n == 0:
        return NOT_RUN
    if iv.n < min_seeds:
        return INCONCLUSIVE
    if -margin <= iv.low and iv.high <= margin:
        return HOLDS
    if iv.low > margin or iv.high < -margin:
        return FAILS
    return INCONCLUSIVE


# ---------------------------------------------------------------------------------------------
# the runs table as numbers


def number(value: Any) -> float | None:
    """A table cell as a float (None for an empty or non-numeric cell)."""
    if value is None or value == "":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _cell_matches(cell: Any, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_cell_matches(cell, w) for w in wanted)
    a, b = number(cell), number(wanted)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-12)
    return str(cell) == str(wanted)


def select(rows: Iterable[Mapping[str, Any]], where: Mapping[str, Any]) -> list[Mapping]:
    """The rows whose every ``where`` column has the value (numbers compared as numbers; a list
    is any of its values; ``groups`` holds when the row's ``;``-separated groups contain it, or
    one of them for a list)."""
    out = []
    for row in rows:
        ok = True
        for col, wanted in where.items():
            if col == "groups":
                mine = str(row.get("groups", "")).split(";")
                names = wanted if isinstance(wanted, list) else [wanted]
                ok = ok and any(str(g) in mine for g in names)
            else:
                ok = ok and _cell_matches(row.get(col), wanted)
        if ok:
            out.append(row)
    return out


def _pair_key(row: Mapping[str, Any], cols: Sequence[str]) -> tuple:
    return tuple(number(row.get(c)) if number(row.get(c)) is not None else row.get(c) for c in cols)


def paired_values(
    a_rows: Sequence[Mapping], b_rows: Sequence[Mapping], metric: str, pair_on: Sequence[str],
    relative: bool,
) -> list[float]:  # fmt: skip
    """``a - b`` (``relative``: ``a / b - 1``) of ``metric`` for each (seed, *pair_on) present in
    both sets with a number (several rows of one key: their mean)."""
    cols = ["seed", *pair_on]

    def by_key(rows: Sequence[Mapping]) -> dict[tuple, float]:
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            x = number(r.get(metric))
            if x is not None:
                groups.setdefault(_pair_key(r, cols), []).append(x)
        return {k: statistics.fmean(v) for k, v in groups.items()}

    a, b = by_key(a_rows), by_key(b_rows)
    keys = sorted(set(a) & set(b), key=str)
    if relative:
        return [a[k] / b[k] - 1 for k in keys if b[k] != 0]
    return [a[k] - b[k] for k in keys]


def seed_means(rows: Sequence[Mapping], metric: str) -> list[float]:
    """The metric's mean per seed over ``rows`` (seeds with no number skipped)."""
    per: dict[Any, list[float]] = {}
    for r in rows:
        x = number(r.get(metric))
        if x is not None:
            per.setdefault(r.get("seed"), []).append(x)
    return [statistics.fmean(v) for v in per.values()]


def slopes(rows: Sequence[Mapping], metric: str, x_col: str, log_x: bool) -> list[float]:
    """Per seed with at least two distinct x: the least-squares slope of ``metric`` against
    ``x_col`` (its log2 with ``log_x``)."""
    per: dict[Any, list[tuple[float, float]]] = {}
    for r in rows:
        x, y = number(r.get(x_col)), number(r.get(metric))
        if x is not None and y is not None and (x > 0 or not log_x):
            per.setdefault(r.get("seed"), []).append((math.log2(x) if log_x else x, y))
    out = []
    for points in per.values():
        if len({p[0] for p in points}) >= 2:
            xs, ys = zip(*points, strict=True)
            out.append(statistics.linear_regression(xs, ys).slope)
    return out


# ---------------------------------------------------------------------------------------------
# claims


@dataclass(frozen=True)
class ClaimRow:
    """One row of the claims table."""

    claim: str
    paper: str
    ours: str
    measurement: str
    verdict: str


def _claim_error(i: int, key: str, allowed: str) -> ConfigError:
    return ConfigError(f"study: claims[{i}].{key} must be {allowed}")


def check_claim(i: int, claim: Mapping[str, Any]) -> None:
    """Raise ConfigError for a malformed claim of ``study.yaml`` (module docstring).

    Raises:
        ConfigError: ``study: claims[i].<key> must be <allowed>``.
    """
    kind = claim.get("kind")
    if kind not in KINDS:
        raise _claim_error(i, "kind", f"one of {', '.join(KINDS)}")
    for key in ("claim", "paper", "metric"):
        if not isinstance(claim.get(key), str):
            raise _claim_error(i, key, "a string")
    if claim.get("expect") not in EXPECT[kind]:
        raise _claim_error(i, "expect", f"one of {', '.join(EXPECT[kind])} (kind {kind})")
    if kind in ("paired", "equivalent") and not isinstance(claim.get("b"), Mapping):
        raise _claim_error(i, "b", "a mapping of column filters")
    if kind == "equivalent" and number(claim.get("margin")) is None:
        raise _claim_error(i, "margin", "a number")
    if kind == "threshold" and number(claim.get("value")) is None:
        raise _claim_error(i, "value", "a number")
    if kind == "trend" and not isinstance(claim.get("x"), str):
        raise _claim_error(i, "x", "a column name")
    if not isinstance(claim.get("cases") or [], list):
        raise _claim_error(i, "cases", "a list of mappings")


def _fmt(x: float, relative: bool) -> str:
    if math.isnan(x):
        return "nan"
    return f"{100 * x:+.1f}%" if relative else f"{x:+.4g}"


def format_interval(iv: Interval, relative: bool = False, signed: bool = True) -> str:
    """``mean [low, high] (n=..)`` (percent with ``relative``)."""
    if iv.n == 0:
        return "—"

    def f(x: float) -> str:
        return _fmt(x, relative) if signed else f"{x:.4g}"

    if iv.n == 1:
        return f"{f(iv.mean)} (n=1, no interval)"
    return f"{f(iv.mean)} [{f(iv.low)}, {f(iv.high)}] (n={iv.n})"


def _ours(rows: Sequence[Mapping], filters: Mapping[str, Any]) -> str:
    """Our setting of a case: its filters and the training tokens of the runs it found."""
    text = ", ".join(f"{k} = {v}" for k, v in filters.items())
    tokens = sorted({number(r.get("train.n_tokens")) for r in rows} - {None})
    if tokens:
        text += f"; {', '.join(f'{t / 1e6:.2g}M' for t in tokens)} tokens"
    return text


def _measure(claim: Mapping, a_rows: Sequence[Mapping], b_rows: Sequence[Mapping]) -> list[float]:
    kind, metric = claim["kind"], claim["metric"]
    if kind in ("paired", "equivalent"):
        pair_on = claim.get("pair_on", [])
        return paired_values(a_rows, b_rows, metric, pair_on, bool(claim.get("relative")))
    if kind == "threshold":
        return seed_means(a_rows, metric)
    return slopes(a_rows, metric, claim["x"], bool(claim.get("log_x")))


def _verdict(claim: Mapping, iv: Interval, min_seeds: int) -> str:
    kind = claim["kind"]
    if kind == "equivalent":
        return equivalence_verdict(iv, float(claim["margin"]), min_seeds)
    if kind == "threshold":
        shifted = Interval(*(x - float(claim["value"]) for x in (iv.mean, iv.low, iv.high)), iv.n)
        return sign_verdict(shifted, claim["expect"] == "below", min_seeds)
    return sign_verdict(iv, claim["expect"] in ("lower", "decreasing"), min_seeds)


def _merge(*filters: Mapping | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in filters:
        out.update(f or {})
    return out


def evaluate_claim(
    claim: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], min_seeds: int = MIN_SEEDS
) -> list[ClaimRow]:
    """One :class:`ClaimRow` per case of ``claim`` (``cases``: filters merged into ``where``,
    ``a`` and ``b``, with their own ``label`` and ``paper`` text), from the runs table ``rows``
    (module docstring for the rules)."""
    rows_out = []
    for case in claim.get("cases") or [{}]:
        a_filter = _merge(claim.get("where"), claim.get("a"), case.get("where"), case.get("a"))
        b_filter = _merge(claim.get("where"), claim.get("b"), case.get("where"), case.get("b"))
        a_rows = select(rows, a_filter)
        b_rows = select(rows, b_filter) if claim["kind"] in ("paired", "equivalent") else []
        iv = t_interval(_measure(claim, a_rows, b_rows))
        verdict = _verdict(claim, iv, min_seeds)
        if verdict == INCONCLUSIVE and 0 < iv.n < min_seeds:
            verdict = f"{INCONCLUSIVE} (n={iv.n} < {min_seeds})"
        label = f"{claim['claim']}: {case['label']}" if case.get("label") else claim["claim"]
        ours = _ours([*a_rows, *b_rows], a_filter)
        if claim["kind"] in ("paired", "equivalent"):
            ours = f"{_ours(a_rows, a_filter)} vs {_ours(b_rows, b_filter)}"
        measurement = format_interval(
            iv, bool(claim.get("relative")), signed=claim["kind"] != "threshold"
        )
        rows_out.append(
            ClaimRow(
                label,
                str(case.get("paper", claim["paper"])),
                ours,
                f"{claim['metric']}: {measurement}",
                verdict,
            )
        )
    return rows_out


def claims_table(
    claims: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    min_seeds: int = MIN_SEEDS,
) -> list[ClaimRow]:
    """Every claim's rows (:func:`evaluate_claim`), after checking them all.

    Raises:
        ConfigError: a malformed claim (:func:`check_claim`).
    """
    for i, claim in enumerate(claims):
        check_claim(i, claim)
    return [r for claim in claims for r in evaluate_claim(claim, rows, min_seeds)]


# ---------------------------------------------------------------------------------------------
# plots


def _agg(rows: Sequence[Mapping], x: str, y: str, by: str) -> list[tuple[Interval, Interval]]:
    """Per value of ``by`` (sorted): the intervals over seeds of ``x`` and of ``y``."""
    values = sorted({number(r.get(by)) for r in rows} - {None})
    out = []
    for v in values:
        sub = [r for r in rows if number(r.get(by)) == v]
        ix, iy = t_interval(seed_means(sub, x)), t_interval(seed_means(sub, y))
        if ix.n and iy.n:
            out.append((ix, iy))
    return sorted(out, key=lambda p: p[0].mean)


def _errorbar(ax: Any, points: Sequence[tuple[Interval, Interval]], label: str) -> None:
    xs = [p[0].mean for p in points]
    ys = [p[1].mean for p in points]
    xerr = [[p[0].mean - p[0].low for p in points], [p[0].high - p[0].mean for p in points]]
    yerr = [[p[1].mean - p[1].low for p in points], [p[1].high - p[1].mean for p in points]]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=label)


@dataclass(frozen=True)
class LineSpec:
    """One line of a plot: the rows selected by ``where``, one point per value of ``by``."""

    label: str
    where: Mapping[str, Any]
    by: str


@dataclass(frozen=True)
class PlotSpec:
    """A PNG: ``y`` against ``x`` (table columns or derived ones, :func:`derived_columns`)."""

    file: str
    title: str
    x: str
    y: str
    lines: tuple[LineSpec, ...]
    log_x: bool = False


def derived_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with ``seconds_per_step`` (train_seconds / train_steps) and
    ``encoder_flops_per_token``: the matmul FLOPs of the encoder (and Switch's router) for one
    token, ``2 d_in d_sae / E + 2 d_in E`` (Switch: only the routed expert's ``d_sae / E``
    latents are computed, Mudide et al. 2024 sec. 3; E = 1 and no router for the others). d_in
    is the table's ``d_in`` column or 576 (SmolLM2-135M)."""
    out = dict(row)
    sec, steps = number(row.get("train_seconds")), number(row.get("train_steps"))
    if sec is not None and steps:
        out["seconds_per_step"] = sec / steps
    d_sae = number(row.get("d_sae"))
    d_in = number(row.get("d_in")) or 576.0
    if d_sae is not None:
        experts = number(row.get("n_experts")) if row.get("variant") == "switch" else None
        flops = 2 * d_in * d_sae / (experts or 1) + (2 * d_in * experts if experts else 0)
        out["encoder_flops_per_token"] = flops
    return out


def plot_specs(plots: Mapping[str, Any], variants: Sequence[str]) -> list[PlotSpec]:
    """The report's plots from ``study.yaml``'s ``plots`` section: the L0 vs FVU and L0 vs ΔCE
    fronts, from ``pareto_lines`` (a list of ``{label, where, by}``, ``by`` k by default) or,
    without it, ``pareto_group`` (one line per variant over k); ``switch_lines`` and
    ``dict_lines`` (lists of ``{label, where}``; FLOPs and seconds per step vs FVU),
    ``sampled_lines`` (FVU vs l)."""
    specs = []
    group = plots.get("pareto_group")
    lines = tuple(
        LineSpec(s["label"], s["where"], s.get("by", "k")) for s in plots.get("pareto_lines", [])
    )
    if group and not lines:
        lines = tuple(LineSpec(v, {"groups": group, "variant": v}, "k") for v in variants)
    if lines:
        specs.append(PlotSpec("pareto_l0_fvu.png", "L0 vs FVU", "l0", "fvu", lines))
        specs.append(PlotSpec("pareto_l0_delta_ce.png", "L0 vs ΔCE", "l0", "delta_ce", lines))
    switch = [
        LineSpec(s["label"], s["where"], s.get("by", "d_sae"))
        for s in plots.get("switch_lines", [])
    ]
    if switch:
        for x, name in (("encoder_flops_per_token", "flops"), ("seconds_per_step", "wallclock")):
            title = f"Switch: {x} vs FVU"
            specs.append(PlotSpec(f"switch_{name}_fvu.png", title, x, "fvu", tuple(switch), True))
    for key, file, x, y, log_x in (
        ("dict_lines", "dict_size_nmse.png", "d_sae", "nmse", True),
        ("sampled_lines", "sampled_l_fvu.png", "l", "fvu", True),
    ):
        lines = tuple(LineSpec(s["label"], s["where"], s.get("by", x)) for s in plots.get(key, []))
        if lines:
            specs.append(PlotSpec(file, f"{x} vs {y}", x, y, lines, log_x))
    return specs


def plot_points(
    spec: PlotSpec, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[LineSpec, list[tuple[Interval, Interval]]]]:
    """The lines of ``spec`` that have points: per line, its points' intervals over seeds of
    ``spec.x`` and ``spec.y`` (:func:`_agg`), sorted by x."""
    table = [derived_columns(r) for r in rows]
    drawn = [
        (line, _agg(select(table, line.where), spec.x, spec.y, line.by)) for line in spec.lines
    ]
    return [(line, pts) for line, pts in drawn if pts]


def front_records(spec: PlotSpec, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``spec``'s points as DVC plot data (``reports/<study>/fronts/<plot>.json``, drawn by
    ``plots/templates/study_front.json`` for ``dvc plots show`` / ``dvc plots diff``): one
    record per point, ``line`` (its label), ``x``/``y`` (means over seeds), their 95%
    t-interval bounds ``x_low``... and the number of seeds ``n``."""
    out = []
    for line, points in plot_points(spec, rows):
        for ix, iy in points:
            bounds = {"x_low": ix.low, "x_high": ix.high, "y_low": iy.low, "y_high": iy.high}
            clean = {k: (v if math.isfinite(v) else None) for k, v in bounds.items()}
            out.append({"line": line.label, "x": ix.mean, "y": iy.mean, **clean, "n": iy.n})
    return out


def render_plot(spec: PlotSpec, rows: Sequence[Mapping[str, Any]], out_dir: Path) -> Path | None:
    """Draw ``spec`` (error bars: 95% t-intervals over seeds of both coordinates) into
    ``out_dir``; None (no file) when no line has a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = plot_points(spec, rows)
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for line, points in drawn:
        _errorbar(ax, points, line.label)
    if spec.log_x:
        ax.set_xscale("log")
    ax.set(xlabel=spec.x, ylabel=spec.y, title=spec.title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / spec.file
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_curves(curves: Sequence[Mapping[str, Any]], rows: Sequence[Mapping], out_dir: Path,
                  where: Mapping[str, Any]) -> Path | None:  # fmt: skip
    """Learning curves: ``train_fvu`` against training tokens, mean over the seeds of each
    variant's runs selected by ``where`` (``curves``: rows ``run, tokens, train_fvu``); None when
    there is no curve data for them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_run = {r["run"]: r for r in select(rows, where)}
    per_variant: dict[str, dict[float, list[float]]] = {}
    for c in curves:
        run, t, y = by_run.get(c.get("run")), number(c.get("tokens")), number(c.get("train_fvu"))
        if run is not None and t is not None and y is not None:
            per_variant.setdefault(run["variant"], {}).setdefault(t, []).append(y)
    if not per_variant:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, points in per_variant.items():
        ts = sorted(points)
        ax.plot(ts, [statistics.fmean(points[t]) for t in ts], label=variant)
    ax.set(xlabel="training tokens", ylabel="train FVU (mean over seeds)", title="Learning curves")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "learning_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the markdown


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return lines


def _distinct(rows: Sequence[Mapping], col: str) -> str:
    values = sorted({str(r.get(col, "")) for r in rows} - {""})
    return ", ".join(values) or "—"


def setting_lines(params: Mapping[str, Any], rows: Sequence[Mapping], planned: int) -> list[str]:
    """The setting section: model, hookpoint, corpus (from ``params``, the repository's
    params.yaml), tokens per SAE, eval tokens, CPUs and commits (from the runs table)."""
    model, data = params.get("model", {}), params.get("data", {})
    tokens = sorted({number(r.get("train.n_tokens")) for r in rows} - {None})
    return [
        f"- model: `{model.get('name_or_path')}` (`{model.get('gguf_file')}`), "
        f"hookpoint `{model.get('hookpoint')}`, dtype {model.get('dtype')}",
        f"- corpus: {', '.join(f'`{d}`' for d in data.get('corpus_dirs', []))}; "
        f"{data.get('ctx_len')}-token contexts",
        f"- tokens per SAE (train.n_tokens): {', '.join(f'{int(t):,}' for t in tokens) or '—'}",
        f"- eval tokens (reconstruction): {_distinct(rows, 'n_tokens')}; "
        f"CE tokens: {_distinct(rows, 'ce_n_tokens')}",
        f"- CPU: {_distinct(rows, 'cpu_model')} "
        f"(torch capability {_distinct(rows, 'cpu_capability')})",
        f"- saelab commits: {_distinct(rows, 'saelab_commit')}",
        f"- runs in the table: {len(rows)} of the {planned} the study plans",
    ]


CI_METRICS = ("fvu", "nmse", "delta_ce", "kl_div", "ce_loss_recovered", "ce_loss_recovered_mean")


def runs_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every run with its main metrics; a metric shows its own 95% interval where the row
    carries ``<metric>_ci_low`` / ``<metric>_ci_high``."""

    def show(r: Mapping, m: str) -> str:
        x = number(r.get(m))
        if x is None:
            return "—"
        lo, hi = number(r.get(f"{m}_ci_low")), number(r.get(f"{m}_ci_high"))
        return f"{x:.4g} [{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else f"{x:.4g}"

    header = ["run", "L0", *CI_METRICS, "train s"]
    body = [
        [r["run"], show(r, "l0"), *(show(r, m) for m in CI_METRICS), show(r, "train_seconds")]
        for r in sorted(rows, key=lambda r: r["run"])
    ]
    return markdown_table(header, body)


def build_report(
    study_raw: Mapping[str, Any], params: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
    curves: Sequence[Mapping[str, Any]], planned: int, png: Path,
) -> str:  # fmt: skip
    """Write the PNGs into the existing directory ``png`` and return the markdown, which links
    them as ``png/<file>``.

    Raises:
        ConfigError: a malformed claim.
    """
    min_seeds = int(study_raw.get("min_seeds", MIN_SEEDS))
    claims = claims_table(study_raw.get("claims") or [], rows, min_seeds)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    plots = [render_plot(s, rows, png) for s in plot_specs(study_raw.get("plots") or {}, variants)]
    curve_where = (study_raw.get("plots") or {}).get("curves_where", {})
    curve_png = render_curves(curves, rows, png, curve_where) if curves else None
    name = study_raw.get("name", "study")
    lines = [
        f"# Study `{name}`", "",
        f"Regenerated from `runs.csv` and `study.yaml` by `saelab report --study reports/{name}`"
        "; do not edit by hand.", "",
        "## Setting", "", *setting_lines(params, rows, planned), "",
        "## Claims", "",
        "Verdicts: seed-paired differences, 95% t-interval over seeds; fewer than "
        f"{min_seeds} seeds is inconclusive (rules: `saelab.report`).", "",
    ]  # fmt: skip
    lines += markdown_table(
        ["claim", "paper's setting and result", "ours", "measurement ± 95% interval", "verdict"],
        [[c.claim, c.paper, c.ours, c.measurement, c.verdict] for c in claims],
    )
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}](png/{p.name})" for p in plots if p is not None] or ["No plot data."]
    lines += ["", "## Training length", ""]
    if curve_png is not None:
        lines.append(f"![learning curves](png/{curve_png.name})")
    else:
        lines.append("No learning-curve data in the runs (`curves.csv`): not shown.")
    for note in study_raw.get("training_length_notes", []):
        lines += ["", str(note)]
    lines.append("")
    lines += ["## Differences from the papers", ""]
    lines += [f"- {d}" for d in study_raw.get("differences", [])] or ["- none recorded"]
    lines += ["", "## Runs", "", *runs_lines(rows), ""]
    return "\n".join(lines)


def write_fronts(
    study_raw: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out: Path
) -> None:
    """``out/<plot>.json`` (:func:`front_records`, ``{"points": [...]}``) for every plot of the
    report, built under a temporary name (:func:`saelab.store.atomic_dir`)."""
    import json

    from saelab.store import atomic_dir

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    with atomic_dir(out) as tmp:
        for spec in plot_specs(study_raw.get("plots") or {}, variants):
            points = front_records(spec, rows)
            text = json.dumps({"points": points}, indent=1, allow_nan=False)
            (tmp / f"{Path(spec.file).stem}.json").write_text(text + "\n")


def write_report(study: Any, params: Mapping[str, Any]) -> Path:
    """Regenerate ``<study dir>/report.md``, ``<study dir>/png/`` and the DVC plot data
    ``<study dir>/fronts/`` (:func:`write_fronts`) from ``study``'s
    (:class:`saelab.study.Study`) runs table and curves (``runs.csv``, ``curves.csv``; a missing
    file: no rows) and claims; ``params`` (params.yaml, parsed) gives the setting. The PNG
    directory is built under a temporary name and the markdown written via a temporary file,
    so neither is half-written.

    Raises:
        ConfigError: a malformed claim.
    """
    import os

    from saelab.store import atomic_dir
    from saelab.study import expand, read_table

    rows = read_table(study.runs_path)
    curves = read_table(study.curves_path)
    for i, claim in enumerate(study.claims):
        check_claim(i, claim)
    with atomic_dir(study.path / "png") as tmp:
        text = build_report(study.raw, params, rows, curves, len(expand(study)), tmp)
    write_fronts(study.raw, rows, study.path / "fronts")
    path = study.path / "report.md"
    part = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    part.write_text(text)
    part.replace(path)
    return path
