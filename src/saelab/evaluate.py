"""Evaluation of a trained SAE: reconstruction and sparsity on cached activations, and the
downstream loss with the SAE spliced into the language model.

Definitions (sums run over every evaluated token t, position 0 excluded when
``sae.exclude_first_position``; ``x_t`` is the raw activation, ``x̂_t`` the reconstruction):

- ``mse``  = Σ_t ||x_t − x̂_t||² / (N·d_in)                       (per element)
- ``nmse`` = Σ_t ||x_t − x̂_t||² / Σ_t ||x_t||²                   (Bussmann et al. 2024, sec. 4)
- ``fvu``  = Σ_t ||x_t − x̂_t||² / Σ_t ||x_t − x̄||²,  x̄ = mean_t x_t
  (fraction of variance unexplained, normalised by the total variance around the mean;
  Gao et al. 2024; sparsify's loss)
- ``l0``   = mean_t #{i : f_i(x_t) > 0}; ``dead_fraction`` = fraction of latents that never fire
  on the evaluated tokens.
- Next-token cross-entropy in nats/token, over the predictions made at positions whose
  activation is replaced (positions 1..T−2 when position 0 is excluded: position 0's prediction
  cannot change, since position 0 is left untouched and attention is causal):
  ``ce_clean`` (model as is), ``ce_spliced`` (SAE reconstruction replaces the activation at the
  hookpoint), ``ce_zero_ablated`` (activation replaced by zeros).
- ``ce_loss_recovered`` = (ce_zero_ablated − ce_spliced) / (ce_zero_ablated − ce_clean)
  (SAELens's zero-ablation variant); ``delta_ce`` = ce_spliced − ce_clean (the BatchTopK paper's
  "CE degradation"); ``kl_div`` = mean_t KL(p_clean ‖ p_spliced) in nats/token.
- Switch SAEs: ``expert_load_max`` / ``expert_load_min`` (fractions of the eval tokens routed to
  the busiest / idlest expert) and ``experts_unused``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from saelab.capture import Replacement, hook_resid, splice_fn
from saelab.config import ModelConfig, PipelineConfig
from saelab.sae import SwitchSAE, load_sae
from saelab.sae.activations import BatchTopK
from saelab.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, batches: Iterable[Tensor]) -> dict[str, float]:
    """mse, nmse, fvu, l0, dead_fraction and n_tokens of ``sae`` (in eval mode) over batches.

    batches: [batch, d_in] float32 raw activations (position 0 already dropped by the reader).
    Sums accumulate in float64 so that 1e5+ tokens do not lose precision.
    """
    sae.eval()
    sq_err = sq_norm = l0_sum = 0.0
    n = 0
    x_sum: Tensor | None = None
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    for x in batches:
        out = sae(x)
        sq_err += (x - out.recon).double().pow(2).sum().item()
        sq_norm += x.double().pow(2).sum().item()
        x_sum = x.double().sum(0) if x_sum is None else x_sum + x.double().sum(0)
        active = out.acts > 0
        l0_sum += active.sum().item()
        fired |= active.any(0).cpu()
        n += x.shape[0]
    if n == 0 or x_sum is None:
        raise ValueError("reconstruction_metrics: no evaluation tokens")
    total_var = sq_norm - x_sum.pow(2).sum().item() / n  # Σ||x − x̄||² = Σ||x||² − N||x̄||²
    return {
        "mse": sq_err / (n * x_sum.numel()),
        "nmse": sq_err / sq_norm,
        "fvu": sq_err / total_var,
        "l0": l0_sum / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "n_tokens": float(n),
    }


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
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated (nats/token), CE loss recovered, ΔCE and KL.

    replace: [n, d_in] float32 -> [n, d_in] float32 (e.g. the SAE's reconstruction).
    contexts: [n_ctx, ctx_len] int64 token ids. Tokens with norm > ``max_norm`` keep their clean
    activation in both the spliced and the zero-ablated pass. Definitions: module docstring.
    """
    start = 1 if skip_first_position else 0
    sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablated": 0.0, "kl_div": 0.0}
    n_tokens = 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(contexts), batch_size), desc="spliced CE", unit="batch"):
        ids = contexts[i : i + batch_size].to(device)
        ce_clean, logp_clean = _token_losses(model(input_ids=ids).logits, ids, start)
        with hook_resid(model, model_cfg, splice_fn(replace, skip_first_position, max_norm)):
            ce_sae, logp_sae = _token_losses(model(input_ids=ids).logits, ids, start)
        zero = splice_fn(torch.zeros_like, skip_first_position, max_norm)
        with hook_resid(model, model_cfg, zero):
            ce_zero, _ = _token_losses(model(input_ids=ids).logits, ids, start)
        kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)  # [batch, seq−1−start]
        sums["ce_clean"] += ce_clean.sum().item()
        sums["ce_spliced"] += ce_sae.sum().item()
        sums["ce_zero_ablated"] += ce_zero.sum().item()
        sums["kl_div"] += kl.sum().item()
        n_tokens += ce_clean.numel()
    m = {key: value / n_tokens for key, value in sums.items()}
    m["ce_loss_recovered"] = (m["ce_zero_ablated"] - m["ce_spliced"]) / (
        m["ce_zero_ablated"] - m["ce_clean"]
    )
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
) -> dict[str, float]:
    """The evaluate stage's metrics for the SAE in ``sae_dir`` (definitions: module docstring).

    Reconstruction and sparsity on every cached eval token; downstream CE/KL on the first
    ``cfg.evaluate.n_ctx`` eval contexts. For BatchTopK and Sampled, ``l0`` is the inference-time
    L0 (global threshold θ) and ``l0_batch_mode`` the training-time rule's L0 at the training
    batch size.
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

    metrics = reconstruction_metrics(sae, batches(cfg.evaluate.batch_size * cfg.data.ctx_len))
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
            model,
            cfg.model,
            lambda x: sae(x).recon,
            contexts,
            cfg.evaluate.batch_size,
            exclude,
            max_norm,
        )
    )
    return metrics
