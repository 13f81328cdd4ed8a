"""Training schedules: the learning rate (its size from d_sae, warm-up and linear decay) and the
sparsity loss's warm-up factor, as functions of the 0-based step."""

from __future__ import annotations

import math


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
