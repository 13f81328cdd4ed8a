"""Benchmark: one training step of Switch SAEs against dense TopK, side by side (the speed side of
the Switch SAE paper's claim, Mudide et al. 2024, sec. 3: a token's encoder work is one expert's,
d_in x d_sae/E, plus the router's d_in x E).

The study (reports/main) runs its Switch and TopK SAEs in different sessions, so their
``train_seconds`` are not comparable; this script times the steps interleaved in one process
(median of ``--repeats``), for the study's configurations: TopK at d_sae 4608; Switch
width-matched (E = 2, 4, 8 experts sharing 4608 latents); Switch FLOP-matched (each expert 4608
wide: E = 2 at 9216, E = 4 at 18432). Batch 4,096, k 32, the trainer's step (sparse path,
SAEAdam, ``train.autocast: auto``).

Run: ``python bench/switch_speed.py [--threads 2] [--repeats 7]``
"""

from __future__ import annotations

import json

import torch
from study_budget import step_fn
from train_step import HPARAMS, _median_seconds, inputs, start, step_parser

from saelab.train import autocast_dtype

D_IN = 576
CONFIGS = [("topk", 4608, None), ("switch", 4608, 2), ("switch", 4608, 4), ("switch", 4608, 8),
           ("switch", 9216, 2), ("switch", 18432, 4)]  # fmt: skip


def _step(variant: str, d_sae: int, n_experts: int | None, k: int, x: torch.Tensor):
    """One train_step of a fresh SAE, as the trainer runs it (study_budget.step_fn)."""
    hparams = {**HPARAMS[variant], **({"n_experts": n_experts} if n_experts else {})}
    return step_fn((variant, k, d_sae, json.dumps(hparams)), x)


def main() -> None:
    args = step_parser(__doc__, repeats=7).parse_args()
    start(args)
    x, _ = inputs(args.batch, D_IN, 8)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, batch {args.batch}, k {args.k}, "
          f"precision {autocast_dtype('auto', x.device) or torch.float32}")  # fmt: skip
    fns = {f"{v} d{d}" + (f" E{e}" if e else ""): _step(v, d, e, args.k, x) for v, d, e in CONFIGS}
    t = _median_seconds(fns, args.repeats)
    base = t["topk d4608"]
    print(f"{'SAE':<18} {'step s':>7} {'/ topk':>7}")
    for name, seconds in t.items():
        print(f"{name:<18} {seconds:>7.3f} {seconds / base:>7.2f}")


if __name__ == "__main__":
    main()
