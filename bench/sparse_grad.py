"""Benchmark: the sparse path's weight gradients against the straightforward torch calls.

With ``nnz = batch * k`` selected (token, latent) pairs, both weight gradients are sums of
``nnz`` scaled rows into the rows of a ``[d_sae, d_in]`` matrix (:mod:`saelab.sae.sparse`):

- encoder: ``sum_e g_e (x_{r_e} - b_dec)`` into column ``c_e`` of ``W_enc``: torch's COO
  ``torch.sparse.mm`` (what the sparse path used before) against ``weighted_row_sums``;
- decoder: ``F.embedding_bag``'s own backward (weight attached) against ``sparse_decode``
  (weight gradient by ``weighted_row_sums``), forward and backward together.

Times each pair interleaved (median of ``--repeats``) on a TopK selection of a random batch and
checks both give the same gradients. Memory as the pipeline runs
(:func:`saelab.allocator.keep_freed_memory`).

Run: ``python bench/sparse_grad.py [--threads 2] [--repeats 7]``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from train_step import _median_seconds, start, step_parser

from saelab.sae.sparse import SparseCode, offsets_of, sparse_decode, weighted_row_sums


def coo_mm(out_index, src_index, weights, src, n_out):
    """The straightforward way: an uncoalesced COO matrix times ``src`` (torch.sparse.mm)."""
    with warnings.catch_warnings():  # sparse tensors warn about skipped invariant checks
        warnings.simplefilter("ignore", UserWarning)
        shape = (n_out, src.shape[0])
        index = torch.stack([out_index, src_index])
        matrix = torch.sparse_coo_tensor(index, weights, shape, check_invariants=False)
        return torch.sparse.mm(matrix, src)


def _decoder_steps(code: SparseCode, W_dec: torch.nn.Parameter, grad_BD: torch.Tensor):
    """Forward + backward of the decoder both ways; each returns (W_dec grad, values grad)."""
    b_dec = torch.zeros(W_dec.shape[1])

    def plain():
        W_dec.grad = code.values.grad = None
        recon = F.embedding_bag(code.cols, W_dec, code.offsets, mode="sum",
                                per_sample_weights=code.values)  # fmt: skip
        (recon + b_dec).backward(grad_BD)
        return W_dec.grad, code.values.grad

    def ours():
        W_dec.grad = code.values.grad = None
        sparse_decode(code, W_dec, b_dec).backward(grad_BD)
        return W_dec.grad, code.values.grad

    return plain, ours


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-5) for x, y in zip(a, b, strict=True))


def main() -> None:
    args = step_parser(__doc__, repeats=7).parse_args()
    start(args)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, k {args.k}")
    print(f"{'d_in':>5} {'d_sae':>6} {'gradient':<18} {'torch ms':>8} {'saelab ms':>9}"
          f" {'ratio':>6}  same")  # fmt: skip
    for d_in, d_sae in [(576, 4608), (768, 16384)]:
        x = torch.randn(args.batch, d_in, generator=gen)
        pre = x @ (torch.randn(d_sae, d_in, generator=gen) / d_in**0.5).t()
        cols = pre.topk(args.k, dim=1).indices.flatten()
        rows = torch.arange(args.batch).repeat_interleave(args.k)
        g = torch.randn(cols.numel(), generator=gen)
        call = (cols, rows, g, x, d_sae)
        values = torch.rand(cols.numel(), generator=gen).requires_grad_()
        code = SparseCode(values, rows, cols, offsets_of(rows, args.batch))
        W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=gen))
        plain, ours = _decoder_steps(code, W_dec, torch.randn(args.batch, d_in, generator=gen))
        pairs = {
            "encoder (W_enc)": (
                lambda call=call: (coo_mm(*call),),
                lambda call=call: (weighted_row_sums(*call),),
            ),
            "decoder fwd+bwd": (plain, ours),
        }
        for name, (theirs, mine) in pairs.items():
            t = _median_seconds({"torch": theirs, "saelab": mine}, args.repeats)
            print(f"{d_in:>5} {d_sae:>6} {name:<18} {1e3 * t['torch']:>8.1f}"
                  f" {1e3 * t['saelab']:>9.1f} {t['torch'] / t['saelab']:>6.2f}"
                  f"  {_same(theirs(), mine())}")  # fmt: skip


if __name__ == "__main__":
    main()
