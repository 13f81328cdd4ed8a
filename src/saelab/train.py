"""Training: a pure-ish :func:`train_step` and the loop :func:`train_sae` around it.

The loop follows the recipe shared by Gao et al. 2024 (TopK SAEs) and Bussmann et al. 2024
(BatchTopK): inputs scaled so that E||x||^2 = d_in, b_dec initialised at the geometric median of a
first batch, Adam, FVU loss plus the AuxK loss on dead latents (top-k families) and the
activation's own sparsity loss (L1 for ReLU, L0 for JumpReLU), decoder rows kept at unit norm with
the parallel gradient removed, linear warm-up and linear decay of the learning rate. At the end the
input scale is folded into the weights, so the returned SAE acts on raw activations.

Shapes: ``batch`` tokens, ``d_in`` input width, ``d_sae`` latents; tensors are float32.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from saelab.config import TrainConfig
from saelab.sae.activations import BatchTopK
from saelab.sae.model import SparseAutoencoder

if TYPE_CHECKING:
    from saelab.tracking import Tracker

logger = logging.getLogger(__name__)

_FINAL_STEPS = 10  # steps averaged for the summary's final train fvu / l0
_INFERENCE_L0_BATCHES = 4  # last training batches on which the eval-mode SAE is measured


class StepResult(NamedTuple):
    """metrics: loss, fvu, aux_loss, sparsity_loss, l0 (floats); fired [d_sae] bool: nonzero
    somewhere in x."""

    metrics: dict[str, float]
    fired: Tensor


def auto_lr(d_sae: int) -> float:
    """Adam learning rate ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al. 2024, sec. 2.3 scaling law)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_at(step: int, n_steps: int, lr: float, warmup_steps: int, decay_fraction: float) -> float:
    """Learning rate of 0-based ``step``: linear warm-up, constant, linear decay to 0.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Decay
    (Gao et al. 2024, sec. 2.3; Bussmann et al. 2024): over the last
    ``d = round(decay_fraction * n_steps)`` steps, ``lr * (n_steps - step) / d``, i.e. ``lr`` at
    step ``n_steps - d`` and ``lr / d`` at the last step (0 would be reached at step ``n_steps``).
    Where both apply, the smaller factor wins.
    """
    factor = 1.0
    if warmup_steps > 0:
        factor = min(factor, (step + 1) / warmup_steps)
    decay_steps = round(n_steps * decay_fraction)
    if decay_steps > 0:
        factor = min(factor, (n_steps - step) / decay_steps)
    return lr * max(factor, 0.0)


def estimate_input_scale(batches: Iterable[Tensor], n_tokens: int) -> float:
    """Scalar c such that E||c x||^2 = d_in over the first ``n_tokens`` tokens of ``batches``.

    ``c = sqrt(d_in / mean ||x||^2)`` (the convention of SAELens and the BatchTopK repo; see
    papers.md). Batches are ``[batch, d_in]``; an iterator is consumed up to the batch that
    reaches ``n_tokens`` (that batch is used only in part). Accumulates in float64.

    Raises:
        ValueError: ``batches`` is empty or the inputs are all zero.
    """
    total_sq, count, d_in = 0.0, 0, 0
    for x_BD in batches:
        x_BD = x_BD[: n_tokens - count]
        d_in = x_BD.shape[1]
        total_sq += float(x_BD.double().pow(2).sum())
        count += x_BD.shape[0]
        if count >= n_tokens:
            break
    if count == 0 or total_sq == 0.0:
        raise ValueError("estimate_input_scale: no tokens, or all of them zero")
    if count < n_tokens:
        logger.warning("input scale estimated on %d tokens only (asked %d)", count, n_tokens)
    return math.sqrt(d_in / (total_sq / count))


def geometric_median(x: Tensor, n_iter: int = 100, rel_tol: float = 1e-7) -> Tensor:
    """Geometric median of the rows of ``x [n, d_in]`` -> ``[d_in]`` (x's dtype).

    Weiszfeld's algorithm (Weiszfeld 1937), started at the mean, at most ``n_iter`` iterations,
    float64 internally: ``y <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / ||x_i - y||``. Stops
    when a step moves y by less than ``rel_tol`` times the mean distance to the points. Used to
    initialise b_dec (Gao et al. 2024, sec. 2.4; Bussmann et al. 2024).
    """
    x_ND = x.double()
    y_D = x_ND.mean(dim=0)
    for _ in range(n_iter):
        dist_N = (x_ND - y_D).norm(dim=1).clamp_min(1e-12)
        weight_N = 1.0 / dist_N
        new_y_D = (weight_N @ x_ND) / weight_N.sum()
        moved = float((new_y_D - y_D).norm())
        y_D = new_y_D
        if moved <= rel_tol * float(dist_N.mean()):
            break
    return y_D.to(x.dtype)


def fvu(x: Tensor, recon: Tensor) -> Tensor:
    """Fraction of variance unexplained ``sum ||x - recon||^2 / sum ||x - mean_batch(x)||^2``.

    x, recon [batch, d_in] -> scalar. Normalising the summed squared error by the batch's total
    variance makes the loss scale-free (EleutherAI/sparsify uses it as its loss).
    """
    total_var = (x - x.mean(dim=0)).pow(2).sum()
    return (x - recon).pow(2).sum() / total_var.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder, residual: Tensor, pre_acts: Tensor, dead: Tensor, k_aux: int
) -> Tensor:
    """AuxK loss (Gao et al. 2024, appendix A.2); unweighted; scalar, 0 when no latent is dead.

    The top ``k_aux`` pre-activations among the dead latents of each token (relu'd) are decoded
    without b_dec into ``e_hat``, which should reconstruct the detached residual
    ``e = x - recon [batch, d_in]``; the loss is normalised by the residual's variance:
    ``||e - e_hat||^2 / ||e - mean_batch(e)||^2`` (that is, :func:`fvu` of e).

    Args:
        pre_acts: [batch, d_sae], attached to the graph (the loss trains the dead latents).
        dead: [d_sae] bool.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return pre_acts.new_zeros(())
    pre_dead_BX = pre_acts[:, dead_idx]  # X = number of dead latents
    values_BK, indices_BK = pre_dead_BX.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    acts_dead_BX = torch.zeros_like(pre_dead_BX).scatter_(-1, indices_BK, values_BK.relu())
    e_hat_BD = acts_dead_BX @ sae.W_dec[dead_idx]
    return fvu(residual, e_hat_BD)


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    dead: Tensor,
    *,
    k_aux: int,
    aux_coef: float,
    grad_clip: float,
) -> StepResult:
    """One optimisation step on ``x [batch, d_in]`` (already scaled); ``dead [d_sae]`` bool.

    loss = fvu(x, recon) + aux_coef * auxk_loss + sparsity_loss, where AuxK applies only when the
    activation ``uses_auxk`` (top-k families and Switch) and ``sparsity_loss`` is the variant's
    own weighted penalty (:meth:`~saelab.sae.model.SparseAutoencoder.sparsity_loss`: L1, target
    L0, Switch's load balancing; 0 for the top-k families); backward; remove the decoder
    gradient parallel to its rows; clip the gradient norm to ``grad_clip``; optimizer step;
    renormalise decoder rows. ``aux_loss`` and
    ``sparsity_loss`` in the metrics are the weighted terms, so
    ``loss = fvu + aux_loss + sparsity_loss``; ``l0`` is the mean number of nonzero acts per token.
    """
    out = sae(x)
    fvu_loss = fvu(x, out.recon)
    aux = out.pre_acts.new_zeros(())
    if aux_coef > 0 and sae.activation.uses_auxk:
        residual_BD = (x - out.recon).detach()
        aux = aux_coef * auxk_loss(sae, residual_BD, out.pre_acts, dead, k_aux)
    sparsity = sae.sparsity_loss(x, out)
    loss = fvu_loss + aux + sparsity
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    sae.normalize_decoder_()
    with torch.no_grad():
        active_BS = out.acts > 0
        l0 = active_BS.sum(dim=1).float().mean()
        metrics = torch.stack([loss, fvu_loss, aux, sparsity.float(), l0]).detach()
    names = ("loss", "fvu", "aux_loss", "sparsity_loss", "l0")
    return StepResult(dict(zip(names, metrics.tolist(), strict=True)), active_BS.any(dim=0))


class _LoopState:
    """Book-keeping of :func:`train_sae` between steps (no tensors kept alive but these)."""

    def __init__(self, d_sae: int, dead_tokens: int, device: torch.device) -> None:
        self.silent_tokens = torch.zeros(d_sae, dtype=torch.long, device=device)  # [d_sae]
        self.dead_tokens = dead_tokens
        self.window: list[dict[str, float]] = []  # metrics since the last log
        self.final: deque[dict[str, float]] = deque(maxlen=_FINAL_STEPS)
        self.recent_raw: deque[Tensor] = deque(maxlen=_INFERENCE_L0_BATCHES)
        self.min_kept: list[float] = []  # BatchTopK: smallest kept act, threshold window only

    def dead(self) -> Tensor:
        """[d_sae] bool: latents silent for at least ``dead_tokens`` tokens (Gao et al., A.2)."""
        return self.silent_tokens >= self.dead_tokens

    def record(self, result: StepResult, x_raw: Tensor) -> None:
        self.silent_tokens.add_(x_raw.shape[0]).masked_fill_(result.fired, 0)
        self.window.append(result.metrics)
        self.final.append(result.metrics)
        self.recent_raw.append(x_raw)

    def pop_window(self) -> dict[str, float]:
        """Mean of each metric since the last call."""
        means = {key: _mean([m[key] for m in self.window]) for key in self.window[0]}
        self.window = []
        return means


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _next_batch(batches: Iterator[Tensor], step: int, d_in: int, device: torch.device) -> Tensor:
    """Next raw batch as float32 ``[batch, d_in]`` on ``device``."""
    try:
        x_BD = next(batches)
    except StopIteration:
        raise ValueError(f"train_sae: the batch iterator ran out at step {step}") from None
    if x_BD.ndim != 2 or x_BD.shape[1] != d_in:
        raise ValueError(f"train_sae: batches must be [batch, {d_in}], got {tuple(x_BD.shape)}")
    return x_BD.to(device=device, dtype=torch.float32, non_blocking=True)


def _init_scale_and_b_dec(
    sae: SparseAutoencoder, batches: Iterator[Tensor], cfg: TrainConfig, device: torch.device
) -> tuple[float, Iterator[Tensor]]:
    """Estimate the input scale on (and consume) the first ``cfg.scale_tokens`` tokens, then set
    b_dec to the geometric median of the next, scaled batch, which stays first in the returned
    iterator; that batch's pre-activations then initialise the activation
    (:meth:`~saelab.sae.activations.SparsityActivation.init_from_batch_`, e.g. JumpReLU's θ)."""
    scale = estimate_input_scale(batches, cfg.scale_tokens)
    first_BD = _next_batch(batches, 0, sae.d_in, device)
    with torch.no_grad():
        sae.init_b_dec_(geometric_median(first_BD * scale))
        sae.activation.init_from_batch_(sae.encode_pre(first_BD * scale), sae.b_enc)
    return scale, itertools.chain([first_BD], batches)


def param_groups(sae: SparseAutoencoder) -> list[dict]:
    """Adam parameter groups: the SAE's weights (``lr_scale`` 1) and, if it has any, the
    activation's own parameters with the activation's ``lr_scale`` (JumpReLU's thresholds).
    The loop sets each group's lr to the scheduled lr times its ``lr_scale``."""
    own = {id(p) for p in sae.activation.parameters()}
    groups = [{"params": [p for p in sae.parameters() if id(p) not in own], "lr_scale": 1.0}]
    if own:
        groups.append(
            {"params": list(sae.activation.parameters()), "lr_scale": sae.activation.lr_scale}
        )
    return groups


def _set_threshold(sae: SparseAutoencoder, min_kept: list[float]) -> float | None:
    """BatchTopK's (and Sampled's) inference threshold θ: the mean of the batches' smallest kept
    activations over the final ``threshold_fraction`` of the steps (Bussmann et al. 2024, sec. 3
    average over the whole run; early batches come from a different network and bias θ, so we
    use the end only). Returns θ, or None when the activation estimates no global threshold
    (JumpReLU learns its per-latent θ by gradient instead)."""
    if not isinstance(sae.activation, BatchTopK):
        return None
    threshold = sae.activation.threshold
    valid = [v for v in min_kept if not math.isnan(v)]
    if not valid:
        logger.warning(
            "no positive activation kept in the threshold window; threshold stays %g",
            float(threshold),
        )
        return float(threshold)
    threshold.fill_(_mean(valid))
    return float(threshold)


@torch.no_grad()
def _inference_metrics(sae: SparseAutoencoder, raw_batches: Iterable[Tensor]) -> dict[str, float]:
    """L0 and FVU of the eval-mode (folded) SAE on raw batches: what users of the saved SAE get."""
    sae.eval()
    l0s, fvus = [], []
    for x_BD in raw_batches:
        out = sae(x_BD)
        l0s.append(float((out.acts > 0).sum(dim=1).float().mean()))
        fvus.append(float(fvu(x_BD, out.recon)))
    return {"inference_l0_train": _mean(l0s), "inference_fvu_train": _mean(fvus)}


def _log(
    tracker: Tracker, bar: tqdm, state: _LoopState, step: int, lr: float, tok_per_s: float
) -> None:
    metrics = {f"train/{key}": value for key, value in state.pop_window().items()}
    metrics["train/dead_fraction"] = float(state.dead().float().mean())
    metrics["train/lr"] = lr
    tracker.log_metrics(metrics, step=step)
    bar.set_postfix(
        fvu=f"{metrics['train/fvu']:.3f}", l0=f"{metrics['train/l0']:.1f}", tok_s=f"{tok_per_s:.0f}"
    )


def train_sae(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    cfg: TrainConfig,
    tracker: Tracker,
    device: torch.device,
) -> dict[str, float]:
    """Train ``sae`` in place on raw activation batches ``[cfg.batch_size, d_in]``.

    Consumes ``cfg.scale_tokens`` tokens for the input scale, then ``cfg.n_steps`` batches (the
    first also sets b_dec and initialises the activation). Logs
    ``train/{loss,fvu,aux_loss,sparsity_loss,l0}`` (means since the last log),
    ``train/dead_fraction`` and ``train/lr`` every ``cfg.log_every`` steps. On return the input
    scale is folded into the weights, BatchTopK's (Sampled's) threshold is set, and the SAE is in
    eval mode and acts on raw activations.

    Returns:
        steps, tokens, input_scale, lr (peak), fvu / l0 / aux_loss / sparsity_loss (train, mean
        of the final steps), dead_fraction, seconds, tokens_per_s, inference_l0_train /
        inference_fvu_train (the returned SAE on the last training batches, raw units) and, for
        BatchTopK and Sampled, threshold.
    """
    torch.manual_seed(cfg.seed)
    sae.to(device).train()
    scale, it = _init_scale_and_b_dec(sae, iter(batches), cfg, device)
    peak_lr = cfg.lr if cfg.lr is not None else auto_lr(sae.d_sae)
    optimizer = torch.optim.Adam(
        param_groups(sae), lr=peak_lr, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )
    n_steps = cfg.n_steps
    threshold_start = n_steps - max(1, math.ceil(n_steps * cfg.threshold_fraction))
    state = _LoopState(sae.d_sae, cfg.dead_tokens, device)
    logger.info("training %s SAE: %d steps, input scale %.4g", sae.variant, n_steps, scale)
    step_kwargs = {"k_aux": cfg.k_aux, "aux_coef": cfg.aux_coef, "grad_clip": cfg.grad_clip}
    start, tokens = time.perf_counter(), 0
    bar = tqdm(range(n_steps), desc=f"train {sae.variant}", unit="step")
    for step in bar:
        x_raw_BD = _next_batch(it, step, sae.d_in, device)
        lr = lr_at(step, n_steps, peak_lr, cfg.warmup_steps, cfg.lr_decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        result = train_step(sae, optimizer, x_raw_BD * scale, state.dead(), **step_kwargs)
        state.record(result, x_raw_BD)
        tokens += x_raw_BD.shape[0]
        min_kept = getattr(sae.activation, "last_min_kept", None)
        if step >= threshold_start and min_kept is not None:
            state.min_kept.append(float(min_kept))
        if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
            _log(tracker, bar, state, step + 1, lr, tokens / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    return _finish(sae, state, scale, peak_lr, n_steps, tokens, seconds)


def _finish(
    sae: SparseAutoencoder,
    state: _LoopState,
    scale: float,
    peak_lr: float,
    n_steps: int,
    tokens: int,
    seconds: float,
) -> dict[str, float]:
    """Set the threshold, fold the input scale, measure the returned SAE; the run summary."""
    threshold = _set_threshold(sae, state.min_kept)
    sae.fold_input_scale_(scale)
    summary = {
        "steps": float(n_steps),
        "tokens": float(tokens),
        "input_scale": scale,
        "lr": peak_lr,
        **{
            key: _mean(m[key] for m in state.final)
            for key in ("fvu", "l0", "aux_loss", "sparsity_loss")
        },
        "dead_fraction": float(state.dead().float().mean()),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        **_inference_metrics(sae, state.recent_raw),
    }
    if threshold is not None:
        summary["threshold"] = threshold
    logger.info(
        "trained %s SAE: %s",
        sae.variant,
        ", ".join(f"{key}={value:.4g}" for key, value in summary.items()),
    )
    return summary
