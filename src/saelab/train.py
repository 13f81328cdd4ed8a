"""Training: a pure-ish :func:`train_step` and the loop :func:`train_sae` around it.

The loop follows the recipe shared by Gao et al. 2024 (TopK SAEs) and Bussmann et al. 2024
(BatchTopK): inputs scaled so that E||x||^2 = d_in, b_dec initialised at the geometric median of a
first batch, Adam, FVU loss plus the AuxK loss on dead latents (top-k families) and the
activation's own sparsity loss (L1 for ReLU, L0 for JumpReLU; both warmed up), decoder rows kept
at unit norm with the parallel gradient removed (but for ReLU + L1, Conerly et al. 2024), linear
warm-up and linear decay of the learning rate. At the end the input scale is folded into the
weights, so the returned SAE acts on raw activations.

Shapes: ``batch`` tokens, ``d_in`` input width, ``d_sae`` latents; tensors are float32.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from saelab import distributed
from saelab.checkpoint import (
    Checkpoint,
    TrainerState,
    fingerprint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from saelab.config import TrainConfig
from saelab.optim import SAEAdam
from saelab.sae.activations import BatchTopK
from saelab.sae.model import SAEOutput, SparseAutoencoder, SparseOutput

if TYPE_CHECKING:
    from saelab.tracking import Tracker

logger = logging.getLogger(__name__)

_FINAL_STEPS = 10  # steps averaged for the summary's final train fvu / l0
_INFERENCE_L0_BATCHES = 4  # last training batches on which the inference function is measured


class StepResult(NamedTuple):
    """metrics: loss, fvu, aux_loss, sparsity_loss, l0 (floats); fired [d_sae] bool: nonzero
    somewhere in x; seen [d_sae] int64: tokens of x each latent could fire on
    (:meth:`~saelab.sae.model.SparseAutoencoder.tokens_seen`)."""

    metrics: dict[str, float]
    fired: Tensor
    seen: Tensor


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


def sparsity_warmup_factor(step: int, n_steps: int, fraction: float) -> float:
    """Weight of the sparsity loss at 0-based ``step``: ``min(1, (step + 1) / w)`` with
    ``w = ceil(fraction * n_steps)`` warm-up steps, 1 throughout when ``fraction`` is 0. The
    λ warm-up of Conerly et al. 2024 (first 5% of training) and of JumpReLU trainers (Gemma
    Scope: 10,000 steps; dictionary_learning's ``sparsity_warmup_steps``)."""
    warmup_steps = math.ceil(fraction * n_steps)
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


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
    variance makes the loss scale-free (EleutherAI/sparsify uses it as its loss). In
    data-parallel training both sums run over the global batch (the numerator with
    :func:`~saelab.distributed.global_sum`'s gradient; ``x`` must not need a gradient).
    """
    if distributed.world_size() == 1:
        total_var = (x - x.mean(dim=0)).pow(2).sum()
        return (x - recon).pow(2).sum() / total_var.clamp_min(1e-12)
    stats_D1 = distributed.all_sum(torch.cat([x.sum(dim=0), x.new_full((1,), x.shape[0])]))
    mean_D = stats_D1[:-1] / stats_D1[-1]
    total_var = distributed.all_sum((x - mean_D).pow(2).sum())
    return distributed.global_sum((x - recon).pow(2).sum()) / total_var.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder, x: Tensor, residual: Tensor, dead: Tensor, k_aux: int
) -> Tensor:
    """AuxK loss (Gao et al. 2024, appendix A.2); unweighted; scalar, 0 when no latent is dead.

    The top ``k_aux`` pre-activations among the dead latents of each token (relu'd) are decoded
    without b_dec into ``e_hat``, which should reconstruct the detached residual
    ``e = x - recon [batch, d_in]``; the loss is normalised by the residual's variance:
    ``||e - e_hat||^2 / ||e - mean_batch(e)||^2`` (that is, :func:`fvu` of e).

    Args:
        x: [batch, d_in], the SAE's input; the dead latents' pre-activations are computed from
            it (:meth:`~saelab.sae.model.SparseAutoencoder.pre_acts_of`, attached to the graph:
            the loss trains the dead latents).
        dead: [d_sae] bool.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return residual.new_zeros(())
    pre_dead_BX = sae.pre_acts_of(x, dead_idx)  # X = number of dead latents
    values_BK, indices_BK = pre_dead_BX.topk(min(k_aux, dead_idx.numel()), dim=-1, sorted=False)
    acts_dead_BX = torch.zeros_like(pre_dead_BX).scatter_(-1, indices_BK, values_BK.relu())
    e_hat_BD = acts_dead_BX @ sae.W_dec[dead_idx]
    return fvu(residual, e_hat_BD)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.autocast`` -> the autocast dtype for ``device``, or None for float32.

    ``auto``: bfloat16 on a CUDA GPU that supports it (compute capability 8.0 and up: Ampere,
    Hopper; ``torch.cuda.is_bf16_supported``), and on a CPU whose matmuls run bf16 natively
    (AVX512-BF16 or AMX, as torch's CPU feature probe reports), else None: on an AVX2-only CPU a
    bf16 GEMM is ~7x slower than fp32 (``bench/train_step.py``), and an older GPU emulates it."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, n, lambda: False)() for n in probes)
    return torch.bfloat16 if native and device.type == "cpu" else None


def _activity(out: SAEOutput | SparseOutput, batch: int, d_sae: int) -> tuple[Tensor, Tensor]:
    """(mean L0 float32 scalar, fired [d_sae] bool) of a dense or sparse forward's codes; over
    the global batch in data-parallel training."""
    if distributed.world_size() > 1:
        if isinstance(out, SparseOutput):
            nnz, fired = (out.code.values > 0).sum().float(), out.code.fired(d_sae)
        else:
            active_BS = out.acts > 0
            nnz, fired = active_BS.sum().float(), active_BS.any(dim=0)
        return distributed.all_sum(nnz) / distributed.global_count(batch, nnz.device), (
            distributed.all_any(fired)
        )
    if isinstance(out, SparseOutput):
        return out.code.l0(batch), out.code.fired(d_sae)
    active_BS = out.acts > 0
    return active_BS.sum(dim=1).float().mean(), active_BS.any(dim=0)


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    dead: Tensor,
    *,
    k_aux: int,
    aux_coef: float,
    grad_clip: float,
    sparse: bool = True,
    autocast: torch.dtype | None = None,
    sparsity_scale: float = 1.0,
) -> StepResult:
    """One optimisation step on ``x [batch, d_in]`` (already scaled); ``dead [d_sae]`` bool.

    loss = fvu(x, recon) + aux_coef * auxk_loss + sparsity_scale * sparsity_loss, where AuxK
    applies only when the activation ``uses_auxk`` (top-k families and Switch) and
    ``sparsity_loss`` is the variant's own weighted penalty
    (:meth:`~saelab.sae.model.SparseAutoencoder.sparsity_loss`: L1, target L0, Switch's load
    balancing; 0 for the top-k families) and ``sparsity_scale`` its warm-up factor
    (:func:`sparsity_warmup_factor`); backward; remove the decoder gradient parallel to its
    rows; clip the gradient norm to ``grad_clip``; optimizer step; renormalise decoder rows. The
    two decoder steps are skipped when the activation has ``unit_norm_decoder`` false (ReLU + L1,
    whose recipe leaves the norms free). A BatchTopK (Sampled) activation that is
    ``estimating`` gets its ``last_min_kept`` from float32 pre-activations computed outside
    autocast when the forward ran in bf16
    (:meth:`~saelab.sae.activations.BatchTopK.batch_threshold`). ``aux_loss`` and
    ``sparsity_loss`` in the metrics are the weighted terms, so
    ``loss = fvu + aux_loss + sparsity_loss``; ``l0`` is the mean number of nonzero acts per token.

    ``sparse`` (default): SAEs with a sparse path (``sae.sparse_training``: TopK, BatchTopK,
    Sampled, Switch) use :meth:`~saelab.sae.model.SparseAutoencoder.forward_sparse`, which has
    the dense forward's recon and gradients at a fraction of the cost; False forces the dense
    forward (the reference). ``autocast``: run the forward and the losses under
    ``torch.autocast`` with that dtype (bfloat16; see :func:`autocast_dtype`), None: float32;
    ignored (float32) for an activation that is not ``autocast_safe`` (JumpReLU).

    Data-parallel training (inside :func:`saelab.distributed.data_parallel`): ``x`` is this
    rank's slice of the global batch; every loss, selection and metric is over the global
    batch, the gradients are summed over the ranks before the decoder projection and clipping,
    so every rank takes the step one process takes on the whole batch; ``fired`` and ``seen``
    are global.
    """
    enabled = autocast is not None and sae.activation.autocast_safe
    seen = distributed.all_sum(sae.tokens_seen(x))
    with torch.autocast(x.device.type, dtype=autocast, enabled=enabled):
        out = sae.forward_sparse(x) if sparse and sae.sparse_training else sae.forward_train(x)
        fvu_loss = fvu(x, out.recon.float())
        aux = fvu_loss.new_zeros(())
        if aux_coef > 0 and sae.activation.uses_auxk:
            residual_BD = (x - out.recon.float()).detach()
            aux = aux_coef * auxk_loss(sae, x, residual_BD, dead, k_aux).float()
        sparsity = sparsity_scale * sae.sparsity_loss(x, out).float()
        loss = fvu_loss + aux + sparsity
    _fp32_threshold(sae, x)
    unit_norm = sae.activation.unit_norm_decoder
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    distributed.all_reduce_grads(sae.parameters())
    if unit_norm:
        sae.remove_parallel_decoder_grad_()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    if unit_norm:
        sae.normalize_decoder_()
    with torch.no_grad():
        l0, fired = _activity(out, x.shape[0], sae.d_sae)
        metrics = torch.stack([loss, fvu_loss, aux, sparsity.float(), l0]).detach()
    names = ("loss", "fvu", "aux_loss", "sparsity_loss", "l0")
    return StepResult(dict(zip(names, metrics.tolist(), strict=True)), fired, seen)


@torch.no_grad()
def _fp32_threshold(sae: SparseAutoencoder, x: Tensor) -> None:
    """Set an estimating BatchTopK's ``last_min_kept`` from float32 pre-activations of ``x``
    when the forward left it None (it ran under bf16 autocast), before the weights change."""
    act = sae.activation
    if isinstance(act, BatchTopK) and act.estimating and act.last_min_kept is None:
        with torch.autocast(x.device.type, enabled=False):
            act.last_min_kept = act.batch_threshold(sae.encode_pre(x.float()))


class _LoopState:
    """Book-keeping of :func:`train_sae` between steps (no tensors kept alive but these)."""

    def __init__(self, d_sae: int, dead_tokens: int, device: torch.device) -> None:
        self.steps = 0  # completed steps
        self.tokens = 0  # tokens trained on
        self.silent_tokens = torch.zeros(d_sae, dtype=torch.long, device=device)  # [d_sae]
        self.dead_tokens = dead_tokens
        self.window: list[dict[str, float]] = []  # metrics since the last log
        self.final: deque[dict[str, float]] = deque(maxlen=_FINAL_STEPS)
        self.recent_raw: deque[Tensor] = deque(maxlen=_INFERENCE_L0_BATCHES)
        self.min_kept: list[float] = []  # BatchTopK: smallest kept act, threshold window only
        self.start_clock()

    def start_clock(self, earlier_seconds: float = 0.0) -> None:
        """Count training time from now, on top of ``earlier_seconds`` (interrupted attempts)."""
        self._earlier_seconds, self._started = earlier_seconds, time.perf_counter()

    def seconds(self) -> float:
        """Training seconds of this attempt and of the attempts it resumes."""
        return self._earlier_seconds + time.perf_counter() - self._started

    def dead(self) -> Tensor:
        """[d_sae] bool: latents silent for at least ``dead_tokens`` tokens they could have fired
        on (Gao et al., A.2; for Switch, tokens routed to the latent's expert)."""
        return self.silent_tokens >= self.dead_tokens

    def record(self, result: StepResult, x_raw: Tensor) -> None:
        self.silent_tokens.add_(result.seen).masked_fill_(result.fired, 0)
        self.tokens += distributed.global_count(x_raw.shape[0], x_raw.device)
        self.window.append(result.metrics)
        self.final.append(result.metrics)
        self.recent_raw.append(x_raw)

    def pop_window(self) -> dict[str, float]:
        """Mean of each metric since the last call."""
        means = {key: _mean([m[key] for m in self.window]) for key in self.window[0]}
        self.window = []
        return means

    def state_dict(self) -> dict[str, Any]:
        """The book-keeping a checkpoint keeps: silent_tokens ([d_sae] int64, CPU), window,
        final, min_kept. Not steps, tokens, time (the checkpoint has them) nor recent_raw (a
        resumed run replays those batches)."""
        return {
            "silent_tokens": self.silent_tokens.cpu().clone(),
            "window": [dict(m) for m in self.window],
            "final": [dict(m) for m in self.final],
            "min_kept": list(self.min_kept),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.silent_tokens.copy_(saved["silent_tokens"])
        self.window = [dict(m) for m in saved["window"]]
        self.final = deque((dict(m) for m in saved["final"]), maxlen=_FINAL_STEPS)
        self.min_kept = list(saved["min_kept"])


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _next_batch(batches: Iterator[Tensor], step: int, d_in: int, device: torch.device) -> Tensor:
    """Next raw batch as float32 ``[batch, d_in]`` on ``device``. To a CUDA device, through
    page-locked (pinned) host memory: a non-blocking copy from pageable memory is staged and
    synchronous, from pinned memory it is queued on the stream and the host goes on."""
    try:
        x_BD = next(batches)
    except StopIteration:
        raise ValueError(f"train_sae: the batch iterator ran out at step {step}") from None
    if x_BD.ndim != 2 or x_BD.shape[1] != d_in:
        raise ValueError(f"train_sae: batches must be [batch, {d_in}], got {tuple(x_BD.shape)}")
    if device.type == "cuda" and x_BD.device.type == "cpu" and not x_BD.is_pinned():
        x_BD = x_BD.pin_memory()
    return x_BD.to(device=device, dtype=torch.float32, non_blocking=True)


class _Counted:
    """An iterator that counts the items taken from it."""

    def __init__(self, items: Iterator[Tensor]) -> None:
        self.items, self.taken = items, 0

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Tensor:
        item = next(self.items)
        self.taken += 1
        return item


def _init_scale_and_b_dec(
    sae: SparseAutoencoder,
    batches: Iterator[Tensor],
    cfg: TrainConfig,
    device: torch.device,
    init_batches: Iterator[Tensor] | None = None,
) -> tuple[float, Iterator[Tensor]]:
    """Estimate the input scale on (and consume) the first ``cfg.scale_tokens`` tokens, then set
    b_dec to the geometric median of the next, scaled batch, which stays first in the returned
    iterator; that batch's pre-activations then initialise the activation
    (:meth:`~saelab.sae.activations.SparsityActivation.init_from_batch_`, e.g. JumpReLU's θ).

    ``init_batches`` (data-parallel training): the *global* batches of which ``batches`` yields
    this rank's slices. The scale and the inits are computed on them, identically on every rank
    (so they equal one process's without a broadcast), and ``batches`` skips the slices of the
    batches they consumed."""
    full = batches if init_batches is None else _Counted(init_batches)
    scale = estimate_input_scale(full, cfg.scale_tokens)
    first_BD = own_BD = _next_batch(full, 0, sae.d_in, device)
    if isinstance(full, _Counted):
        for _ in range(full.taken):  # this rank's slices of the batches just read whole
            own_BD = _next_batch(batches, 0, sae.d_in, device)
    with torch.no_grad():
        sae.init_b_dec_(geometric_median(first_BD * scale))
        sae.activation.init_from_batch_(sae.encode_pre(first_BD * scale), sae.b_enc)
    return scale, itertools.chain([own_BD], batches)


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
    """L0 and FVU of the (folded) SAE's inference function on raw batches: what users of the
    saved SAE get."""
    l0s, fvus = [], []
    for x_BD in raw_batches:
        out = sae.infer(x_BD)
        l0s.append(float(distributed.global_mean((out.acts > 0).sum(dim=1).float())))
        fvus.append(float(fvu(x_BD, out.recon)))
    return {"inference_l0_train": _mean(l0s), "inference_fvu_train": _mean(fvus)}


def _log(tracker: Tracker, bar: tqdm, state: _LoopState, lr: float) -> None:
    """Log the window's means, the dead fraction and ``lr`` at step ``state.steps``."""
    tok_per_s = state.tokens / state.seconds()
    metrics = {f"train/{key}": value for key, value in state.pop_window().items()}
    metrics["train/dead_fraction"] = float(state.dead().float().mean())
    metrics["train/lr"] = lr
    tracker.log_metrics(metrics, step=state.steps)
    bar.set_postfix(
        fvu=f"{metrics['train/fvu']:.3f}", l0=f"{metrics['train/l0']:.1f}", tok_s=f"{tok_per_s:.0f}"
    )


@contextmanager
def _signals_held(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then handle them as they would have been
    (Ctrl-C raises KeyboardInterrupt; the CLI turns SIGTERM into SystemExit), so an interrupt
    never leaves a training step half done. If the block raises, held signals are dropped (its
    exception ends the step anyway). Python runs signal handlers in the main thread only:
    elsewhere nothing can interrupt the block and this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append((signum, frame))

    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum, frame in held:
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:  # SIG_DFL, or a handler not installed from Python
            signal.raise_signal(signum)


def _rng_states(sae: SparseAutoencoder, device: torch.device) -> dict[str, Tensor | None]:
    """torch's CPU RNG, the CUDA device's (None on CPU) and the activation's own (or None)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "activation": sae.activation.rng_state()}


def _set_rng_states(
    sae: SparseAutoencoder, rng: dict[str, Tensor | None], device: torch.device
) -> None:
    """Inverse of :func:`_rng_states`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    sae.activation.set_rng_state(rng["activation"])


class _Run:
    """One attempt at :func:`train_sae`'s loop: its objects, one step, its checkpoints."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        cfg: TrainConfig,
        tracker: Tracker,
        scale: float,
        device: torch.device,
        checkpoint_dir: Path | None,
        fingerprint: str,
    ) -> None:
        self.sae, self.cfg, self.tracker, self.scale, self.device = sae, cfg, tracker, scale, device
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        self.saved_step: int | None = None  # step of the checkpoint on disk, when known
        self.peak_lr = cfg.lr if cfg.lr is not None else auto_lr(sae.d_sae)
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        # fused: one kernel over all parameters (~7x faster than the default foreach on CPU)
        self.optimizer = SAEAdam(param_groups(sae), lr=self.peak_lr, betas=betas, fused=True)
        n_steps = cfg.n_steps
        self.threshold_start = n_steps - max(1, math.ceil(n_steps * cfg.threshold_fraction))
        self.state = _LoopState(sae.d_sae, cfg.dead_tokens, device)
        self.step_kwargs = {
            "k_aux": cfg.k_aux,
            "aux_coef": cfg.aux_coef,
            "grad_clip": cfg.grad_clip,
            "autocast": autocast_dtype(cfg.autocast, device),
        }

    def run(self, batches: Iterator[Tensor]) -> None:
        """Steps ``state.steps`` to ``n_steps - 1``; a checkpoint every ``checkpoint_every``
        steps, and one on KeyboardInterrupt / SystemExit (then re-raised)."""
        n_steps, done = self.cfg.n_steps, self.state.steps
        bar = tqdm(range(done, n_steps), initial=done, total=n_steps, unit="step",
                   desc=f"train {self.sae.variant}", disable=distributed.rank() != 0)  # fmt: skip
        mid_step = False
        try:
            for step in bar:
                x_raw_BD = _next_batch(batches, step, self.sae.d_in, self.device)
                with _signals_held():
                    mid_step = True
                    self.step(x_raw_BD, bar)
                    mid_step = False
                if self._checkpoint_due():
                    self.save()
        except (KeyboardInterrupt, SystemExit):
            self._save_on_interrupt(mid_step)
            raise

    def step(self, x_raw_BD: Tensor, bar: tqdm) -> None:
        """Train step number ``state.steps`` on the raw batch ``[batch, d_in]``; log if due."""
        cfg, state, optimizer = self.cfg, self.state, self.optimizer
        step = state.steps
        lr = lr_at(step, cfg.n_steps, self.peak_lr, cfg.warmup_steps, cfg.lr_decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x_BD = x_raw_BD * self.scale
        activation = self.sae.activation
        if isinstance(activation, BatchTopK):  # the unrestricted θ only on the averaged steps
            activation.estimating = step >= self.threshold_start
        warmup = sparsity_warmup_factor(step, cfg.n_steps, activation.sparsity_warmup)
        result = train_step(
            self.sae, optimizer, x_BD, state.dead(), sparsity_scale=warmup, **self.step_kwargs
        )
        state.record(result, x_raw_BD)
        min_kept = getattr(self.sae.activation, "last_min_kept", None)
        if step >= self.threshold_start and min_kept is not None:
            state.min_kept.append(float(min_kept))
        state.steps = step + 1
        if state.steps % cfg.log_every == 0 or state.steps == cfg.n_steps:
            _log(self.tracker, bar, state, lr)

    def _checkpoint_due(self) -> bool:
        every, steps = self.cfg.checkpoint_every, self.state.steps
        due = every > 0 and steps % every == 0 and steps < self.cfg.n_steps
        return self.checkpoint_dir is not None and due

    def save(self) -> None:
        """Write the checkpoint of the state after ``state.steps`` completed steps (rank 0 only
        in data-parallel training: the state is the same on every rank)."""
        assert self.checkpoint_dir is not None
        state = self.state
        if distributed.rank() != 0:
            self.saved_step = state.steps
            return
        trainer_state = TrainerState(
            step=state.steps, tokens=state.tokens, seconds=state.seconds(),
            input_scale=self.scale, optimizer=self.optimizer.state_dict(),
            loop=state.state_dict(), rng=_rng_states(self.sae, self.device),
            mlflow_run_id=self.tracker.run_id, fingerprint=self.fingerprint,
        )  # fmt: skip
        save_checkpoint(self.checkpoint_dir, self.sae, trainer_state)
        self.saved_step = state.steps

    def _save_on_interrupt(self, mid_step: bool) -> None:
        """Checkpoint an interrupted run, unless nothing is new or a step was left half done
        (its update partly applied: not a state of the run; the checkpoint on disk stays)."""
        steps = self.state.steps
        if self.checkpoint_dir is None or steps in (0, self.saved_step):
            return
        if mid_step:
            logger.warning("interrupted inside step %d: no checkpoint of it", steps + 1)
            return
        logger.warning("interrupted after step %d of %d: checkpointing", steps, self.cfg.n_steps)
        self.save()

    def resume(self, checkpoint: Checkpoint, batches: Iterator[Tensor]) -> bool:
        """Restore ``checkpoint`` and skip the batches it has trained on (the last
        ``_INFERENCE_L0_BATCHES`` of them kept for the summary, as in a run that never
        stopped): True. False, with a warning, when its input scale is not this run's (the
        batches differ), leaving the run fresh."""
        saved, state = checkpoint.state, self.state
        if saved.input_scale != self.scale:
            logger.warning(
                "not resuming: the checkpoint's input scale %r is not this run's %r (other "
                "data?); starting fresh", saved.input_scale, self.scale,
            )  # fmt: skip
            return False
        self.sae.load_state_dict(checkpoint.sae_state)
        self.optimizer.load_state_dict(saved.optimizer)
        state.load_state_dict(saved.loop)
        state.steps, state.tokens, self.saved_step = saved.step, saved.tokens, saved.step
        for step in range(saved.step):
            state.recent_raw.append(_next_batch(batches, step, self.sae.d_in, self.device))
        _set_rng_states(self.sae, saved.rng, self.device)  # after the replay, which may draw
        state.start_clock(saved.seconds)
        logger.info("resumed from the checkpoint at step %d of %d", saved.step, self.cfg.n_steps)
        return True


def train_sae(
    sae: SparseAutoencoder,
    batches: Iterable[Tensor],
    cfg: TrainConfig,
    tracker: Tracker,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    data_id: Any = None,
    global_batches: Iterable[Tensor] | None = None,
) -> dict[str, float]:
    """Train ``sae`` in place on raw activation batches ``[cfg.batch_size, d_in]``.

    Consumes ``cfg.scale_tokens`` tokens for the input scale, then ``cfg.n_steps`` batches (the
    first also sets b_dec and initialises the activation). Logs
    ``train/{loss,fvu,aux_loss,sparsity_loss,l0}`` (means since the last log),
    ``train/dead_fraction`` and ``train/lr`` every ``cfg.log_every`` steps. On return the input
    scale is folded into the weights, BatchTopK's (Sampled's) threshold is set, and the SAE acts
    on raw activations (in eval mode, so that ``sae(x)`` is its inference function ``infer``).

    Checkpoints (:mod:`saelab.checkpoint`), when ``checkpoint_dir`` is given: one every
    ``cfg.checkpoint_every`` steps, and one when KeyboardInterrupt or SystemExit (SIGTERM in the
    CLI) stops the loop, which is then re-raised; SIGINT / SIGTERM are held during a step, so
    only states after a completed step are saved. A checkpoint found there at the start, whose
    fingerprint matches (the SAE's shape and variant, ``cfg`` but for checkpoint_every,
    log_every and device, the device type and ``data_id``, a JSON-serialisable identity of the
    batches), is resumed: the run does the same scale estimate and b_dec init as a fresh one,
    restores weights, Adam, the RNGs and the loop's book-keeping, skips the batches already
    trained on (so ``batches`` must replay the same stream) and sets the tracker tag
    ``resumed_from_step``; it ends with the weights of a run that never stopped. A checkpoint
    that does not match, or cannot be read, is ignored with a warning. On completion the
    checkpoint directory is removed.

    Data-parallel training (``torch.distributed`` initialised, e.g. under torchrun): pass
    ``global_batches``, the stream of whole batches, and as ``batches`` this rank's slices of
    the same stream (disjoint, in rank order; ``ShuffledBatches(part=...)``). The input scale
    and the inits are computed on the whole batches, identically on every rank; every step is
    over the global batch (:func:`train_step`); rank 0 alone writes (and removes) checkpoints,
    every rank resumes from them. The returned SAE and summary are the same on every rank and
    equal one process's on the whole batches up to the order of floating-point sums
    (``tests/test_distributed.py``). A checkpoint does not depend on the number of processes.

    Returns:
        steps, tokens, input_scale, lr (peak), fvu / l0 / aux_loss / sparsity_loss (train, mean
        of the final steps), dead_fraction, seconds and tokens_per_s (training time of every
        attempt, without the replay), inference_l0_train / inference_fvu_train (the returned
        SAE on the last training batches, raw units) and, for BatchTopK and Sampled, threshold.
    """
    run_fingerprint = fingerprint(sae, cfg, device, data_id)
    checkpoint = None
    if checkpoint_dir is not None:  # read before seeding: SparseAutoencoder.load draws an init
        checkpoint = load_checkpoint(checkpoint_dir, run_fingerprint)
    torch.manual_seed(cfg.seed)
    sae.to(device).train()
    with distributed.data_parallel(global_batches is not None):
        whole = None if global_batches is None else iter(global_batches)
        scale, it = _init_scale_and_b_dec(sae, iter(batches), cfg, device, whole)
        del whole  # its shuffle buffer
        run = _Run(sae, cfg, tracker, scale, device, checkpoint_dir, run_fingerprint)
        if checkpoint is not None and run.resume(checkpoint, it):
            tracker.set_tags({"resumed_from_step": str(run.state.steps)})
        distributed.barrier()  # every rank has read the checkpoint before rank 0 writes one
        logger.info(
            "training %s SAE: steps %d to %d, input scale %.4g",
            sae.variant, run.state.steps + 1, cfg.n_steps, scale,
        )  # fmt: skip
        run.run(it)
        distributed.barrier()
        if checkpoint_dir is not None and distributed.rank() == 0:
            remove_checkpoint(checkpoint_dir)
        return _finish(sae, run.state, scale, run.peak_lr, cfg.n_steps)


def _finish(
    sae: SparseAutoencoder, state: _LoopState, scale: float, peak_lr: float, n_steps: int
) -> dict[str, float]:
    """Set the threshold, fold the input scale, measure the returned SAE; the run summary."""
    threshold = _set_threshold(sae, state.min_kept)
    sae.fold_input_scale_(scale)
    seconds = state.seconds()
    summary = {
        "steps": float(n_steps),
        "tokens": float(state.tokens),
        "input_scale": scale,
        "lr": peak_lr,
        **{
            key: _mean(m[key] for m in state.final)
            for key in ("fvu", "l0", "aux_loss", "sparsity_loss")
        },
        "dead_fraction": float(state.dead().float().mean()),
        "seconds": seconds,
        "tokens_per_s": state.tokens / seconds,
        **_inference_metrics(sae, state.recent_raw),
    }
    sae.eval()
    if threshold is not None:
        summary["threshold"] = threshold
    logger.info(
        "trained %s SAE: %s",
        sae.variant,
        ", ".join(f"{key}={value:.4g}" for key, value in summary.items()),
    )
    return summary
