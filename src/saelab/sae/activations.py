"""Sparsity strategies: pre-activations -> sparse codes.

Every SAE variant shares one :class:`~saelab.sae.model.SparseAutoencoder`; they differ only in the
module that turns pre-activations into sparse codes. A new variant (JumpReLU, ReLU+L1, Sampled-SAE)
is a new :class:`SparsityActivation` subclass registered in :data:`ACTIVATIONS`.

Shapes: ``batch`` tokens, ``d_sae`` latents. Inputs and outputs are float32 (any float dtype works;
the output has the input's dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Rows of the batch used to find a lower bound for BatchTopK's batch threshold (see
# :func:`_batch_topk_indices`); a speed knob only, the selection is exact whatever it is.
_SAMPLE_ROWS = 128


class SparsityActivation(nn.Module):
    """Base class: ``forward(pre_acts [batch, d_sae]) -> acts [batch, d_sae]``, acts >= 0.

    Subclasses set the class attribute ``variant`` (the name used by :func:`make_activation` and
    stored in ``cfg.json``) and expose ``k``, the target mean number of active latents per token.
    """

    variant: str = ""
    k: int

    def forward(self, pre_acts: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TopK(SparsityActivation):
    """Per token, keep the k largest of relu(pre_acts), zero the rest (Gao et al. 2024, sec. 2.3).

    Exactly k entries per token are kept; fewer are nonzero when a token has fewer than k positive
    pre-activations.
    """

    variant = "topk"

    def __init__(self, k: int) -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"TopK: k must be > 0, got {k}")
        self.k = k

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae], at most k nonzero per row."""
        k = min(self.k, pre_acts.shape[-1])
        # topk before relu selects the same entries as topk after it (relu is monotone); relu on
        # the k kept values only is cheaper than on the whole [batch, d_sae] tensor.
        values_BK, indices_BK = pre_acts.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre_acts).scatter_(-1, indices_BK, values_BK.relu())

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(SparsityActivation):
    """BatchTopK (Bussmann et al. 2024, sec. 3) in training, a global JumpReLU at inference.

    Training mode: keep the ``k * batch`` largest entries of relu(pre_acts) across the whole
    batch, so the batch's mean L0 is k while one token may use more or fewer than k latents. The
    smallest positive kept value of the batch is stored (detached, fp32 scalar tensor, NaN when
    nothing positive was kept) in ``last_min_kept`` for the trainer's threshold estimate.

    Eval mode: ``acts = pre_acts * (pre_acts > threshold)`` with one global threshold θ (the
    ``threshold`` buffer, fp32 scalar, saved with the model), so a token's code no longer depends on
    the rest of its batch. θ is 0 (plain ReLU) until the trainer sets it.
    """

    variant = "batchtopk"
    threshold: Tensor

    def __init__(self, k: int) -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"BatchTopK: k must be > 0, got {k}")
        self.k = k
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.last_min_kept: Tensor | None = None

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae] (see the class docstring)."""
        if not self.training:
            return torch.where(pre_acts > self.threshold, pre_acts, 0.0)
        relu_N = pre_acts.relu().flatten()  # N = batch * d_sae
        with torch.no_grad():
            kept_K = _batch_topk_indices(relu_N.view(pre_acts.shape), self.k * pre_acts.shape[0])
        values_K = relu_N.gather(0, kept_K)
        with torch.no_grad():
            positive = values_K[values_K > 0]
            nan = torch.full((), float("nan"), device=pre_acts.device)
            self.last_min_kept = positive.min().float() if positive.numel() else nan
        return torch.zeros_like(relu_N).scatter_(0, kept_K, values_K).view(pre_acts.shape)

    def extra_repr(self) -> str:
        return f"k={self.k}, threshold={float(self.threshold):.6g}"


def _batch_topk_indices(relu_BD: Tensor, n_keep: int) -> Tensor:
    """Flat indices of the ``n_keep`` largest entries of ``relu_BD [batch, d_sae]`` (>= 0).

    Exact, and cheaper than ``topk`` over all ``batch * d_sae`` entries: a quantile of a few rows
    gives a bound t, and the selection runs over the entries > t only. When fewer than ``n_keep``
    entries exceed t, the kept set is not contained in them and we fall back to the full ``topk``;
    when at least ``n_keep`` do, every one of the ``n_keep`` largest is among them, so the result
    is the same as the full ``topk`` (up to the order of ties, which topk leaves unspecified).
    """
    flat_N = relu_BD.flatten()
    n_keep = min(n_keep, flat_N.numel())
    rows = relu_BD[:: max(1, relu_BD.shape[0] // _SAMPLE_ROWS)].flatten()
    # Aim at twice the kept fraction so that the bound holds with a wide margin.
    frac = min(1.0, 2.0 * n_keep / flat_N.numel())
    rank = max(1, int((1.0 - frac) * rows.numel()))
    bound = rows.kthvalue(rank).values
    candidates_C = (flat_N > bound).nonzero().squeeze(1)
    if candidates_C.numel() < n_keep:
        return flat_N.topk(n_keep, sorted=False).indices
    top = flat_N[candidates_C].topk(n_keep, sorted=False)
    return candidates_C[top.indices]


ACTIVATIONS: dict[str, type[SparsityActivation]] = {
    TopK.variant: TopK,
    BatchTopK.variant: BatchTopK,
}


def make_activation(variant: str, k: int) -> SparsityActivation:
    """Build the sparsity strategy named ``variant`` with target L0 ``k``.

    Raises:
        ValueError: unknown variant (the message lists the allowed ones).
    """
    if variant not in ACTIVATIONS:
        raise ValueError(
            f"unknown SAE variant {variant!r}; allowed: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[variant](k)
