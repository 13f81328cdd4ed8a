"""Training: the loop :func:`train_sae` around the step :func:`~saelab.train_step.train_step`.

The loop follows the recipe shared by Gao et al. 2024 (TopK SAEs) and Bussmann et al. 2024
(BatchTopK): inputs scaled so that E||x||^2 = d_in, b_dec initialised at the geometric median of a
first batch, Adam, FVU loss plus the AuxK loss on dead latents (top-k families) and the
activation's own sparsity loss (L1 for ReLU, L0 for JumpReLU; both warmed up), decoder rows kept
at unit norm with the parallel gradient removed (but for ReLU + L1, Conerly et al. 2024), linear
warm-up and linear decay of the learning rate. At the end the input scale is folded into the
weights, so the returned SAE acts on raw activations.

The concerns live in their own modules, re-exported here (``from saelab.train import ...``):
the step and the Adam groups (:mod:`saelab.train_step`), the losses (:mod:`saelab.sae.losses`),
the schedules (:mod:`saelab.schedule`), the data-dependent init (:mod:`saelab.train_init`), the
signal holding and RNG capture (:mod:`saelab.train_faults`) and the checkpoint files
(:mod:`saelab.checkpoint`). This module keeps the loop: its book-keeping, one attempt with its
checkpoints and resume, and the run summary.

Shapes: ``batch`` tokens, ``d_in`` input width, ``d_sae`` latents; tensors are float32.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from saelab.config import TrainConfig, native_bf16
from saelab.optim import SAEAdam
from saelab.sae.activations import BatchTopK
from saelab.sae.losses import auxk_loss, fvu
from saelab.sae.model import SparseAutoencoder
from saelab.schedule import auto_lr, lr_at, sparsity_warmup_factor
from saelab.train_faults import rng_states, set_rng_states, signals_held
from saelab.train_init import estimate_input_scale, geometric_median
from saelab.train_step import StepResult, param_groups, train_step

__all__ = [  # the training API, from the modules it lives in (module docstring)
    "StepResult", "auto_lr", "autocast_dtype", "auxk_loss", "estimate_input_scale", "fvu",
    "geometric_median", "lr_at", "param_groups", "sparsity_warmup_factor", "train_sae",
    "train_step",
]  # fmt: skip

if TYPE_CHECKING:
    from saelab.tracking import Tracker

logger = logging.getLogger(__name__)

_FINAL_STEPS = 10  # steps averaged for the summary's final train fvu / l0
_INFERENCE_L0_BATCHES = 4  # last training batches on which the inference function is measured


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``train.autocast`` -> the autocast dtype for ``device``, or None for float32.

    ``auto``: bfloat16 where :func:`saelab.config.native_bf16` holds (a CUDA GPU with bf16
    tensor cores, a CPU with AVX512-BF16 or AMX; the rule ``model.dtype: auto`` uses too), else
    None."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if native_bf16(device) else None


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
        # fused: one kernel over all parameters (faster than the default foreach on CPU;
        # docs/performance.md)
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
                with signals_held():
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
            loop=state.state_dict(), rng=rng_states(self.sae, self.device),
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
        set_rng_states(self.sae, saved.rng, self.device)  # after the replay, which may draw
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
    over the global batch (:func:`~saelab.train_step.train_step`); rank 0 alone writes (and removes)
    checkpoints, every rank resumes from them. The returned SAE and summary are the same on every
    rank and equal one process's on the whole batches up to the order of floating-point sums
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
