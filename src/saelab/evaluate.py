"""Evaluation of a trained SAE: reconstruction and sparsity on cached activations, and the
downstream loss with the SAE spliced into the language model. This docstring is the one place
where every metric of ``metrics/<variant>.json`` and ``plots/hist/<variant>.json`` is defined.

The eval split is fixed: the first ``evaluate.n_ctx`` contexts of the cached eval activations
(``data/activations/eval``, held-out documents, see ``prepare``; null: all of them, the
default), for every metric. Sums run over every evaluated token t (N of them), position 0 and
tokens with norm above the SAE's ``max_norm`` excluded (attention sinks, see ``SAEConfig``);
``x_t`` is the raw activation [d_in], ``x̂_t`` the reconstruction, ``f_t`` the latent code
[d_sae], ``x̄ = Σ_t x_t / N``. Expectations E are means over t.

Intervals: ``<m>_ci_low`` / ``<m>_ci_high`` are the 95% percentile bootstrap interval of metric m
over eval contexts (a cluster bootstrap: contexts, not tokens, are resampled, with
``evaluate.n_bootstrap`` resamples and one ``evaluate.bootstrap_seed`` for every SAE, so that the
summary's comparisons are paired; :mod:`saelab.stats`), for ``ce_clean``, ``ce_spliced``,
``delta_ce``, ``kl_div``, ``ce_loss_recovered``, ``ce_loss_recovered_mean``,
``delta_ce_all_spliced``, ``fvu`` and ``nmse``.

Reconstruction (dimensionless unless stated):

- ``mse``  = Σ_t ||x_t − x̂_t||² / (N·d_in)  (squared activation units, per element)
- ``nmse`` = E||x − x̂||² / E||x||²  (Bussmann et al. 2024, sec. 4: "normalized MSE")
- ``fvu``  = E||x − x̂||² / E||x − x̄||²  (fraction of variance unexplained, around the mean;
  Gao et al. 2024, sec. 2.1; EleutherAI sparsify's loss)
- ``explained_variance`` = 1 − fvu. SAELens 6.18's ``explained_variance`` divides by E||x||²
  (variance around zero), i.e. it is our 1 − nmse; ours is around the mean.
- ``cosine_sim`` = E_t cos(x_t, x̂_t) (a token with a zero vector counts as 0)
- ``l2_ratio`` = E||x̂|| / E||x||  (SAELens's "l2_ratio": shrinkage of the reconstruction norm)
- ``relative_reconstruction_bias`` γ = argmin_γ E||x̂/γ − x||² = E||x̂||² / E[x·x̂]
  (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs", eq. 10; setting
  the derivative in 1/γ to zero gives 1/γ = E[x·x̂] / E||x̂||²). γ < 1: shrinkage.

Sparsity (per-token L0 ``L0_t = #{i : f_ti > 0}``, in latents; firing frequency of latent i
``ρ_i = #{t : f_ti > 0} / N``):

- ``l0`` = E_t L0_t; ``l0_p10``, ``l0_p50``, ``l0_p90``, ``l0_p99``: quantiles of L0_t
  (linear interpolation, ``torch.quantile``); ``l0_min``, ``l0_max``: its range. For BatchTopK
  and Sampled these use the inference rule (global threshold θ); ``l0_batch_mode`` and
  ``fvu_train_rule`` are the training rule's L0 (k by construction) and FVU at the training
  batch size (the function the SAE was trained as; the deployed one is the threshold), over every
  cached eval token, and ``threshold`` is θ.
- ``dead_fraction`` = fraction of latents with ρ_i = 0 (never fired on the eval split);
  ``dense_fraction`` = fraction with ρ_i > 0.1 (DENSE_FREQUENCY; "dense latents" fire on more
  than 10% of tokens).
- Histograms (``plots/hist/<variant>.json``, arrays kept out of the flat metrics JSON so that
  ``dvc metrics show`` lists scalars only): per-token L0 (``l0_hist``: fraction of tokens per
  bin of width ``l0_bin_width``, at most L0_BINS bins) and feature density (``density_hist``:
  number of live latents per bin of log10 ρ_i, width DENSITY_BIN_WIDTH decades; dead latents,
  log10 0 = −∞, are counted in ``dead_latents`` instead).

Downstream, next-token cross-entropy in nats/token over the predictions made at positions whose
activation is replaced (positions 1..T−2 when position 0 is excluded: position 0's prediction
cannot change, since position 0 is left untouched and attention is causal); sinks keep their
clean activation in every replaced pass:

- ``ce_clean`` (model as is), ``ce_spliced`` (the SAE's reconstruction replaces the activation
  at the hookpoint), ``ce_zero_ablated`` (replaced by zeros), ``ce_mean_ablated`` (replaced by
  x̄, the mean activation over the evaluated reconstruction tokens). The clean and ablated CE
  and the clean logits come from the baseline stage (:mod:`saelab.baseline`), computed once for
  all SAEs from the same cached activations; each SAE's evaluation runs only its spliced suffix
  and the LM head.
- ``delta_ce_all_spliced``: ΔCE with every position but 0 spliced, sinks included (what a user
  who spares only position 0, as SAELens does by default, would measure);
  ``excluded_token_fraction``: the fraction of evaluated tokens (every position) left clean
  (position 0 and sinks); ``sink_token_fraction``: the fraction of positions past 0 left clean
  by the norm rule.
- ``ce_loss_recovered`` = (ce_zero_ablated − ce_spliced) / (ce_zero_ablated − ce_clean)
  (SAELens's zero-ablation variant); ``ce_loss_recovered_mean`` the same against
  ``ce_mean_ablated`` (the BatchTopK paper's repository); ``delta_ce`` = ce_spliced − ce_clean
  (nats/token; Bussmann et al. 2024's "CE degradation"); ``kl_div`` = E_t KL(p_clean ‖
  p_spliced) in nats/token; ``ce_n_tokens`` and ``ce_n_contexts``: predictions and contexts
  evaluated.
- Switch SAEs: ``expert_load_max`` / ``expert_load_min`` (fractions of the eval tokens routed to
  the busiest / idlest expert) and ``experts_unused``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from saelab import stats
from saelab.baseline import (
    Baseline,
    check_cache,
    eval_contexts,
    kl_from_terms,
    load_baseline,
    read_contexts,
    token_ce,
    token_losses,
)
from saelab.capture import Replacement, resolve_device, splice_fn
from saelab.config import (
    ConfigError,
    InputError,
    ModelConfig,
    PipelineConfig,
    check_provenance,
    resolve_model,
)
from saelab.sae import SwitchSAE, load_sae
from saelab.sae.activations import BatchTopK
from saelab.sae.model import SparseAutoencoder
from saelab.splice import SuffixRunner, clean_forward, run_suffix
from saelab.store import ActivationStore

_token_losses = token_losses  # the name bench/evaluate.py imports

log = logging.getLogger(__name__)


DENSE_FREQUENCY = 0.1  # a latent firing on more than 10% of tokens is dense
L0_QUANTILES = (0.1, 0.5, 0.9, 0.99)
L0_BINS = 64  # at most this many bins in the per-token L0 histogram
DENSITY_BIN_WIDTH = 0.25  # decades of log10 firing frequency per density-histogram bin


class ReconstructionStats:
    """Streaming sums for the reconstruction and sparsity metrics (module docstring).

    Scalar sums are float64 so that 1e5+ tokens lose no precision; per-token L0 [N] int64 and
    per-latent firing counts [d_sae] int64 are kept on the CPU for the quantiles and histograms.
    """

    def __init__(self, d_sae: int) -> None:
        self.sums = dict.fromkeys(("sq_err", "sq_norm", "cos", "norm", "recon_norm",
                                   "recon_sq", "dot"), 0.0)  # fmt: skip
        self.x_sum: Tensor | None = None  # [d_in] float64
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.l0_chunks: list[Tensor] = []

    @property
    def n(self) -> int:
        return sum(len(c) for c in self.l0_chunks)

    def update(self, x: Tensor, recon: Tensor, acts: Tensor) -> None:
        """Add one batch: x, recon [batch, d_in], acts [batch, d_sae] (any float dtype)."""
        x, recon = x.double(), recon.double()
        norm, recon_norm = x.norm(dim=-1), recon.norm(dim=-1)
        dot = (x * recon).sum(-1)
        batch_sums = {
            "sq_err": (x - recon).pow(2).sum(), "sq_norm": norm.pow(2).sum(),
            "cos": (dot / (norm * recon_norm).clamp_min(1e-30)).sum(), "norm": norm.sum(),
            "recon_norm": recon_norm.sum(), "recon_sq": recon_norm.pow(2).sum(),
            "dot": dot.sum(),
        }  # fmt: skip
        for key, value in batch_sums.items():
            self.sums[key] += value.item()
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        active = acts > 0
        self.fire_counts += active.sum(0).cpu()
        self.l0_chunks.append(active.sum(-1).cpu())

    def mean(self) -> Tensor:
        """x̄ [d_in] float32, the mean activation of the tokens seen."""
        return (self.x_sum / self.n).float()

    def metrics(self) -> dict[str, float]:
        """The reconstruction and sparsity metrics (module docstring), plus ``n_tokens``."""
        n, s = self.n, self.sums
        if n == 0 or self.x_sum is None:
            raise ValueError("reconstruction_metrics: no evaluation tokens")
        # Σ||x − x̄||² = Σ||x||² − N||x̄||²
        total_var = s["sq_norm"] - self.x_sum.pow(2).sum().item() / n
        fvu = s["sq_err"] / total_var
        frequency = self.fire_counts.double() / n
        l0 = torch.cat(self.l0_chunks).double()
        return {
            "mse": s["sq_err"] / (n * self.x_sum.numel()),
            "nmse": s["sq_err"] / s["sq_norm"],
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine_sim": s["cos"] / n,
            "l2_ratio": s["recon_norm"] / s["norm"],
            "relative_reconstruction_bias": s["recon_sq"] / s["dot"],
            "l0": l0.mean().item(),
            **{f"l0_p{round(q * 100)}": l0.quantile(q).item() for q in L0_QUANTILES},
            "dead_fraction": (frequency == 0).double().mean().item(),
            "dense_fraction": (frequency > DENSE_FREQUENCY).double().mean().item(),
            "n_tokens": float(n),
        }

    def histograms(self) -> dict[str, Any]:
        """Per-token L0 and feature-density histograms (module docstring), JSON-ready."""
        return {
            **l0_histogram(torch.cat(self.l0_chunks)),
            **density_histogram(self.fire_counts, self.n),
        }


def l0_histogram(l0_N: Tensor, max_bins: int = L0_BINS) -> dict[str, Any]:
    """Histogram of per-token L0 ``l0_N [N]`` (int): ``l0_bin_width`` w (the smallest integer
    giving at most ``max_bins`` bins from 0 to max L0) and ``l0_hist``, rows
    ``{"l0": bin start, "tokens": fraction of the N tokens with L0 in [start, start + w)}``."""
    top = int(l0_N.max()) if l0_N.numel() else 0
    width = max(1, math.ceil((top + 1) / max_bins))
    counts = torch.bincount(l0_N.long() // width, minlength=top // width + 1)
    rows = [{"l0": i * width, "tokens": c / len(l0_N)} for i, c in enumerate(counts.tolist())]
    return {"l0_bin_width": width, "l0_hist": rows}


def density_histogram(fire_counts_S: Tensor, n_tokens: int) -> dict[str, Any]:
    """Histogram of log10 firing frequency of the live latents (``fire_counts_S [d_sae]`` firings
    over ``n_tokens``): ``density_hist`` rows ``{"log10_density": bin centre, "latents": count}``
    on bins of DENSITY_BIN_WIDTH decades from ⌊log10(1/N)⌋ to 0; ``dead_latents`` apart."""
    live = fire_counts_S[fire_counts_S > 0].double() / n_tokens
    lo = math.floor(math.log10(1 / n_tokens))
    n_bins = round(-lo / DENSITY_BIN_WIDTH)
    index = ((live.log10() - lo) / DENSITY_BIN_WIDTH).floor().long().clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins).tolist()
    rows = [
        {"log10_density": lo + (i + 0.5) * DENSITY_BIN_WIDTH, "latents": c}
        for i, c in enumerate(counts)
    ]
    return {"dead_latents": int((fire_counts_S == 0).sum()), "density_hist": rows}


@torch.no_grad()
def accumulate(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> ReconstructionStats:
    """Run ``sae``'s inference function (:meth:`~saelab.sae.model.SparseAutoencoder.infer`) over
    ``batches`` ([batch, d_in] float32 raw activations, sinks already dropped by the reader) and
    return the accumulated :class:`ReconstructionStats`."""
    stats = ReconstructionStats(sae.d_sae)
    for x in batches:
        out = sae.infer(x)
        stats.update(x, out.recon, out.acts)
    return stats


def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    """The reconstruction and sparsity metrics of ``sae`` over ``batches`` (see
    :func:`accumulate` and the module docstring)."""
    return accumulate(sae, batches).metrics()


@torch.inference_mode()
def downstream_metrics(
    model: nn.Module,
    model_cfg: ModelConfig,
    replace: Replacement,
    contexts: Tensor,
    batch_size: int,
    skip_first_position: bool,
    max_norm: float | None = None,
    mean_act: Tensor | None = None,
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated / mean-ablated (nats/token), CE loss recovered, ΔCE, KL.

    replace: [n, d_in] float32 -> [n, d_in] float32 (e.g. the SAE's reconstruction).
    contexts: [n_ctx, ctx_len] int64 token ids. mean_act: [d_in] float32, the eval split's mean
    activation x̄ (None: no mean ablation). Tokens with norm > ``max_norm`` keep their clean
    activation in every replaced pass. One clean forward per batch, which also records the
    suffix after the hookpoint (:func:`saelab.splice.clean_forward`); each replacement then runs
    only that suffix (later layers, final norm, lm_head). Definitions: module docstring.
    """
    start = 1 if skip_first_position else 0
    replacements: dict[str, Replacement] = {
        "ce_spliced": replace,
        "ce_zero_ablated": torch.zeros_like,
    }
    if mean_act is not None:
        replacements["ce_mean_ablated"] = lambda x: mean_act.to(x).expand_as(x)
    sums = dict.fromkeys(("ce_clean", *replacements, "kl_div"), 0.0)
    n_tokens = 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(contexts), batch_size), desc="spliced CE", unit="batch"):
        ids = contexts[i : i + batch_size].to(device)
        logits, suffix = clean_forward(model, model_cfg, ids)
        ce_clean, logp_clean = _token_losses(logits, ids, start)
        sums["ce_clean"] += ce_clean.sum().item()
        for key, fn in replacements.items():
            resid = splice_fn(fn, skip_first_position, max_norm)(suffix.resid)
            ce, logp = _token_losses(run_suffix(suffix, resid), ids, start)
            sums[key] += ce.sum().item()
            if key == "ce_spliced":  # KL(clean ‖ spliced) summed over [batch, seq−1−start]
                sums["kl_div"] += (logp_clean.exp() * (logp_clean - logp)).sum().item()
        n_tokens += ce_clean.numel()
    return _loss_summary({key: value / n_tokens for key, value in sums.items()}, n_tokens)


def _loss_summary(m: dict[str, float], n_tokens: int) -> dict[str, float]:
    """Add CE loss recovered (against each ablation present), ΔCE and the token count to the
    per-token means ``m`` (module docstring)."""

    def recovered(ablated: float) -> float:
        return (ablated - m["ce_spliced"]) / (ablated - m["ce_clean"])

    m["ce_loss_recovered"] = recovered(m["ce_zero_ablated"])
    if "ce_mean_ablated" in m:
        m["ce_loss_recovered_mean"] = recovered(m["ce_mean_ablated"])
    m["delta_ce"] = m["ce_spliced"] - m["ce_clean"]
    m["ce_n_tokens"] = float(n_tokens)
    return m


@torch.no_grad()
def expert_load(sae: SwitchSAE, batches: Iterable[Tensor]) -> dict[str, float]:
    """Switch SAE routing balance over ``batches`` ([batch, d_in] float32 raw activations):
    ``expert_load_max`` / ``expert_load_min``, the largest and smallest fraction of the tokens
    routed to one expert (both 1 / n_experts when balanced), and ``experts_unused``, the number
    of experts that received no token."""
    counts = torch.zeros(sae.n_experts, dtype=torch.long)
    for x in batches:
        _, expert = sae.route(x)
        counts += torch.bincount(expert, minlength=sae.n_experts).cpu()
    fractions = counts.double() / counts.sum().clamp_min(1)
    return {
        "expert_load_max": fractions.max().item(),
        "expert_load_min": fractions.min().item(),
        "experts_unused": float((counts == 0).sum()),
    }


@torch.no_grad()
def batch_mode_l0(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> float:
    """Mean L0 of the training function (for BatchTopK: batch-level top-k, so this is k by
    construction at the training batch size)."""
    return train_rule_metrics(sae, batches)["l0_batch_mode"]


@torch.no_grad()
def train_rule_metrics(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    """``l0_batch_mode`` and ``fvu_train_rule``: L0 and FVU of the function the SAE was trained
    as (:meth:`~saelab.sae.model.SparseAutoencoder.forward_train`; BatchTopK, Sampled: the
    batch-level selection over ``batches``, which should be training-sized), next to the
    deployed inference rule (the global threshold θ) that every other metric uses."""
    stats = ReconstructionStats(sae.d_sae)
    for x in batches:
        out = sae.forward_train(x)
        stats.update(x, out.recon, out.acts)
    m = stats.metrics()
    return {"l0_batch_mode": m["l0"], "fvu_train_rule": m["fvu"]}


# --------------------------------------------------------------------------- from the baseline

# Per-context sums saved by the evaluate stage (data/per_context/<variant>.npz) and resampled by
# the bootstrap (saelab.stats): each [n_ctx] float64, x_sum [n_ctx, d_in].
CE_SUMS = ("ce_clean", "ce_spliced", "ce_zero_ablated", "ce_mean_ablated", "kl_div",
           "ce_all_spliced", "n_pred")  # fmt: skip
RECON_SUMS = ("sq_err", "sq_norm", "n_tok", "x_sum")


class ContextSums:
    """Per-context sums of the spliced pass and of the reconstruction, for ``n_ctx`` contexts of
    ``d_in``-dimensional activations (float64 numpy arrays, see CE_SUMS and RECON_SUMS)."""

    def __init__(self, n_ctx: int, d_in: int) -> None:
        self.sums = {key: np.zeros(n_ctx) for key in (*CE_SUMS, *RECON_SUMS[:-1])}
        self.sums["x_sum"] = np.zeros((n_ctx, d_in))

    def add_recon(self, first: int, x: Tensor, recon: Tensor, use: Tensor) -> None:
        """x, recon [batch, seq, d_in] float32 of contexts first..first+batch−1; use [batch, seq]
        bool: the reconstruction tokens (not spared)."""
        mask = use.double()
        err = (x - recon).double().pow(2).sum(-1) * mask
        rows = slice(first, first + len(x))
        self.sums["sq_err"][rows] += err.sum(-1).cpu().numpy()
        self.sums["sq_norm"][rows] += (x.double().pow(2).sum(-1) * mask).sum(-1).cpu().numpy()
        self.sums["n_tok"][rows] += mask.sum(-1).cpu().numpy()
        self.sums["x_sum"][rows] += (x.double() * mask[..., None]).sum(1).cpu().numpy()

    def add_ce(self, first: int, **per_token: Tensor) -> None:
        """Per-prediction values [batch, n_pred] (nats) of contexts first..first+batch−1."""
        for key, value in per_token.items():
            self.sums[key][first : first + len(value)] += value.double().sum(-1).cpu().numpy()


def _fvu(s: stats.Sums) -> np.ndarray:
    # Σ||x − x̄||² = Σ||x||² − ||Σx||² / N
    return s["sq_err"] / (s["sq_norm"] - (s["x_sum"] ** 2).sum(-1) / s["n_tok"])


def _recovered(ablated: str) -> stats.Statistic:
    return lambda s: (s[ablated] - s["ce_spliced"]) / (s[ablated] - s["ce_clean"])


# metric -> statistic of the per-context sums (definitions: module docstring)
STATISTICS: dict[str, stats.Statistic] = {
    "ce_clean": stats.ratio("ce_clean", "n_pred"),
    "ce_spliced": stats.ratio("ce_spliced", "n_pred"),
    "ce_zero_ablated": stats.ratio("ce_zero_ablated", "n_pred"),
    "ce_mean_ablated": stats.ratio("ce_mean_ablated", "n_pred"),
    "delta_ce": lambda s: (s["ce_spliced"] - s["ce_clean"]) / s["n_pred"],
    "kl_div": stats.ratio("kl_div", "n_pred"),
    "ce_loss_recovered": _recovered("ce_zero_ablated"),
    "ce_loss_recovered_mean": _recovered("ce_mean_ablated"),
    "delta_ce_all_spliced": lambda s: (s["ce_all_spliced"] - s["ce_clean"]) / s["n_pred"],
    "fvu": _fvu,
    "nmse": stats.ratio("sq_err", "sq_norm"),
}
WITH_INTERVAL = ("ce_clean", "ce_spliced", "delta_ce", "kl_div", "ce_loss_recovered",
                 "ce_loss_recovered_mean", "delta_ce_all_spliced", "fvu", "nmse")  # fmt: skip


def interval_metrics(
    per_context: dict[str, np.ndarray], n_resamples: int, seed: int
) -> dict[str, float]:
    """Every statistic of STATISTICS from the per-context sums, and ``<m>_ci_low`` /
    ``<m>_ci_high`` (95% percentile bootstrap over contexts, :mod:`saelab.stats`) for the
    metrics of WITH_INTERVAL. The same seed and context count give the same resamples, so two
    SAEs evaluated on one baseline are paired."""
    counts = stats.bootstrap_counts(len(per_context["n_pred"]), n_resamples, seed)
    out: dict[str, float] = {}
    for key, statistic in STATISTICS.items():
        if key in WITH_INTERVAL:
            out[key], out[f"{key}_ci_low"], out[f"{key}_ci_high"] = stats.interval(
                statistic, per_context, counts
            )
        else:
            out[key] = float(statistic(stats.point_sums(per_context))[0])
    return out


@dataclass(frozen=True)
class SplicedInputs:
    """What the spliced pass reads: the eval contexts [n, ctx_len] int64, the cached eval
    activations, the baseline, and the contexts per forward."""

    contexts: np.ndarray
    store: ActivationStore
    baseline: Baseline
    batch_size: int


@torch.inference_mode()
def spliced_pass(
    sae: SparseAutoencoder, model: nn.Module, model_cfg: ModelConfig, inputs: SplicedInputs
) -> tuple[ContextSums, ReconstructionStats]:
    """The SAE-dependent part of evaluation, one pass over the eval contexts.

    For each batch: the cached activations x [batch, seq, d_in]; the SAE's reconstruction of the
    tokens the baseline does not spare; the suffix after the hookpoint on the spliced residual
    stream (CE per prediction), KL from the baseline's clean terms and the spliced LM-head
    input (:func:`saelab.baseline.clean_kl_terms`: no clean logits); and,
    only for contexts with a spared token past position 0 (a sink), the suffix with every
    position but 0 spliced (``ce_all_spliced``; elsewhere it equals ``ce_spliced``). Cost per
    SAE: one suffix (with its LM head) per batch, plus the runner's clean forwards (two batches).
    """
    base = inputs.baseline
    n, start = len(inputs.contexts), base.attrs["start"]
    device = next(model.parameters()).device
    runner, sums = SuffixRunner(model, model_cfg), ContextSums(n, inputs.store.d_in)
    recon_stats = ReconstructionStats(sae.d_sae)
    spared_all = torch.from_numpy(base.arrays["spared"])
    for i in tqdm(range(0, n, inputs.batch_size), desc="spliced CE", unit="batch"):
        ids = torch.from_numpy(inputs.contexts[i : i + inputs.batch_size]).to(device)
        x = read_contexts(inputs.store, i, len(ids)).to(device)
        clean = runner.prepare(ids)
        if clean is not None:
            check_cache(clean, x, inputs.store, model_cfg.hookpoint)
        use = ~spared_all[i : i + len(ids)].to(device)
        kept = x[use]  # [n_kept, d_in]
        out = sae.infer(kept)
        recon_stats.update(kept, out.recon, out.acts)
        spliced = x.clone()
        spliced[use] = out.recon
        sums.add_recon(i, x, spliced, use)
        ce, kl = _spliced_ce_kl(base, runner, ids, spliced, i, start)
        sums.add_ce(i, ce_spliced=ce, kl_div=kl, ce_all_spliced=_all_spliced(
            sae, runner, ids, x, ~use, start, ce
        ), n_pred=torch.ones_like(ce))  # fmt: skip
    for key in ("ce_clean", "ce_zero_ablated", "ce_mean_ablated"):
        sums.sums[key] += base.arrays[key].astype(np.float64).sum(-1)
    return sums, recon_stats


def _spliced_ce_kl(
    base: Baseline, runner: SuffixRunner, ids: Tensor, spliced: Tensor, first: int, start: int
) -> tuple[Tensor, Tensor]:
    """(CE, KL(p_clean ‖ p_spliced)) per prediction [batch, n_pred] float32 of the contexts
    ``first ..`` with the residual stream ``spliced`` at the hookpoint: KL from the baseline's
    clean terms (:func:`saelab.baseline.clean_kl_terms`), or, for a soft-capped head, from the
    clean logits of the baseline's LM-head inputs."""
    device = spliced.device
    final = runner.final_hidden(ids.shape, spliced)
    logits = runner.head(ids.shape, final)
    if base.attrs.get("kl", "terms") == "clean_head":
        ce, logp = token_losses(logits, ids, start)
        t = ids.shape[1]
        clean = base.kl_store.read(first * t, (first + len(ids)) * t).view_as(final)
        logp_clean = token_losses(runner.head(ids.shape, clean.to(device)), ids, start)[1]
        return ce, (logp_clean.exp() * (logp_clean - logp)).sum(-1)
    ce, lse = token_ce(logits, ids, start)
    n_pred = ce.shape[1]
    u = base.kl_store.read(first * n_pred, (first + len(ids)) * n_pred).view(*ce.shape, -1)
    kl_const = torch.from_numpy(base.arrays["kl_const"][first : first + len(ids)])
    return ce, kl_from_terms(u.to(device), kl_const.to(device), final[:, start:-1], lse)


def _all_spliced(
    sae: SparseAutoencoder, runner: SuffixRunner, ids: Tensor, x: Tensor, spared: Tensor,
    start: int, ce: Tensor,
) -> Tensor:  # fmt: skip
    """Per-prediction CE [batch, n_pred] with every position from ``start`` on spliced, sinks
    included (what a user who spares only position 0 measures): a second suffix for the batches
    that have a spared token past ``start``, kept only for those contexts (the others equal
    ``ce``)."""
    has_sink = spared[:, start:].any(-1)
    if not has_sink.any():
        return ce
    spliced = x.clone()
    tail = x[:, start:].reshape(-1, x.shape[-1])
    spliced[:, start:] = sae.infer(tail).recon.view_as(x[:, start:])
    all_ce = token_losses(runner.logits(ids.shape, spliced), ids, start)[0]
    return torch.where(has_sink[:, None], all_ce, ce)


def check_consistency(
    cfg: PipelineConfig,
    sae: SparseAutoencoder,
    store: ActivationStore,
    baseline: Baseline,
    sae_dir: Path | None = None,
) -> None:
    """Raise ConfigError (one line naming both sides) unless the SAE, the cached eval
    activations, the baseline and the params agree on the model, the hookpoint, the LM's dtype
    (``cfg.model`` resolved: :func:`open_evaluation`), d_in
    (:func:`saelab.config.check_provenance`), the sink norm and the evaluated contexts, before
    any work. ``evaluate.n_ctx`` beyond the cached contexts is an error of
    :func:`~saelab.baseline.eval_contexts`."""
    b = baseline.attrs
    check_provenance(cfg.model, store=store, sae=sae, sae_dir=sae_dir, baseline=b)
    for name, attrs in (("the SAE's cfg.json", sae.metadata), (f"store {store.path}", store.attrs)):
        if "hookpoint" not in attrs:
            raise InputError(
                f"{name} does not record its hookpoint: re-run the stage that wrote it"
            )
    max_norm = sae.metadata.get("max_norm")
    if not _agree(max_norm, b["max_norm"]):
        raise InputError(
            f"the SAE's max_norm is {max_norm!r} but the baseline's max_norm is {b['max_norm']!r}"
        )
    cached = store.n_tokens // store.ctx_len
    wanted = cached if cfg.evaluate.n_ctx is None else cfg.evaluate.n_ctx
    if wanted != b["n_ctx"]:
        raise ConfigError(
            f"params evaluate.n_ctx selects {wanted} eval contexts but the baseline holds "
            f"{b['n_ctx']}: re-run the baseline stage"
        )


def _agree(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


@dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation reads, loaded and checked against each other and the params
    (:func:`open_evaluation`): the SAE (the metrics call its inference function by name), its
    directory, the cached eval store, the evaluated contexts ``[n_ctx, ctx_len] int64``, the
    baseline, and the LM's config with its dtype resolved for the device it runs on
    (:func:`saelab.config.resolve_model`)."""

    sae: SparseAutoencoder
    sae_dir: Path
    store: ActivationStore
    contexts: np.ndarray
    baseline: Baseline
    model: ModelConfig
    device: torch.device


def open_evaluation(
    cfg: PipelineConfig, sae_dir: Path, tokens: Path, activations: Path, baseline_dir: Path
) -> EvaluationInputs:
    """Load the inputs of an evaluation and check them, before any work (or MLflow run).

    Raises:
        ConfigError: an input is missing or corrupt (:class:`~saelab.config.InputError`), the
            SAE, the store, the baseline and the params disagree (:func:`check_consistency`), or
            ``evaluate.n_ctx`` exceeds the cached contexts.
    """
    from saelab.data import read_tokens

    device = resolve_device(cfg.model.device)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, device)})
    sae, baseline = load_sae(sae_dir).eval(), load_baseline(baseline_dir)
    store = ActivationStore(activations / "eval")
    contexts = eval_contexts(read_tokens(tokens, "eval"), store, cfg.evaluate.n_ctx)
    check_consistency(cfg, sae, store, baseline, sae_dir)
    return EvaluationInputs(sae, sae_dir, store, contexts, baseline, cfg.model, device)


def run_evaluation(
    cfg: PipelineConfig, sae_dir: Path, tokens: Path, activations: Path, baseline_dir: Path
) -> tuple[dict[str, float], dict[str, Any], dict[str, np.ndarray]]:
    """The evaluate stage for the SAE in ``sae_dir``: :func:`evaluate_inputs` of
    :func:`open_evaluation` (whose errors it raises)."""
    return evaluate_inputs(cfg, open_evaluation(cfg, sae_dir, tokens, activations, baseline_dir))


def evaluate_inputs(
    cfg: PipelineConfig, inputs: EvaluationInputs
) -> tuple[dict[str, float], dict[str, Any], dict[str, np.ndarray]]:
    """The evaluate stage (definitions: module docstring) on checked inputs: the SAE's metrics
    (with 95% intervals), histograms, and the per-context sums (CE_SUMS, RECON_SUMS) that the
    summary pairs across SAEs.

    Every metric is on the evaluated eval contexts (``evaluate.n_ctx``, null: all cached), with
    the clean and ablated CE and the clean LM-head inputs from the baseline (computed once for
    all SAEs). For BatchTopK and Sampled, ``l0`` and ``fvu`` use the inference rule (global
    threshold θ); ``l0_batch_mode`` and ``fvu_train_rule`` the training rule at the training
    batch size.
    """
    from saelab.capture import load_model
    from saelab.store import drop_outliers, iter_batches

    sae, store, baseline, contexts = inputs.sae, inputs.store, inputs.baseline, inputs.contexts
    max_norm = sae.metadata.get("max_norm")
    device = inputs.device
    model = load_model(inputs.model, device)
    spliced = SplicedInputs(contexts, store, baseline, cfg.evaluate.batch_size)
    sums, recon_stats = spliced_pass(sae.to(device), model, inputs.model, spliced)
    metrics = {**recon_stats.metrics(), **interval_metrics(
        sums.sums, cfg.evaluate.n_bootstrap, cfg.evaluate.bootstrap_seed)}  # fmt: skip
    metrics.update(_sparsity_extremes(recon_stats), **_exclusion(baseline), max_norm=max_norm)
    metrics["ce_n_tokens"] = float(sums.sums["n_pred"].sum())
    metrics["ce_n_contexts"] = float(len(contexts))

    def batches(size: int) -> Iterable[Tensor]:
        exclude = cfg.sae.exclude_first_position
        stream = iter_batches(store.path, size, exclude_first_position=exclude)
        return drop_outliers(stream, max_norm)

    sae.cpu()
    if isinstance(sae.activation, BatchTopK):  # batchtopk, sampled
        metrics["threshold"] = float(sae.activation.threshold)
        metrics.update(train_rule_metrics(sae, batches(cfg.train.batch_size)))
    if isinstance(sae, SwitchSAE):
        metrics.update(expert_load(sae, batches(cfg.evaluate.batch_size * cfg.data.ctx_len)))
    return {k: v for k, v in metrics.items() if v is not None}, recon_stats.histograms(), sums.sums


def _sparsity_extremes(recon: ReconstructionStats) -> dict[str, float]:
    """``l0_min`` and ``l0_max``: the range of per-token L0 (the BatchTopK paper reports 1 to
    over 80 at k = 32)."""
    l0 = torch.cat(recon.l0_chunks)
    return {"l0_min": float(l0.min()), "l0_max": float(l0.max())}


def _exclusion(baseline: Baseline) -> dict[str, float]:
    """``excluded_token_fraction``: eval tokens (every position) that keep their clean
    activation (position 0 and sinks); ``sink_token_fraction``: positions past 0 spared by the
    norm rule."""
    spared = baseline.arrays["spared"]
    return {
        "excluded_token_fraction": float(spared.mean()),
        "sink_token_fraction": float(spared[:, 1:].mean()),
    }
