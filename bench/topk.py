"""Benchmark: ``saelab.sae.topk.row_topk`` against ``torch.topk`` (per-row selection).

Each row's k largest pre-activations are selected once per training step: TopK's k = 32 over
d_sae, BatchTopK's and Sampled's per-token candidates (4k = 128), and each Switch expert's k = 32
over d_sae / 8 latents. Times both, interleaved (median of ``--repeats``), on the encoder
output of a random batch, and checks they select the same values. Memory as the pipeline runs
(:func:`saelab.allocator.keep_freed_memory`).

Run: ``python bench/topk.py [--threads 2] [--repeats 7] [--device cuda]``.
"""

from __future__ import annotations

import torch
import train_step
from train_step import _median_seconds, start, step_parser

from saelab.sae.topk import row_topk


def main() -> None:
    args = step_parser(__doc__, repeats=7, k=False).parse_args()
    start(args)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"{'d_sae':>6} {'k':>4} {'topk ms':>8} {'row_topk ms':>11} {'ratio':>6}  same values")
    for d_sae, k in [(2048, 32), (4608, 32), (4608, 128), (16384, 32), (16384, 128)]:
        x = torch.randn(args.batch, 768, generator=gen)
        pre = x @ (torch.randn(d_sae, 768, generator=gen) / 768**0.5).t()
        pre = pre.to(train_step.DEVICE)
        t = _median_seconds(
            {
                "topk": lambda pre=pre, k=k: pre.topk(k, dim=1, sorted=False),
                "row": lambda pre=pre, k=k: row_topk(pre, k),
            },
            args.repeats,
        )
        same = torch.equal(
            row_topk(pre, k)[0].sort(dim=1).values, pre.topk(k, dim=1).values.sort(dim=1).values
        )
        print(f"{d_sae:>6} {k:>4} {1e3 * t['topk']:>8.1f} {1e3 * t['row']:>11.1f}"
              f" {t['row'] / t['topk']:>6.2f}  {same}")  # fmt: skip


if __name__ == "__main__":
    main()
