"""Benchmark: the training data path's tokens/s against the trainer's consumption (issue 5).

The reader is what ``saelab train`` feeds the loop: :class:`saelab.store.ShuffledBatches`
(token-shuffled, ``shuffle_chunks`` chunks at a time) behind :func:`saelab.store.drop_outliers`,
on a real activation store. One repeat reads one whole epoch (so every chunk's decompression and
every buffer shuffle is paid once, as in training), then times ``saelab.train.train_step`` on a
TopK SAE of the same batch; repeats alternate, medians are compared. Target: reader tokens/s
>= 5x the trainer's, also against a step 5x faster than today's (another branch is speeding the
step up). Run::

    python bench/reader.py --store /work/main/data/activations/train [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.store import ShuffledBatches, drop_outliers, median_norm
from saelab.train import param_groups, train_step


def reader_epoch_seconds(
    store: Path, batch: int, shuffle_chunks: int, max_norm: float, seed: int
) -> tuple[float, int]:
    """Seconds and tokens of one epoch of the training batch stream (a fresh reader)."""
    start = time.perf_counter()
    reader = ShuffledBatches(
        store, batch, exclude_first_position=True, shuffle_chunks=shuffle_chunks, seed=seed
    )
    n_batches = reader.tokens_per_epoch // batch
    tokens = 0
    for _, x in zip(range(n_batches), drop_outliers(reader, max_norm), strict=False):
        tokens += len(x)
    return time.perf_counter() - start, tokens


def make_step(d_in: int, d_sae: int, k: int, batch: int):
    """A closure running one ``train_step`` of a TopK SAE on a fixed random batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen)
    sae = build_sae("topk", d_in, d_sae, k, {}, gen)
    optimizer = SAEAdam(param_groups(sae), lr=1e-4)  # the trainer's
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[: d_sae // 8] = True  # AuxK has work to do, as in a real run

    def step() -> None:
        train_step(sae, optimizer, x, dead, k_aux=d_in // 2, aux_coef=1 / 32, grad_clip=1.0)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("data/activations/train"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shuffle-chunks", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="train steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    max_norm = 10.0 * median_norm(args.store, 65536, exclude_first_position=True)  # as params
    probe = ShuffledBatches(args.store, args.batch, exclude_first_position=True,
                            shuffle_chunks=args.shuffle_chunks, seed=0)  # fmt: skip
    d_in = probe.store.d_in
    step = make_step(d_in, args.d_sae, args.k, args.batch)
    step()  # warm-up: allocations, Adam state
    reads, steps = [], []
    for r in range(args.repeats):  # interleaved: drift on the shared machine hits both alike
        seconds, tokens = reader_epoch_seconds(
            args.store, args.batch, args.shuffle_chunks, max_norm, seed=r
        )
        reads.append(tokens / seconds)
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            steps.append(args.batch / (time.perf_counter() - start))
    reader_tps, trainer_tps = statistics.median(reads), statistics.median(steps)
    print(f"torch {torch.__version__}, {args.threads} threads; store {args.store} "
          f"({probe.store.n_tokens} tokens x {d_in}, {probe.store.n_chunks} chunks of "
          f"{probe.store.chunk_tokens}, {probe.store.dtype}); batch {args.batch}, "
          f"shuffle_chunks {args.shuffle_chunks}; TopK d_sae {args.d_sae} k {args.k}; "
          f"median of {args.repeats} epochs / {len(steps)} steps")  # fmt: skip
    print(f"reader (shuffled, drop_outliers), tokens/s  {reader_tps:>10,.0f}")
    print(f"trainer (train_step), tokens/s              {trainer_tps:>10,.0f}")
    print(f"reader / trainer                            {reader_tps / trainer_tps:>10.1f}x"
          "   (target >= 5)")  # fmt: skip
    print(f"reader / (trainer 5x faster)                {reader_tps / (5 * trainer_tps):>10.1f}x"
          "   (target >= 5)")  # fmt: skip
    print(f"data share of a training step today         {trainer_tps / reader_tps:>10.1%}")


if __name__ == "__main__":
    main()
