"""The comparison across variants: one summary row per variant, the data of the DVC plots, and
the same plots as PNG images for MLflow.

Inputs are the evaluate stage's outputs: ``metrics/<variant>.json`` (flat metrics, defined in
:mod:`saelab.evaluate`) and ``plots/hist/<variant>.json`` (histograms). Outputs:

- ``summary.json`` (dvc.yaml's summarize): ``{variant: {key: value}}`` with
  :data:`SUMMARY_KEYS` (a mapping so that ``dvc metrics show/diff`` lists e.g. ``topk.fvu``),
  and under ``paired`` the difference of ΔCE, KL, FVU and NMSE between every two variants with
  its paired bootstrap interval over the shared eval contexts (:func:`paired_differences`,
  from ``data/per_context/<variant>.npz``);
- ``plots/pareto.json``: one row per variant (the keys every variant has), for the Pareto
  plots L0 vs FVU and L0 vs ΔCE (``dvc plots`` adds the revision, so ``dvc plots diff`` across
  ``dvc exp`` runs shows one point per variant and revision);
- ``plots/l0_hist.json`` (rows ``variant, l0, tokens``) and ``plots/density_hist.json`` (rows
  ``variant, log10_density, latents``): the histograms of every variant in one table;
- ``plots/png/*.png``: the four plots rendered with matplotlib (logged to MLflow); the Pareto
  plots carry the 95% intervals as error bars.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "k", "l0", "l0_batch_mode", "l0_min", "l0_max", "fvu", "fvu_ci_low", "fvu_ci_high",
    "fvu_train_rule", "nmse", "explained_variance", "cosine_sim", "l2_ratio",
    "relative_reconstruction_bias", "dead_fraction", "dense_fraction", "ce_clean", "ce_spliced",
    "delta_ce", "delta_ce_ci_low", "delta_ce_ci_high", "delta_ce_all_spliced",
    "ce_loss_recovered", "ce_loss_recovered_ci_low", "ce_loss_recovered_ci_high",
    "ce_loss_recovered_mean", "kl_div", "kl_div_ci_low", "kl_div_ci_high",
    "excluded_token_fraction", "train_tokens_per_s",
    # structure@<variant> (saelab.structure), when summarize is given its metrics
    "sp_source_k1", "sp_source_k5", "sp_author_k1", "sp_author_k5", "sp_decade_k1",
    "sp_decade_k5", "absorption_fraction", "full_absorption_rate",
    "sharing_train_distinct_latents", "sharing_train_pool_mass_share",
    "sharing_eval_usage_entropy_norm",
)  # fmt: skip
PAIRED = ("delta_ce", "kl_div", "fvu", "nmse")  # metrics compared pairwise on the same contexts
PLOT_FILES = ("pareto.json", "l0_hist.json", "density_hist.json")


def summary_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SUMMARY_KEYS` present in one variant's metrics (``l0_batch_mode`` exists for
    BatchTopK and Sampled only), with ``variant``."""
    return {"variant": metrics["variant"], **{k: metrics[k] for k in SUMMARY_KEYS if k in metrics}}


def _yerr(rows: Sequence[Mapping[str, Any]], y: str) -> np.ndarray | None:
    """Asymmetric error bars [2, n] from ``<y>_ci_low`` / ``<y>_ci_high``, None without them.
    A bootstrap percentile interval of a ratio (FVU, CE recovered) can exclude its point
    estimate on few contexts; that side's bar is then 0 (matplotlib refuses a negative one),
    and the JSON summary keeps the interval as computed."""
    if not all(f"{y}_ci_low" in r and f"{y}_ci_high" in r for r in rows):
        return None
    bars = np.array([[r[y] - r[f"{y}_ci_low"] for r in rows],
                     [r[f"{y}_ci_high"] - r[y] for r in rows]])  # fmt: skip
    return np.maximum(bars, 0.0)


def _tagged(variant: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"variant": variant, **row} for row in rows]


def _common_keys(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` restricted to the keys every row has (DVC's plot rendering fails on a table
    whose rows have different fields, e.g. ``l0_batch_mode`` for some variants only)."""
    common = set.intersection(*(set(r) for r in rows)) if rows else set()
    return [{k: v for k, v in r.items() if k in common} for r in rows]


def comparison(
    metrics: Sequence[Mapping[str, Any]], hists: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """``summary`` ({variant: row}) and the rows of each plot file (module docstring) from the
    per-variant metrics and histograms (same variants, any order)."""
    rows = [summary_row(m) for m in metrics]
    return {
        "summary": {
            row["variant"]: {k: v for k, v in row.items() if k != "variant"} for row in rows
        },
        "pareto.json": _common_keys(rows),
        "l0_hist.json": [r for h in hists for r in _tagged(h["variant"], h["l0_hist"])],
        "density_hist.json": [r for h in hists for r in _tagged(h["variant"], h["density_hist"])],
    }


def paired_differences(
    per_context: Mapping[str, Mapping[str, np.ndarray]], n_resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """For every pair of variants ``a``, ``b`` (a before b in the given order): the difference
    ``a − b`` of each metric of :data:`PAIRED` and its 95% paired bootstrap interval over the
    shared eval contexts (``<m>_diff``, ``<m>_diff_ci_low``, ``<m>_diff_ci_high``), keyed
    ``"<a>-<b>"``. An interval that excludes 0 says the variants differ on these contexts.

    per_context: each variant's per-context sums (``saelab.evaluate.CE_SUMS``, ``RECON_SUMS``),
    evaluated on the same contexts.

    Raises:
        ValueError: the variants were evaluated on different numbers of contexts.
    """
    from saelab import stats
    from saelab.evaluate import STATISTICS

    sizes = {v: len(s["n_pred"]) for v, s in per_context.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"variants evaluated on different contexts: {sizes}")
    if not sizes:
        return {}
    counts = stats.bootstrap_counts(next(iter(sizes.values())), n_resamples, seed)
    out = {}
    names = list(per_context)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = {f"a:{k}": v for k, v in per_context[a].items()}
            both.update({f"b:{k}": v for k, v in per_context[b].items()})
            row = {}
            for metric in PAIRED:
                diff = stats.difference(_side(STATISTICS[metric], "a:"),
                                        _side(STATISTICS[metric], "b:"))  # fmt: skip
                est, low, high = stats.interval(diff, both, counts)
                row.update({f"{metric}_diff": est, f"{metric}_diff_ci_low": low,
                            f"{metric}_diff_ci_high": high})  # fmt: skip
            out[f"{a}-{b}"] = row
    return out


def _side(statistic: Any, prefix: str) -> Any:
    """``statistic`` applied to the sums whose keys start with ``prefix`` (prefix removed)."""
    return lambda s: statistic({k[len(prefix) :]: v for k, v in s.items() if k.startswith(prefix)})


def render_pngs(data: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Draw the Pareto fronts (L0 vs FVU, L0 vs ΔCE) and both histograms of ``comparison``'s
    ``data`` into ``out_dir`` as PNG files (matplotlib, Agg backend); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [
        ("pareto_l0_fvu.png", "pareto.json", "l0", "fvu", "scatter"),
        ("pareto_l0_delta_ce.png", "pareto.json", "l0", "delta_ce", "scatter"),
        ("l0_hist.png", "l0_hist.json", "l0", "tokens", "step"),
        ("density_hist.png", "density_hist.json", "log10_density", "latents", "step"),
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, source, x, y, kind in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(r["variant"] for r in data[source]):
            rows = [r for r in data[source] if r["variant"] == variant]
            xs, ys = [r[x] for r in rows], [r[y] for r in rows]
            if kind == "scatter":
                ax.errorbar(xs, ys, yerr=_yerr(rows, y), fmt="o", capsize=3, label=variant)
            else:
                ax.step(xs, ys, where="mid", label=variant)
        ax.set(xlabel=x, ylabel=y, title=name.removesuffix(".png"))
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths
