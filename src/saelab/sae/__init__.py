"""Sparse autoencoder model and its sparsity strategies."""

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
from saelab.sae.model import SAEOutput, SparseAutoencoder

__all__ = [
    "ACTIVATIONS",
    "BatchTopK",
    "JumpReLU",
    "ReLU",
    "SAEOutput",
    "Sampled",
    "SparseAutoencoder",
    "SparsityActivation",
    "TopK",
    "make_activation",
]
