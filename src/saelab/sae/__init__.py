"""Sparse autoencoder model and its sparsity strategies.

:func:`build_sae` and :func:`load_sae` are the entry points for every variant, each declared
once in :mod:`saelab.sae.registry` by the module that defines it: the activation-based ones share
:class:`SparseAutoencoder`; ``switch`` is :class:`SwitchSAE`.

Shape suffixes, the one glossary for ``saelab.sae`` and the trainer (dictionary_learning's
convention: ``acts_BS`` is [batch, d_sae]; one letter per dimension, a single letter for a 1-D
tensor, a digit for a literal size):

- ``B`` batch (tokens), ``D`` d_in, ``S`` d_sae (latents), ``K`` k (latents kept per token),
  ``E`` n_experts (Switch);
- ``N`` nnz: the selected (token, latent) entries of a sparse code, flat and token-major
  (:class:`~saelab.sae.sparse.SparseCode`; BatchTopK's ``k * batch`` kept entries);
- ``F`` a flat view of a ``[batch, d_sae]`` tensor (``batch * d_sae`` entries);
- ``C`` candidates, a superset of a selection (top-k kernels, :mod:`saelab.sae.topk`);
- ``M`` the columns of a slice of the dictionary: an expert's ``d_expert`` latents, or ``m``
  per-token candidates;
- ``T`` the tokens routed to one Switch expert; ``X`` the dead latents (AuxK); ``P`` Sampled's
  pool of ``k * l`` features; ``G`` Matryoshka's prefix groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from saelab.config import InputError
from saelab.sae import registry
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
from saelab.sae.model import CONFIG_FILE, WEIGHTS_FILE, SAEOutput, SparseAutoencoder
from saelab.sae.switch import SwitchSAE


def __getattr__(name: str) -> Any:
    """``SAE_VARIANTS``: the registered variants' names (:func:`saelab.sae.registry.names`)."""
    if name == "SAE_VARIANTS":
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_sae(
    variant: str,
    d_in: int,
    d_sae: int,
    k: int,
    hparams: dict[str, Any],
    generator: torch.Generator | None = None,
) -> SparseAutoencoder:
    """A freshly initialised SAE of ``variant`` (a registered variant,
    :mod:`saelab.sae.registry`) with target L0 ``k`` and the variant's hyperparameters
    ``hparams`` (``params.yaml``'s ``variant_params.<variant>``).

    Raises:
        ValueError: unknown variant, or hyperparameters unknown, missing or out of range.
    """
    return registry.get(variant).build(d_in, d_sae, k, hparams, generator)


def read_sae_config(directory: str | Path) -> dict[str, Any]:
    """The ``cfg.json`` mapping of the SAE directory ``directory``.

    Raises:
        InputError: no ``cfg.json``, or it is not a JSON object (the message names the file).
    """
    cfg_path = Path(directory) / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"SAE directory {directory} has no {CONFIG_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def load_sae(directory: str | Path) -> SparseAutoencoder:
    """Read any variant's SAE written by :meth:`SparseAutoencoder.save` (CPU, eval mode).

    Raises:
        InputError: a file is missing, unreadable (a truncated or corrupt ``sae.safetensors``,
            ``cfg.json`` not JSON) or does not describe a valid SAE (what
            :meth:`SparseAutoencoder.load` raises as FileNotFoundError or ValueError); the one-line
            message names the file.
    """
    variant = read_sae_config(directory).get("variant")
    specs = registry.variants()
    cls = specs[variant].sae_class if variant in specs else SparseAutoencoder
    try:
        return cls.load(directory)
    except SafetensorError as e:
        raise InputError(f"{Path(directory) / WEIGHTS_FILE}: unreadable ({e})") from e
    except (FileNotFoundError, KeyError, TypeError) as e:
        raise InputError(f"SAE directory {directory}: {type(e).__name__}: {e}") from e
    except ValueError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"SAE directory {directory}: {e}") from e


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
    "read_sae_config",
]
