"""Sparse autoencoder model and its sparsity strategies.

:func:`build_sae` and :func:`load_sae` are the entry points for every variant: the five
activation-based ones share :class:`SparseAutoencoder`; ``switch`` is :class:`SwitchSAE`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from saelab.sae.activations import (
    ACTIVATIONS,
    BatchTopK,
    JumpReLU,
    ReLU,
    Sampled,
    SparsityActivation,
    TopK,
    make_activation,
)
from saelab.sae.model import CONFIG_FILE, SAEOutput, SparseAutoencoder
from saelab.sae.switch import SwitchSAE

SAE_VARIANTS = (*ACTIVATIONS, "switch")


def build_sae(
    variant: str,
    d_in: int,
    d_sae: int,
    k: int,
    hparams: dict[str, Any],
    generator: torch.Generator | None = None,
) -> SparseAutoencoder:
    """A freshly initialised SAE of ``variant`` (one of :data:`SAE_VARIANTS`) with target L0 ``k``
    and the variant's hyperparameters ``hparams`` (``params.yaml``'s ``variant_params.<variant>``).

    Raises:
        ValueError: unknown variant, or hyperparameters unknown, missing or out of range.
    """
    if variant == "switch":
        try:
            return SwitchSAE(d_in, d_sae, k, **hparams, generator=generator)
        except TypeError as e:  # an unknown or missing keyword
            raise ValueError(f"switch: bad hyperparameters {sorted(hparams)} ({e})") from e
    return SparseAutoencoder(d_in, d_sae, make_activation(variant, k, **hparams), generator)


def load_sae(directory: str | Path) -> SparseAutoencoder:
    """Read any variant's SAE written by :meth:`SparseAutoencoder.save` (CPU, eval mode).

    Raises:
        FileNotFoundError, ValueError: as :meth:`SparseAutoencoder.load`.
    """
    cfg_path = Path(directory) / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"SAE directory {directory} has no {CONFIG_FILE}")
    variant = json.loads(cfg_path.read_text()).get("variant")
    return (SwitchSAE if variant == "switch" else SparseAutoencoder).load(directory)


__all__ = [
    "ACTIVATIONS",
    "SAE_VARIANTS",
    "BatchTopK",
    "JumpReLU",
    "ReLU",
    "SAEOutput",
    "Sampled",
    "SparseAutoencoder",
    "SparsityActivation",
    "SwitchSAE",
    "TopK",
    "build_sae",
    "load_sae",
    "make_activation",
]
