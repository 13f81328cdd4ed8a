"""Benchmark: one data-parallel training step in 1 and in N processes (gloo on CPU, NCCL on CUDA).

The same global batch (``--batch`` tokens of seeded Gaussian activations with an offset) is
trained by one process (the single-process code path, no process group) and by ``N`` processes
(``torch.multiprocessing`` spawn, each on its ``batch / N`` slice, gradients and batch-level
statistics all-reduced, :mod:`saelab.distributed`). Per step: the median wall time of rank 0
over ``--steps`` steps after ``--warmup``, a barrier before each (so a step is timed from a common
start). On CPU each process gets ``--threads / N`` threads, so the comparison is at equal cores.
The data reader is not timed (``bench/reader.py`` times it).

Run: ``python bench/ddp_step.py [--variant topk] [--shape 576x4608] [--batch 4096]
[--procs 2] [--threads 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab import distributed
from saelab.allocator import keep_freed_memory
from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.train import autocast_dtype, param_groups, train_step

HPARAMS = {"topk": {}, "batchtopk": {}, "sampled": {"l": 64, "score": "l2", "pool": "sample"},
           "switch": {"n_experts": 8, "balance_coef": 0.03}}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> float:
    """Median seconds of one step on this rank's slice of the global batch."""
    d_in, d_sae = (int(v) for v in args.shape.split("x"))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, d_in, generator=gen) + torch.randn(d_in, generator=gen)
    lo, hi = distributed.part_bounds(args.batch, rank, world)
    x = x[lo:hi].to(device)
    sae = build_sae(args.variant, d_in, d_sae, args.k, HPARAMS[args.variant],
                    torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    optimizer = SAEAdam(param_groups(sae), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    kwargs = {"k_aux": d_in // 2, "aux_coef": 1 / 32, "grad_clip": 1.0,
              "autocast": autocast_dtype("auto", device)}  # fmt: skip
    times = []
    with distributed.data_parallel(world > 1):
        for i in range(args.warmup + args.steps):
            distributed.barrier()
            _sync(device)
            start = time.perf_counter()
            train_step(sae, optimizer, x, dead, **kwargs)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, args: argparse.Namespace, port: int, out: dict) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads // args.procs))
    keep_freed_memory(not cuda)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.procs)  # fmt: skip
    try:
        seconds = time_steps(args, rank, args.procs, device)
        if rank == 0:
            out["seconds"] = seconds
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="topk", choices=list(HPARAMS))
    parser.add_argument("--shape", default="576x4608", help="d_in x d_sae")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    keep_freed_memory(args.device == "cpu")
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, {args.variant} {args.shape}, batch {args.batch}, k {args.k}, "
          f"device {args.device}, autocast {autocast_dtype('auto', device)}")  # fmt: skip
    one = time_steps(args, 0, 1, device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args, port, out), nprocs=args.procs, join=True)
        many = out["seconds"]
    print(f"1 process: {one * 1e3:.1f} ms/step; {args.procs} processes: {many * 1e3:.1f} ms/step "
          f"({one / many:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
