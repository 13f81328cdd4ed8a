"""Benchmark: one training step of each SAE variant, as a ratio to one dense encoder GEMM.

The physical floor of a TopK step is one ``[batch, d_in] x [d_in, d_sae]`` GEMM (issue 5). This
script times, side by side in one process and interleaved (median of ``--repeats``), so that the
ratios survive a noisy, shared machine where absolute times drift:

- ``GEMM``: that fp32 GEMM, and the same GEMM in bf16 (``bf16/fp32``);
- ``dense``: ``saelab.train.train_step(sparse=False)`` with torch's default Adam, the
  straightforward implementation (dense ``[batch, d_sae]`` codes, dense decoder, autograd through
  everything): what the trainer did before the sparse path;
- ``step``: the trainer's step as the pipeline runs it (sparse path where the variant has one,
  :class:`~saelab.optim.SAEAdam`, ``train.autocast: auto`` resolved for this machine).

Then the Switch SAE's step against dense TopK's of the same total width. ``--dead-fraction``
marks that share of the latents dead so AuxK has work (0, the default: a healthy SAE, as in the
comparison with other libraries, whose AuxK starts after millions of tokens).

Memory as the pipeline runs (:func:`saelab.allocator.keep_freed_memory`, for the GEMM too).

Run: ``python bench/train_step.py [--threads 2] [--shapes 576x4608 768x16384] [--device cuda]``
(on CUDA every call is timed up to a ``torch.cuda.synchronize``; memory is CUDA's allocator's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saelab.allocator import keep_freed_memory
from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.train import autocast_dtype, param_groups, train_step

HPARAMS = {
    "topk": {},
    "batchtopk": {},
    "jumprelu": {"bandwidth": 0.001, "l0_coef": 5.0, "init_threshold": None,
                 "threshold_lr_scale": 30.0},
    "relu": {"l1_coef": 0.012, "init_b_enc": "quantile"},
    "sampled": {"l": 64, "score": "l2", "pool": "sample", "seed": 0},
    "switch": {"n_experts": 8, "balance_coef": 3.0},
}  # fmt: skip


def step_parser(doc: str, repeats: int, k: bool = True) -> argparse.ArgumentParser:
    """The options of the step-level benches: ``--threads`` (2, as CI's machine), ``--batch``
    (4,096 tokens), ``--k`` (32; when ``k``), ``--repeats`` (default ``repeats``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    if k:
        parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return parser


DEVICE = torch.device("cpu")  # set by start() from --device


def start(args: argparse.Namespace) -> None:
    """Threads as ``args.threads``; ``DEVICE`` from ``args.device`` (when the parser has it);
    host memory as the saelab CLI runs (:func:`saelab.allocator.keep_freed_memory`; not on
    CUDA, as the CLI)."""
    global DEVICE
    DEVICE = torch.device(getattr(args, "device", "cpu"))
    torch.set_num_threads(args.threads)
    if DEVICE.type == "cpu":
        keep_freed_memory()
    else:
        print(f"device {torch.cuda.get_device_name(DEVICE)}")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, called interleaved ``repeats`` times after one
    warm-up call each (allocations, Adam state)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def inputs(batch: int, d_in: int, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [batch, d_in] and an encoder-shaped W [d_in, d_sae] float32 for the reference GEMM, in
    W_enc's own layout: SparseAutoencoder builds it as ``W_dec.T.clone()``, column-major strides
    (a row-major W sends the bf16 GEMM to a slow fallback)."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
    return x.to(DEVICE), (torch.randn(d_sae, d_in) / d_in**0.5).to(DEVICE).t()


def _step_fn(variant: str, d_in: int, d_sae: int, k: int, x: torch.Tensor, dead_fraction: float,
             optimized: bool) -> Callable[[], object]:  # fmt: skip
    """A closure running one train_step of a fresh SAE (optimized: the trainer's settings)."""
    gen = torch.Generator().manual_seed(0)
    sae = build_sae(variant, d_in, d_sae, k, HPARAMS[variant], gen).to(x.device)
    with torch.no_grad():
        sae.activation.init_from_batch_(sae.encode_pre(x), sae.b_enc)
    adam = SAEAdam if optimized else torch.optim.Adam  # the trainer's, or torch's default
    optimizer = adam(param_groups(sae), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    dead[: int(dead_fraction * d_sae)] = True
    kwargs = {"k_aux": d_in // 2, "aux_coef": 1 / 32, "grad_clip": 1.0, "sparse": optimized,
              "autocast": autocast_dtype("auto", x.device) if optimized else None}  # fmt: skip
    return lambda: train_step(sae, optimizer, x, dead, **kwargs)


def bench_shape(args: argparse.Namespace, d_in: int, d_sae: int) -> dict[str, float]:
    """Print one line per variant; return the optimized step seconds per variant."""
    x, W = inputs(args.batch, d_in, d_sae)
    x_bf16, W_bf16 = x.bfloat16(), W.bfloat16()
    steps = {}
    for variant in args.variants:
        fns = {
            "gemm": lambda: x @ W,
            "gemm_bf16": lambda: x_bf16 @ W_bf16,
            "step": _step_fn(variant, d_in, d_sae, args.k, x, args.dead_fraction, True),
        }
        if not args.no_dense:
            fns["dense"] = _step_fn(variant, d_in, d_sae, args.k, x, args.dead_fraction, False)
        t = _median_seconds(fns, args.repeats)
        dense = t.get("dense", float("nan"))
        print(
            f"{variant:<10} {d_in:>5} {d_sae:>6} {t['gemm']:>7.3f}"
            f" {t['gemm_bf16'] / t['gemm']:>9.2f} {dense / t['gemm']:>11.2f}"
            f" {t['step'] / t['gemm']:>10.2f} {dense / t['step']:>8.1f}"
        )
        steps[variant] = t["step"]
    return steps


def main() -> None:
    parser = step_parser(__doc__, repeats=3)
    parser.add_argument("--dead-fraction", type=float, default=0.0)
    parser.add_argument("--no-dense", action="store_true", help="skip the reference step")
    parser.add_argument("--variants", nargs="+", default=list(HPARAMS))
    parser.add_argument("--shapes", nargs="+", default=["576x4608", "768x16384"],
                        help="d_in x d_sae")  # fmt: skip
    args = parser.parse_args()
    start(args)  # bench/allocator.py: with and without the allocator setting
    precision = autocast_dtype("auto", DEVICE) or torch.float32
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, k {args.k}, "
          f"dead fraction {args.dead_fraction}, default precision here: {precision}")  # fmt: skip
    print(f"{'variant':<10} {'d_in':>5} {'d_sae':>6} {'GEMM s':>7} {'bf16/fp32':>9} "
          f"{'dense/GEMM':>11} {'step/GEMM':>10} {'speedup':>8}")  # fmt: skip
    for shape in args.shapes:
        d_in, d_sae = (int(v) for v in shape.split("x"))
        steps = bench_shape(args, d_in, d_sae)
        if "switch" in steps and "topk" in steps:
            print(f"  switch (8 experts) vs topk, same width {d_in}x{d_sae}: "
                  f"{steps['topk'] / steps['switch']:.2f}x faster per step")  # fmt: skip


if __name__ == "__main__":
    main()
