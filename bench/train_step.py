"""Benchmark: one training step of each SAE variant, as a ratio to one dense encoder GEMM.

The physical floor of a TopK step is one ``[batch, d_in] x [d_in, d_sae]`` GEMM (issue 5); this
script times ``saelab.train.train_step`` and that GEMM side by side in one process, interleaved,
and prints ``step / GEMM`` (median over ``--repeats``), so the ratio survives a noisy, shared
machine where absolute times drift. Run: ``python bench/train_step.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelab.sae import build_sae
from saelab.train import train_step

HPARAMS = {
    "topk": {},
    "batchtopk": {},
    "jumprelu": {"bandwidth": 0.001, "l0_coef": 5.0, "init_threshold": None,
                 "threshold_lr_scale": 30.0},
    "relu": {"l1_coef": 0.012, "init_b_enc": "quantile"},
    "sampled": {"l": 64, "score": "l2", "pool": "sample", "seed": 0},
    "switch": {"n_experts": 8, "balance_coef": 3.0},
}  # fmt: skip


def _seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench(variant: str, d_in: int, d_sae: int, k: int, batch: int, repeats: int) -> dict:
    """Median seconds of one train_step and of one fp32 / bf16 encoder GEMM of the same shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen)
    sae = build_sae(variant, d_in, d_sae, k, HPARAMS[variant], gen)
    with torch.no_grad():
        sae.activation.init_from_batch_(sae.encode_pre(x), sae.b_enc)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 8] = True  # AuxK has work to do, as in a real run
    W = sae.W_enc.detach()
    W_bf16, x_bf16 = W.bfloat16(), x.bfloat16()

    def step() -> None:
        train_step(sae, optimizer, x, dead, k_aux=d_in // 2, aux_coef=1 / 32, grad_clip=1.0)

    step()  # warm-up (allocations, Adam state)
    steps, gemms, gemms_bf16 = [], [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        gemms += _seconds(lambda: x @ W, 1)
        gemms_bf16 += _seconds(lambda: x_bf16 @ W_bf16, 1)
        steps += _seconds(step, 1)
    return {
        "step_s": statistics.median(steps),
        "gemm_s": statistics.median(gemms),
        "gemm_bf16_s": statistics.median(gemms_bf16),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(HPARAMS))
    parser.add_argument("--shapes", nargs="+", default=["576x4608", "768x16384"],
                        help="d_in x d_sae")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, k {args.k}")
    print(f"{'variant':<10} {'d_in':>5} {'d_sae':>6} {'step s':>8} {'GEMM s':>8} "
          f"{'step/GEMM':>10} {'bf16 GEMM/fp32':>15}")  # fmt: skip
    for shape in args.shapes:
        d_in, d_sae = (int(v) for v in shape.split("x"))
        for variant in args.variants:
            r = bench(variant, d_in, d_sae, args.k, args.batch, args.repeats)
            print(
                f"{variant:<10} {d_in:>5} {d_sae:>6} {r['step_s']:>8.3f} {r['gemm_s']:>8.3f} "
                f"{r['step_s'] / r['gemm_s']:>10.2f} {r['gemm_bf16_s'] / r['gemm_s']:>15.2f}"
            )


if __name__ == "__main__":
    main()
