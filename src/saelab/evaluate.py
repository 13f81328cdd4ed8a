"""Evaluation of a trained SAE: reconstruction and sparsity on cached activations, and the
downstream loss with the SAE spliced into the language model. This docstring is the one place
where every metric of ``metrics/<variant>.json`` and ``plots/hist/<variant>.json`` is defined.

The eval split is fixed: every token of the cached eval activations (``data/activations/eval``,
held-out documents, see ``prepare``) for reconstruction and sparsity, and the first
``evaluate.n_ctx`` eval contexts for the downstream loss. Sums run over every evaluated token t
(N of them), position 0 and tokens with norm above the SAE's ``max_norm`` excluded (attention
sinks, see ``SAEConfig``); ``x_t`` is the raw activation [d_in], ``x̂_t`` the reconstruction,
``f_t`` the latent code [d_sae], ``x̄ = Σ_t x_t / N``. Expectations E are means over t.

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
  (linear interpolation, ``torch.quantile``). For BatchTopK and Sampled these use the inference
  rule (global threshold θ); ``l0_batch_mode`` is the training rule's L0 at the training batch
  size (k by construction) and ``threshold`` is θ.
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
  x̄, the mean activation over the eval split's reconstruction tokens, computed once).
- ``ce_loss_recovered`` = (ce_zero_ablated − ce_spliced) / (ce_zero_ablated − ce_clean)
  (SAELens's zero-ablation variant); ``ce_loss_recovered_mean`` the same against
  ``ce_mean_ablated`` (the BatchTopK paper's repository); ``delta_ce`` = ce_spliced − ce_clean
  (nats/token; Bussmann et al. 2024's "CE degradation"); ``kl_div`` = E_t KL(p_clean ‖
  p_spliced) in nats/token.
- Switch SAEs: ``expert_load_max`` / ``expert_load_min`` (fractions of the eval tokens routed to
  the busiest / idlest expert) and ``experts_unused``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from saelab.capture import Replacement, splice_fn
from saelab.config import ModelConfig, PipelineConfig
from saelab.sae import SwitchSAE, load_sae
from saelab.sae.activations import BatchTopK
from saelab.sae.model import SparseAutoencoder
from saelab.splice import clean_forward, run_suffix

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
    """Run ``sae`` (in eval mode) over ``batches`` ([batch, d_in] float32 raw activations, sinks
    already dropped by the reader) and return the accumulated :class:`ReconstructionStats`."""
    sae.eval()
    stats = ReconstructionStats(sae.d_sae)
    for x in batches:
        out = sae(x)
        stats.update(x, out.recon, out.acts)
    return stats


def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    """The reconstruction and sparsity metrics of ``sae`` over ``batches`` (see
    :func:`accumulate` and the module docstring)."""
    return accumulate(sae, batches).metrics()


def _token_losses(logits: Tensor, input_ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Per-token CE [batch, seq−1−start] and log-probs [batch, seq−1−start, vocab] (float32) of
    the predictions made at positions start..seq−2."""
    logp = F.log_softmax(logits[:, start:-1].float(), dim=-1)
    targets = input_ids[:, start + 1 :]
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp


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
    """Mean L0 with the activation in training mode (for BatchTopK: batch-level top-k, so this is
    k by construction at the training batch size); restores eval mode afterwards."""
    sae.activation.train()
    try:
        total = n = 0
        for x in batches:
            total += (sae.encode(x) > 0).sum().item()
            n += x.shape[0]
    finally:
        sae.activation.eval()
    return total / n


def run_evaluation(
    cfg: PipelineConfig, sae_dir: Path, tokens: Path, activations: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """The evaluate stage's metrics and histograms for the SAE in ``sae_dir`` (definitions:
    module docstring).

    Reconstruction and sparsity on every cached eval token; downstream CE/KL on the first
    ``cfg.evaluate.n_ctx`` eval contexts, mean ablation with the mean of those eval tokens. For
    BatchTopK and Sampled, ``l0`` is the inference-time L0 (global threshold θ) and
    ``l0_batch_mode`` the training-time rule's L0 at the training batch size.
    """
    from saelab.capture import load_model, resolve_device
    from saelab.data import read_tokens
    from saelab.store import drop_outliers, iter_batches

    exclude = cfg.sae.exclude_first_position
    sae = load_sae(sae_dir)
    max_norm = sae.metadata.get("max_norm")
    eval_store = activations / "eval"

    def batches(size: int) -> Iterable[Tensor]:
        return drop_outliers(
            iter_batches(eval_store, size, exclude_first_position=exclude), max_norm
        )

    stats = accumulate(sae, batches(cfg.evaluate.batch_size * cfg.data.ctx_len))
    metrics = stats.metrics()
    if max_norm is not None:
        metrics["max_norm"] = max_norm
    if isinstance(sae.activation, BatchTopK):  # batchtopk, sampled
        metrics["threshold"] = float(sae.activation.threshold)
        metrics["l0_batch_mode"] = batch_mode_l0(sae, batches(cfg.train.batch_size))
    if isinstance(sae, SwitchSAE):
        metrics.update(expert_load(sae, batches(cfg.evaluate.batch_size * cfg.data.ctx_len)))
    device = resolve_device(cfg.model.device)
    model = load_model(cfg.model, device)
    contexts = torch.from_numpy(read_tokens(tokens, "eval")[: cfg.evaluate.n_ctx].astype("int64"))
    sae.to(device)
    metrics.update(
        downstream_metrics(
            model, cfg.model, lambda x: sae(x).recon, contexts, cfg.evaluate.batch_size,
            exclude, max_norm, mean_act=stats.mean().to(device),
        )
    )  # fmt: skip
    return metrics, stats.histograms()
