"""Sparse training path: encoder and decoder work only on the selected latents.

The physical floor of a TopK step is one dense encoder GEMM (``[batch, d_in] x [d_in, d_sae]``),
which every latent's pre-activation needs for the selection. Everything after it can be sparse:
with ``nnz`` selected (token, latent) pairs (``k * batch`` for TopK and BatchTopK),

- the decoder is a sum of ``nnz`` scaled rows of ``W_dec`` (``F.embedding_bag``), not a
  ``[batch, d_sae] x [d_sae, d_in]`` GEMM, and its gradients (``W_dec``: ``nnz`` rank-1 rows;
  the codes: ``nnz`` dot products) come from ``embedding_bag``'s own backward;
- the encoder gradient is ``sum_e g_e (x_{r_e} - b_dec)`` into column ``c_e`` of ``W_enc``: a
  sparse ``[d_sae, batch]`` x dense ``[batch, d_in]`` product (torch's sparse matmul), not a
  ``[d_in, batch] x [batch, d_sae]`` GEMM; non-selected latents get exactly zero gradient, as
  through the dense ``topk`` + ``scatter``.

So no dense ``[batch, d_sae]`` tensor is built besides the pre-activations themselves, which are
computed without autograd (no saved copy). This is what EleutherAI/sparsify does for its encoder
backward; here the decoder backward and the bias gradients are sparse too. The dense path
(:meth:`SparseAutoencoder.forward`) stays the reference and the inference path; tests check
that both give the same reconstruction and the same gradient for every parameter.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCode(NamedTuple):
    """The active latents of a batch, token-major (``nnz`` entries, sorted by token).

    values: [nnz] float32 acts (>= 0; zero for a selected entry whose pre-activation is <= 0),
    attached to the graph. rows: [nnz] int64 token index, non-decreasing. cols: [nnz] int64 latent
    index. offsets: [batch] int64, index of each token's first entry (``F.embedding_bag``'s
    offsets; a token with no entry has an empty bag).
    """

    values: Tensor
    rows: Tensor
    cols: Tensor
    offsets: Tensor

    def l0(self, batch: int) -> Tensor:
        """Mean number of nonzero acts per token (float32 scalar)."""
        return (self.values > 0).sum().float() / batch

    def fired(self, d_sae: int) -> Tensor:
        """[d_sae] bool: latents with a nonzero act in the batch."""
        fired_S = torch.zeros(d_sae, dtype=torch.bool, device=self.cols.device)
        return fired_S.index_fill_(0, self.cols[self.values > 0], True)

    def to_dense(self, batch: int, d_sae: int) -> Tensor:
        """[batch, d_sae] acts (differentiable in ``values``); for tests and debugging."""
        dense_BS = self.values.new_zeros(batch, d_sae)
        return dense_BS.index_put((self.rows, self.cols), self.values)


def offsets_of(rows: Tensor, batch: int) -> Tensor:
    """[batch] int64 start of each token's entries for non-decreasing ``rows [nnz]`` int64."""
    counts_B = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts_B, 0) - counts_B


def _sparse_mm(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int],
               dense: Tensor) -> Tensor:  # fmt: skip
    """``M @ dense`` for the sparse ``M`` of ``shape`` with ``values [nnz]`` at ``(rows, cols)``
    (an uncoalesced COO matrix: torch's COO matmul orders the entries itself, measured faster
    on CPU than building a CSR matrix with ``torch.sort``)."""
    with warnings.catch_warnings():  # sparse tensors warn about skipped invariant checks
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), values, shape, check_invariants=False
        )
        return torch.sparse.mm(matrix, dense)


class _GatherPreActs(torch.autograd.Function):
    """Pre-activations ``(x - b_dec) @ W_enc + b_enc`` at ``nnz`` (row, col) pairs, given their
    values (computed by the caller without autograd), with the gradient of that formula computed
    sparsely (module docstring).

    x [batch, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in], values [nnz], rows and
    cols [nnz] int64; all float32 except the indices. Output: [nnz] (a copy of ``values``).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
        values: Tensor, rows: Tensor, cols: Tensor,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_N: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        batch, d_sae = x.shape[0], W_enc.shape[1]
        need_x, need_W, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        grad_x = grad_W = grad_b_enc = grad_b_dec = None
        if need_x:  # d/dx_r = sum_e g_e W_enc[:, c_e]
            grad_x = _sparse_mm(rows, cols, grad_N, (batch, d_sae), W_enc.t())
        if need_W:  # column c of W_enc: sum_e g_e (x_{r_e} - b_dec)
            grad_W = _sparse_mm(cols, rows, grad_N, (d_sae, batch), x - b_dec).t()
        if need_b_enc or need_b_dec:
            g_S = grad_N.new_zeros(d_sae).index_add_(0, cols, grad_N)
            grad_b_enc = g_S if need_b_enc else None
            grad_b_dec = -(W_enc @ g_S) if need_b_dec else None
        return grad_x, grad_W, grad_b_enc, grad_b_dec, None, None, None


def gather_pre_acts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
    values: Tensor, rows: Tensor, cols: Tensor,
) -> Tensor:  # fmt: skip
    """The selected pre-activations ``((x - b_dec) @ W_enc + b_enc)[rows, cols]`` [nnz], given
    their ``values`` [nnz] float32 (computed by the caller without autograd, e.g. gathered from
    the dense pre-activations it selected from), differentiable with respect to ``x, W_enc,
    b_enc, b_dec`` as that formula, at the cost of the ``nnz`` selected entries only.

    x [batch, d_in], W_enc [d_in, d_sae], b_enc [d_sae], b_dec [d_in] float32; rows, cols [nnz]
    int64.
    """
    return _GatherPreActs.apply(x, W_enc, b_enc, b_dec, values.detach(), rows, cols)


def sparse_decode(code: SparseCode, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """recon [batch, d_in] = ``sum_e values_e W_dec[cols_e] + b_dec`` per token: ``acts @ W_dec +
    b_dec`` without the dense acts (``F.embedding_bag``, mode sum).

    W_dec: [d_sae, d_in], b_dec: [d_in] float32. Gradients flow to ``code.values``, ``W_dec`` and
    ``b_dec``.
    """
    recon_BD = F.embedding_bag(
        code.cols, W_dec, code.offsets, mode="sum", per_sample_weights=code.values
    )
    return recon_BD + b_dec
