"""One optimisation step, :func:`train_step`: forward (sparse path when the SAE has one), FVU +
AuxK + the variant's sparsity loss, backward, decoder-gradient projection, clipping, Adam,
decoder renormalisation (Gao et al. 2024, sec. 2.4); and the Adam parameter groups.

Shapes: ``x`` [batch, d_in] float32 (already scaled), ``dead`` [d_sae] bool.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saelab import distributed
from saelab.sae.activations import BatchTopK
from saelab.sae.losses import auxk_loss, fvu
from saelab.sae.model import SAEOutput, SparseAutoencoder, SparseOutput


class StepResult(NamedTuple):
    """metrics: loss, fvu, aux_loss, sparsity_loss, l0 (floats); fired [d_sae] bool: nonzero
    somewhere in x; seen [d_sae] int64: tokens of x each latent could fire on
    (:meth:`~saelab.sae.model.SparseAutoencoder.tokens_seen`)."""

    metrics: dict[str, float]
    fired: Tensor
    seen: Tensor


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
    (:func:`~saelab.schedule.sparsity_warmup_factor`); backward; remove the decoder gradient
    parallel to its rows; clip the gradient norm to ``grad_clip``; optimizer step; renormalise
    decoder rows. The two decoder steps are skipped when the activation has ``unit_norm_decoder``
    false (ReLU + L1, whose recipe leaves the norms free). A BatchTopK (Sampled) activation that is
    ``estimating`` gets its ``last_min_kept`` from float32 pre-activations computed outside
    autocast when the forward ran in bf16
    (:meth:`~saelab.sae.activations.BatchTopK.batch_threshold`). ``aux_loss`` and
    ``sparsity_loss`` in the metrics are the weighted terms, so
    ``loss = fvu + aux_loss + sparsity_loss``; ``l0`` is the mean number of nonzero acts per token.

    ``sparse`` (default): SAEs with a sparse path (``sae.sparse_training``: TopK, BatchTopK,
    Sampled, Switch) use :meth:`~saelab.sae.model.SparseAutoencoder.forward_sparse`, which has
    the dense forward's recon and gradients at a fraction of the cost; False forces the dense
    forward (the reference). ``autocast``: run the forward and the losses under
    ``torch.autocast`` with that dtype (bfloat16; see :func:`~saelab.train.autocast_dtype`),
    None: float32; ignored (float32) for an activation that is not ``autocast_safe`` (JumpReLU).

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
