"""Sparse autoencoder model and its sparsity strategies."""

from saelab.sae.activations import (
    ACTIVATIONS,
    BatchTopK,
    SparsityActivation,
    TopK,
    make_activation,
)
from saelab.sae.model import SAEOutput, SparseAutoencoder

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "SAEOutput",
    "SparseAutoencoder",
    "SparsityActivation",
    "TopK",
    "make_activation",
]
