"""The sink rule for splicing an exported SAE into a model, in plain torch.

Our numbers are measured with the SAE's reconstruction spliced in at every token but the
attention sinks (README, *Attention sinks*): position 0 (when the SAE's metadata
``seqpos_slice`` is ``[1, null]``) and every later token whose activation norm exceeds the SAE's
``saelab_max_norm`` keep their original activation. A user who splices an exported SAE at
every token (SAELens's default) measures something else: our ``delta_ce_all_spliced`` metric.

This module imports torch alone, so it can be copied beside a SAELens checkout, or imported
from saelab's ``src`` with nothing else of saelab installed. Usage with SAELens and
TransformerLens (``sae`` from ``SAE.load_from_disk`` of a ``saelab export``)::

    from saelab.sink_rule import saelens_hook
    logits = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.metadata.hook_name,
                                                      saelens_hook(sae))])

and in plain torch, ``x`` the activations ``[batch, seq, d_in]`` at the hookpoint and
``reconstruct`` any function ``[n, d_in] float32 -> [n, d_in]``::

    from saelab.sink_rule import splice_with_sink_rule
    spliced = splice_with_sink_rule(x, reconstruct, max_norm=meta["saelab_max_norm"],
                                    exclude_first_position=True)

Norms are L2 norms of the float32 activations in the model's units (``max_norm`` is saved in
those units, see ``saelab.store.sink_norm``); a token is a sink when its norm is strictly
greater than ``max_norm``. This is the rule of ``saelab.capture.splice_fn``, which the
evaluation uses (tested equal).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor


def sink_mask(x: Tensor, max_norm: float | None, exclude_first_position: bool) -> Tensor:
    """``[batch, seq] bool``: True where ``x`` [batch, seq, d_in] keeps its original activation
    (position 0 when ``exclude_first_position``; norm > ``max_norm``; None: no norm cut)."""
    kept = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    if exclude_first_position:
        kept[:, 0] = True
    if max_norm is not None:
        kept |= x.float().norm(dim=-1) > max_norm
    return kept


def splice_with_sink_rule(
    x: Tensor,
    reconstruct: Callable[[Tensor], Tensor],
    max_norm: float | None,
    exclude_first_position: bool = True,
) -> Tensor:
    """``x`` [batch, seq, d_in] (any float dtype) with every token replaced by
    ``reconstruct(x_tokens.float())`` except the sinks of :func:`sink_mask`; same shape and
    dtype as ``x``. ``reconstruct``: ``[n, d_in] float32 -> [n, d_in]``."""
    d_in = x.shape[-1]
    recon = reconstruct(x.reshape(-1, d_in).float()).reshape(x.shape).to(x.dtype)
    kept = sink_mask(x, max_norm, exclude_first_position).unsqueeze(-1)
    return torch.where(kept, x, recon)


def rule_of(metadata: Mapping[str, Any] | Any) -> tuple[float | None, bool]:
    """``(max_norm, exclude_first_position)`` from an export's metadata: a ``cfg.json``
    ``metadata`` mapping or SAELens's ``SAEMetadata`` (``sae.cfg.metadata``).

    Raises:
        KeyError: the metadata has no ``saelab_max_norm`` (not a saelab export).
    """
    if "saelab_max_norm" not in metadata:
        raise KeyError("metadata has no saelab_max_norm: not an export of saelab")
    start = (metadata.get("seqpos_slice") or [None])[0]
    return metadata.get("saelab_max_norm"), start == 1


def saelens_hook(sae: Any) -> Callable[..., Tensor]:
    """A TransformerLens forward hook ``(act [batch, seq, d_in], hook) -> act`` that splices the
    SAELens SAE ``sae`` (``sae(x)`` is its reconstruction) under the sink rule of its metadata
    (:func:`rule_of`)."""
    max_norm, exclude_first = rule_of(sae.cfg.metadata)

    def hook_fn(act: Tensor, hook: Any = None) -> Tensor:
        return splice_with_sink_rule(act, sae, max_norm, exclude_first)

    return hook_fn
