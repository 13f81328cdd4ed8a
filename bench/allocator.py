"""Benchmark: the training step with glibc's default malloc against
:func:`saelab.allocator.keep_freed_memory` (what the ``saelab`` CLI sets), side by side.

The setting is process-wide but can be switched at run time, so one process alternates: per
repeat and per setting, one untimed call (it leaves the heap as that setting does between
steps), then one timed call of the trainer's step and of the encoder GEMM alone. Medians of
``--repeats``; ratios default / kept.

Run: ``python bench/allocator.py [--shapes 768x16384 576x4608] [--variants topk switch]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from train_step import _step_fn, inputs

from saelab.allocator import keep_freed_memory


def _timed(fn: object) -> float:
    fn()  # untimed: the heap as this setting leaves it between steps
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["topk", "batchtopk", "switch"])
    parser.add_argument("--shapes", nargs="+", default=["768x16384", "576x4608"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, k 32")
    print(f"{'variant':<10} {'d_in':>5} {'d_sae':>6} {'step s':>7} {'kept s':>7} {'ratio':>6}"
          f" {'GEMM s':>7} {'kept s':>7} {'ratio':>6}")  # fmt: skip
    for shape in args.shapes:
        d_in, d_sae = (int(v) for v in shape.split("x"))
        x, W = inputs(args.batch, d_in, d_sae)
        for variant in args.variants:
            fns = {
                "step": _step_fn(variant, d_in, d_sae, 32, x, 0.0, True),
                "gemm": lambda x=x, W=W: x @ W,
            }
            t: dict[tuple[str, bool], list[float]] = {}
            for _ in range(args.repeats):
                for kept in (False, True):
                    keep_freed_memory(kept)
                    for name, fn in fns.items():
                        t.setdefault((name, kept), []).append(_timed(fn))
            m = {key: statistics.median(v) for key, v in t.items()}
            cells = []
            for name in fns:
                off, on = m[(name, False)], m[(name, True)]
                cells.append(f"{off:>7.3f} {on:>7.3f} {off / on:>6.2f}")
            print(f"{variant:<10} {d_in:>5} {d_sae:>6} " + " ".join(cells))
    keep_freed_memory(False)


if __name__ == "__main__":
    main()
