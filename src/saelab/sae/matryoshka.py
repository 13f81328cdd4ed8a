"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", sec. 3; Nabeshima 2024, "Matryoshka Sparse
Autoencoders", noanabeshima/matryoshka-saes): nested dictionary prefixes, each trained to
reconstruct the input on its own.

The ``d_sae`` latents are ordered; prefix ``m`` is latents ``[0, w_m)`` for the widths
``w_1 < ... < w_M = d_sae``, ``w_m = round(f_m * d_sae)`` from ``prefix_fractions`` ``f``.
Selection is BatchTopK's over the whole dictionary (Bussmann et al. 2024, sec. 3: the
``k * batch`` largest of relu(pre_acts) in the batch), so the codes are BatchTopK's; the prefix
reconstructions use the same codes truncated to the prefix (paper, sec. 3, eq. 3):

    x̂_m = b_dec + Σ_{i < w_m} f_i(x) W_dec,i        (x̂_M is the SAE's reconstruction)
    L = Σ_{m=1..M} FVU(x, x̂_m) + α L_AuxK

The paper sums squared errors over the prefixes, SAELens's ``MatryoshkaBatchTopKTrainingSAE``
adds each inner level's MSE to the outer loss: a sum, as here, not a mean. The trainer's loss is
``FVU(x, x̂_M) + aux + sparsity``; this SAE's ``sparsity_loss`` returns the inner terms
``Σ_{m<M} FVU(x, x̂_m)`` (so ``sparsity_loss`` in the training metrics is that sum). FVU in place
of the squared error is the project's loss for every variant (``saelab.sae.losses.fvu``); AuxK takes
the full reconstruction's residual, as the reference code does. Inference is BatchTopK's: one
global threshold θ estimated over the last steps (exported to SAELens as ``jumprelu``).

Default prefixes (``params.yaml``): fractions 1/16, 1/8, 1/4, 1/2, 1 of ``d_sae``, the group sizes
``d/16, d/16, d/8, d/4, d/2`` of the reference code's Gemma run (bartbussmann/matryoshka_sae,
``main.py``). With one prefix (``[1.0]``) the SAE is BatchTopK exactly (tested bit for bit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from saelab.sae.activations import BatchTopK
from saelab.sae.losses import fvu
from saelab.sae.model import SAEOutput, SparseAutoencoder, SparseOutput
from saelab.sae.registry import HParam, VariantSpec, Violation, register
from saelab.sae.sparse import SparseCode, offsets_of, sparse_decode


def _fractions_ok(fractions: Sequence[float]) -> bool:
    """Non-empty, strictly increasing, in (0, 1], ending with 1."""
    f = list(fractions)
    increasing = all(a < b for a, b in zip(f, f[1:], strict=False))
    return bool(f) and increasing and 0 < f[0] and f[-1] == 1.0


def prefix_widths(fractions: Sequence[float], d_sae: int) -> tuple[int, ...]:
    """The prefix widths ``round(f * d_sae)`` of ``fractions`` (the last is ``d_sae``).

    Raises:
        ValueError: the fractions are not increasing in (0, 1] ending with 1, or two widths
            round to the same number or to 0.
    """
    if not _fractions_ok(fractions):
        raise ValueError(f"prefix_fractions must increase in (0, 1] to 1.0, got {fractions}")
    widths = tuple(round(f * d_sae) for f in fractions)
    if widths[0] < 1 or len(set(widths)) != len(widths):
        raise ValueError(f"prefix widths {widths} of d_sae={d_sae} must be distinct and >= 1")
    return widths


class MatryoshkaBatchTopK(BatchTopK):
    """BatchTopK selection with nested prefixes (module docstring); the prefixes only change
    the loss (:class:`MatryoshkaSAE`), so forward, select and θ are BatchTopK's.

    Args:
        k: target mean L0 over the batch.
        prefix_fractions: increasing fractions of ``d_sae`` in (0, 1], the last 1.0.

    Raises:
        ValueError: k <= 0 or bad fractions (at :meth:`bind`, with d_sae: widths that collide).
    """

    variant = "matryoshka"

    def __init__(self, k: int, prefix_fractions: Sequence[float]) -> None:
        super().__init__(k)
        if not _fractions_ok(prefix_fractions):
            raise ValueError(
                f"MatryoshkaBatchTopK: prefix_fractions must increase in (0, 1] to 1.0, "
                f"got {prefix_fractions}"
            )
        self.prefix_fractions = tuple(float(f) for f in prefix_fractions)
        self.widths: tuple[int, ...] = ()

    def bind(self, d_sae: int, d_in: int | None = None) -> None:
        """Set :attr:`widths` for ``d_sae`` latents (:func:`prefix_widths`)."""
        self.widths = prefix_widths(self.prefix_fractions, d_sae)

    def hparams(self) -> dict[str, Any]:
        return {"prefix_fractions": list(self.prefix_fractions)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, widths={list(self.widths)}"


class MatryoshkaSAE(SparseAutoencoder):
    """A :class:`SparseAutoencoder` whose training penalty is the inner prefixes' FVU
    (module docstring); built with a :class:`MatryoshkaBatchTopK` activation."""

    activation: MatryoshkaBatchTopK

    def sparsity_loss(self, x: Tensor, out: SAEOutput | SparseOutput) -> Tensor:
        """``Σ_{m<M} FVU(x, x̂_m)`` for ``x [batch, d_in]`` and ``out`` = ``self(x)`` or
        ``self.forward_sparse(x)`` (scalar float32 attached to the graph; 0 with one prefix).
        The reconstructions come from :meth:`inner_recons`."""
        recons = self.inner_recons(out, x.shape[0])
        if not recons:
            return x.new_zeros(())
        return torch.stack([fvu(x, r.float()) for r in recons]).sum()

    def inner_recons(self, out: SAEOutput | SparseOutput, batch: int) -> list[Tensor]:
        """The inner prefixes' reconstructions ``x̂_1 .. x̂_{M-1}`` [batch, d_in] of a dense or
        sparse forward's codes, as running sums of one decode per group of latents
        ``[w_{m-1}, w_m)``: each selected entry is decoded once, whatever M."""
        widths = self.activation.widths
        if len(widths) < 2:
            return []
        if isinstance(out, SparseOutput):
            parts = self._group_decodes_sparse(out.code, widths[:-1], batch)
        else:
            bounds = zip((0, *widths[:-2]), widths[:-1], strict=True)
            parts = [out.acts[:, s:e] @ self.W_dec[s:e] for s, e in bounds]
        recons, running = [], self.b_dec
        for part_BD in parts:
            running = running + part_BD
            recons.append(running)
        return recons

    def _group_decodes_sparse(
        self, code: SparseCode, ends: Sequence[int], batch: int
    ) -> list[Tensor]:
        """``Σ_{entries with w_{m-1} <= col < w_m} value W_dec[col]`` [batch, d_in] per inner
        group m (:func:`~saelab.sae.sparse.sparse_decode` of that group's entries, zero bias)."""
        ends_G = torch.tensor(ends, device=code.cols.device)
        group_N = torch.bucketize(code.cols, ends_G, right=True)
        zero_D = self.b_dec.detach().new_zeros(self.d_in)
        parts = []
        for m in range(len(ends)):
            keep_N = group_N == m
            rows = code.rows[keep_N]
            sub = SparseCode(code.values[keep_N], rows, code.cols[keep_N], offsets_of(rows, batch))
            parts.append(sparse_decode(sub, self.W_dec, zero_D))
        return parts


def _width_constraints(hparams: Mapping[str, Any], k: int, d_sae: int) -> list[Violation]:
    """The prefixes' widths at ``sae.d_sae`` are distinct and >= 1."""
    try:
        prefix_widths(hparams["prefix_fractions"], d_sae)
    except ValueError:
        return [(
            "variant_params.matryoshka.prefix_fractions",
            f"fractions whose widths round(f * sae.d_sae) at sae.d_sae={d_sae} are distinct "
            "and >= 1",
        )]  # fmt: skip
    return []


register(VariantSpec(
    "matryoshka", model=MatryoshkaSAE, activation=MatryoshkaBatchTopK, saelens="jumprelu",
    params_class="MatryoshkaParams", constraints=_width_constraints,
    hparams=(
        HParam(
            "prefix_fractions", tuple[float, ...], "nested prefix widths / d_sae",
            check=_fractions_ok, allowed="a strictly increasing list of numbers in (0, 1] "
            "ending with 1.0",
        ),
    ),
    source="Bussmann et al. 2025; Nabeshima 2024",
    rule="BatchTopK over the whole dictionary; the loss sums the FVU of the reconstructions "
    "by nested prefixes of the latents (`prefix_fractions` of `d_sae`); at inference "
    "BatchTopK's global θ",
))  # fmt: skip
