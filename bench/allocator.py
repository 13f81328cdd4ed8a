"""Benchmark: the training step with glibc's default malloc against
:func:`saelab.allocator.keep_freed_memory` (what the ``saelab`` CLI sets), side by side.

The setting is process-wide but can be switched at run time, so one process alternates: per
repeat and per setting, one untimed call (it leaves the heap as that setting does between
steps), then one timed call of the trainer's step and of the encoder GEMM alone. Medians of
``--repeats``; ratios default / kept.

``--lm`` adds the language model's forwards on real tokens: the cache stage's truncated forward
(``capture_resid``) and the full forward with logits that evaluation runs.

Run: ``python bench/allocator.py [--shapes 768x16384 576x4608] [--variants topk switch]
[--lm --tokens data/tokens --params params.yaml]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from train_step import _step_fn, inputs

from saelab.allocator import keep_freed_memory


def _timed(fn: object) -> float:
    fn()  # untimed: the heap as this setting leaves it between steps
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _ratios(fns: dict, repeats: int) -> list[str]:
    """Per function: 'default s, kept s, default / kept' cells (medians of ``repeats``)."""
    t: dict[tuple[str, bool], list[float]] = {}
    for _ in range(repeats):
        for kept in (False, True):
            keep_freed_memory(kept)
            for name, fn in fns.items():
                t.setdefault((name, kept), []).append(_timed(fn))
    m = {key: statistics.median(v) for key, v in t.items()}
    return [f"{m[(n, False)]:>7.3f} {m[(n, True)]:>7.3f} {m[(n, False)] / m[(n, True)]:>6.2f}"
            for n in fns]  # fmt: skip


def lm_forwards(args: argparse.Namespace) -> None:
    """The LM's truncated (cache stage) and full (evaluation) forwards, default vs kept."""
    import numpy as np

    from saelab.capture import capture_resid, load_model
    from saelab.config import load_params
    from saelab.data import read_tokens

    cfg = load_params(args.params)
    model = load_model(cfg.model, torch.device("cpu"))
    bs = cfg.cache.batch_size
    ids = torch.from_numpy(read_tokens(args.tokens, "train")[:bs].astype(np.int64))
    fns = {"truncated": lambda: capture_resid(model, cfg.model, ids),
           "full": lambda: model(input_ids=ids, use_cache=False)}  # fmt: skip
    with torch.inference_mode():
        cells = _ratios(fns, args.repeats)
    print(f"LM forwards, batch {bs} x {ids.shape[1]} tokens ({cfg.model.hookpoint}):")
    print(f"{'forward':<10} {'default':>7} {'kept':>7} {'ratio':>6}   (seconds)")
    for name, cell in zip(fns, cells, strict=True):
        print(f"{name:<10} {cell}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["topk", "batchtopk", "switch"])
    parser.add_argument("--shapes", nargs="+", default=["768x16384", "576x4608"])
    parser.add_argument("--lm", action="store_true", help="also the LM's forwards")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
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
            print(f"{variant:<10} {d_in:>5} {d_sae:>6} " + " ".join(_ratios(fns, args.repeats)))
    if args.lm:
        lm_forwards(args)
    keep_freed_memory(False)


if __name__ == "__main__":
    main()
