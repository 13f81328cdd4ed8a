"""Benchmark: the trainer's step of several variants against TopK's, interleaved in one loop.

``bench/train_step.py`` times each variant against the GEMM in its own loop, so on a shared
machine whose load shifts between loops the variant-to-variant ratios drift. Here every variant's
step (the trainer's: sparse path where it has one, SAEAdam, ``train.autocast: auto``) runs in one
interleaved loop (median of ``--repeats``) and is printed as a ratio to TopK's step of the same
shape, with the CPU capability and the precision.

Run: ``python bench/variant_ratio.py [--shapes 768x16384 576x4608] [--variants relu jumprelu]``
"""

from __future__ import annotations

import torch
from train_step import _median_seconds, _step_fn, inputs, start, step_parser

from saelab.train import autocast_dtype


def main() -> None:
    parser = step_parser(__doc__, repeats=5)
    parser.add_argument("--variants", nargs="+", default=["relu", "jumprelu"])
    parser.add_argument("--shapes", nargs="+", default=["768x16384", "576x4608"])
    args = parser.parse_args()
    start(args)
    precision = autocast_dtype("auto", torch.device(args.device)) or torch.float32
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, cpu capability {capability}, {args.threads} threads, "
          f"batch {args.batch}, k {args.k}, precision {precision}")  # fmt: skip
    for shape in args.shapes:
        d_in, d_sae = (int(v) for v in shape.split("x"))
        x, _ = inputs(args.batch, d_in, d_sae)
        names = ["topk", *args.variants]
        fns = {v: _step_fn(v, d_in, d_sae, args.k, x, 0.0, True) for v in names}
        t = _median_seconds(fns, args.repeats)
        ratios = ", ".join(f"{v} {t[v] / t['topk']:.2f}x" for v in args.variants)
        print(f"{d_in}x{d_sae}: topk step {t['topk']:.3f} s; {ratios} TopK's step")


if __name__ == "__main__":
    main()
