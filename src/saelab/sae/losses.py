"""The training losses every variant shares: FVU, the reconstruction loss, and AuxK on dead
latents (Gao et al. 2024). The variants' own penalties (L1, target L0, load balancing, the
Matryoshka prefixes) are their ``sparsity_loss`` methods.

Shapes: ``x``, ``recon`` [batch, d_in]; scalars are 0-dim tensors attached to the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from saelab import distributed

if TYPE_CHECKING:
    from saelab.sae.model import SparseAutoencoder


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
