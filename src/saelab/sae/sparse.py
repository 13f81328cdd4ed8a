"""Sparse training path: encoder and decoder work only on the selected latents.

The physical floor of a TopK step is one dense encoder GEMM (``[batch, d_in] x [d_in, d_sae]``),
which every latent's pre-activation needs for the selection. Everything after it can be sparse:
with ``nnz`` selected (token, latent) pairs (``k * batch`` for TopK and BatchTopK; for ReLU
and JumpReLU the active entries, as many as the batch has, JumpReLU's with the straight-through
estimator's band below θ),

- the decoder is a sum of ``nnz`` scaled rows of ``W_dec`` (``F.embedding_bag``), not a
  ``[batch, d_sae] x [d_sae, d_in]`` GEMM; its gradients are ``nnz`` dot products for the codes
  (``embedding_bag``'s backward) and ``nnz`` scaled rows of the output gradient summed into the
  rows of ``W_dec`` (:func:`weighted_row_sums`);
- the encoder gradient is ``sum_e g_e (x_{r_e} - b_dec)`` into column ``c_e`` of ``W_enc``: a
  sparse ``[d_sae, batch]`` x dense ``[batch, d_in]`` product (:func:`weighted_row_sums`: the
  entries sorted by latent, then one ``F.embedding_bag`` over the rows of ``x - b_dec``), not a
  ``[d_in, batch] x [batch, d_sae]`` GEMM; non-selected latents get exactly zero gradient, as
  through the dense ``topk`` + ``scatter``.

So no dense ``[batch, d_sae]`` tensor is built besides the pre-activations themselves, which are
computed without autograd (no saved copy). This is what EleutherAI/sparsify does for its encoder
backward; here the decoder backward and the bias gradients are sparse too. The dense path
(:meth:`SparseAutoencoder.forward`) stays the reference and the inference path; tests check
that both give the same reconstruction and the same gradient for every parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCode(NamedTuple):
    """The active latents of a batch, token-major (``nnz`` entries, sorted by token).

    values: [nnz] float32 acts (>= 0; zero for a selected entry whose pre-activation is <= 0,
    or, for JumpReLU, below θ), attached to the graph. rows: [nnz] int64 token index,
    non-decreasing. cols: [nnz] int64 latent index. offsets: [batch] int64, index of each
    token's first entry (``F.embedding_bag``'s offsets; a token with no entry has an empty bag).
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


def weighted_row_sums(
    out_index: Tensor, src_index: Tensor, weights: Tensor, src: Tensor, n_out: int
) -> Tensor:
    """``out [n_out, d]`` with ``out[i] = sum_e weights[e] * src[src_index[e]]`` over the
    entries ``e`` with ``out_index[e] == i`` (zero for an ``i`` with none): the product
    ``M @ src`` of the sparse ``M [n_out, len(src)]`` holding ``weights`` at
    ``(out_index, src_index)``.

    Computed as ``F.embedding_bag`` (mode sum) over the entries sorted by ``out_index``: one
    sort of ``nnz`` int64 and one gather-accumulate pass, each output row written once. At the
    encoder gradient's shape (nnz 131,072, src [4096, 768], n_out 16,384) that took 15 ms
    against 66-91 ms for torch's COO ``torch.sparse.mm``, which coalesces a two-key index first
    (``bench/sparse_grad.py``).

    out_index, src_index: [nnz] int64; weights: [nnz] float32; src: [n, d] float32. Output:
    [n_out, d] float32, contiguous.
    """
    order = torch.argsort(out_index, stable=True)
    offsets = offsets_of(out_index[order], n_out)
    return F.embedding_bag(
        src_index[order], src, offsets, mode="sum", per_sample_weights=weights[order]
    )


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
            grad_x = weighted_row_sums(rows, cols, grad_N, W_enc.t(), batch)
        if need_W:  # column c of W_enc: sum_e g_e (x_{r_e} - b_dec); [d_sae, d_in] -> .t()
            grad_W = weighted_row_sums(cols, rows, grad_N, x - b_dec, d_sae).t()
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


class _DecoderBias(torch.autograd.Function):
    """``recon + b_dec`` for ``recon = sum_e values_e W_dec[cols_e]`` per token ``rows_e``
    (computed by the caller from a detached ``W_dec``), giving ``W_dec`` that sum's gradient:
    row c gets ``sum_e values_e grad[rows_e]`` over the entries with ``cols_e == c``
    (:func:`weighted_row_sums`). ``F.embedding_bag``'s own weight gradient zero-fills a
    ``[d_sae, d_in]`` buffer and accumulates into it: the decoder's forward and backward took
    1.25-1.4x as long with it (``bench/sparse_grad.py``).

    recon [batch, d_in], W_dec [d_sae, d_in], b_dec [d_in], values [nnz] float32 (detached);
    rows, cols [nnz] int64. Output: [batch, d_in].
    """

    @staticmethod
    def forward(
        ctx: Any, recon: Tensor, W_dec: Tensor, b_dec: Tensor,
        values: Tensor, rows: Tensor, cols: Tensor,
    ) -> Tensor:  # fmt: skip
        ctx.save_for_backward(values, rows, cols)
        ctx.d_sae = W_dec.shape[0]
        return recon + b_dec

    @staticmethod
    def backward(ctx: Any, grad_BD: Tensor) -> tuple[Tensor | None, ...]:
        values, rows, cols = ctx.saved_tensors
        need_W, need_b = ctx.needs_input_grad[1:3]
        grad_W = weighted_row_sums(cols, rows, values, grad_BD, ctx.d_sae) if need_W else None
        grad_b = grad_BD.sum(0) if need_b else None
        return grad_BD, grad_W, grad_b, None, None, None


def sparse_decode(code: SparseCode, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """recon [batch, d_in] = ``sum_e values_e W_dec[cols_e] + b_dec`` per token: ``acts @ W_dec +
    b_dec`` without the dense acts (``F.embedding_bag``, mode sum).

    W_dec: [d_sae, d_in], b_dec: [d_in] float32. Gradients flow to ``code.values`` (through
    ``embedding_bag``: ``nnz`` dot products), ``W_dec`` (``nnz`` scaled rows, by
    :func:`weighted_row_sums`) and ``b_dec``.
    """
    recon_BD = F.embedding_bag(
        code.cols, W_dec.detach(), code.offsets, mode="sum", per_sample_weights=code.values
    )
    return _DecoderBias.apply(recon_BD, W_dec, b_dec, code.values.detach(), code.rows, code.cols)
