"""Data-dependent initialisation of a training run: the input scale (E||c x||^2 = d_in) and the
geometric median that b_dec starts at (Gao et al. 2024, sec. 2.4; Bussmann et al. 2024).

Shapes: batches ``[batch, d_in]``; float64 accumulation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from torch import Tensor

logger = logging.getLogger(__name__)


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
    """Geometric median of the rows of ``x [batch, d_in]`` -> ``[d_in]`` (x's dtype).

    Weiszfeld's algorithm (Weiszfeld 1937), started at the mean, at most ``n_iter`` iterations,
    float64 internally: ``y <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / ||x_i - y||``. Stops
    when a step moves y by less than ``rel_tol`` times the mean distance to the points. Used to
    initialise b_dec (Gao et al. 2024, sec. 2.4; Bussmann et al. 2024).
    """
    x_BD = x.double()
    y_D = x_BD.mean(dim=0)
    for _ in range(n_iter):
        dist_B = (x_BD - y_D).norm(dim=1).clamp_min(1e-12)
        weight_B = 1.0 / dist_B
        new_y_D = (weight_B @ x_BD) / weight_B.sum()
        moved = float((new_y_D - y_D).norm())
        y_D = new_y_D
        if moved <= rel_tol * float(dist_B.mean()):
            break
    return y_D.to(x.dtype)
