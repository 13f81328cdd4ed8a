"""Benchmark: the optimizer step, :class:`saelab.optim.SAEAdam` against torch's fused Adam.

The trainer's Adam step updates every SAE parameter (Adam's moments make every entry move, even
with a sparse gradient). ``W_enc`` is column-major, which torch's fused CPU kernel copies out
and back each step; SAEAdam runs the same kernel on its contiguous transposed alias. Times
``optimizer.step()`` alone on a TopK SAE holding gradients of its own layout (as the sparse path
leaves them), interleaved (median of ``--repeats``), and checks both leave the same parameters.
Memory as the pipeline runs (:func:`saelab.allocator.keep_freed_memory`).

Run: ``python bench/optim.py [--threads 2] [--repeats 7]``.
"""

from __future__ import annotations

import argparse

import torch
from train_step import _median_seconds, start

from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.train import param_groups


def _sae_with_grads(d_in: int, d_sae: int, cls: type[torch.optim.Adam]):
    """A TopK SAE whose parameters hold random gradients of their own layout, and ``cls``
    over them (fused)."""
    gen = torch.Generator().manual_seed(0)
    sae = build_sae("topk", d_in, d_sae, 32, {}, gen)
    for p in sae.parameters():
        p.grad = torch.empty_like(p).normal_(generator=gen)
    return sae, cls(param_groups(sae), lr=1e-4, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    start(args)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'d_in':>5} {'d_sae':>6} {'Adam ms':>8} {'SAEAdam ms':>10} {'ratio':>6}  same")
    for d_in, d_sae in [(576, 4608), (768, 16384)]:
        plain, plain_opt = _sae_with_grads(d_in, d_sae, torch.optim.Adam)
        ours, ours_opt = _sae_with_grads(d_in, d_sae, SAEAdam)
        t = _median_seconds({"adam": plain_opt.step, "ours": ours_opt.step}, args.repeats)
        pairs = zip(plain.parameters(), ours.parameters(), strict=True)
        same = all(torch.equal(p, q) for p, q in pairs)
        print(f"{d_in:>5} {d_sae:>6} {1e3 * t['adam']:>8.1f} {1e3 * t['ours']:>10.1f}"
              f" {t['adam'] / t['ours']:>6.2f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
