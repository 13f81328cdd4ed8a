"""Data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

Each rank trains on a disjoint slice of every global batch (:func:`part_bounds`); the losses
and every batch-level rule are computed over the *global* batch, so N processes take the same
steps as one process on the whole batch (up to the order of floating-point sums):

- a loss term that is a function of batch sums is written with :func:`global_sum`, whose value
  is the sum over ranks and whose gradient is the rank's own part; the trainer sums the
  parameter gradients over ranks (:func:`all_reduce_grads`), which then equal the gradient of
  the global loss (the chain rule: ``d f(S) / dθ = f'(S) Σ_r dS_r / dθ``);
- statistics without gradient (a batch mean, counters, a selection threshold) use
  :func:`all_sum`, :func:`all_min`, :func:`all_gather_cat`.

Every helper is the identity (and costs nothing) unless the caller is inside
:func:`data_parallel` with a world of more than one process, so single-process code paths keep
their exact operations. The SAE code calls :func:`world_size` to choose between its
single-process formula and the global one.

Why not ``torch.nn.parallel.DistributedDataParallel``: its gradient reducer is armed by the
wrapped module's ``forward``; a training step here calls several methods of the SAE
(``forward_sparse``, ``pre_acts_of`` for AuxK, Switch's ``route``), and the batch-level rules
need collectives inside the forward anyway. The gradients are summed by one ``all_reduce`` of a
flattened buffer, the collective DDP's reducer issues, without its overlap of communication
with the backward.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

_ACTIVE = False  # inside data_parallel() with world_size > 1


def world_size() -> int:
    """Processes taking part in the current training (1 outside :func:`data_parallel`)."""
    return dist.get_world_size() if _ACTIVE else 1


def rank() -> int:
    """This process's rank in the current training (0 outside :func:`data_parallel`)."""
    return dist.get_rank() if _ACTIVE else 0


@contextmanager
def data_parallel(enabled: bool = True) -> Iterator[None]:
    """Make the helpers of this module collective over the default process group while the
    block runs (when ``enabled``, a process group is initialised and has more than one rank)."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = enabled and dist.is_available() and dist.is_initialized()
    _ACTIVE = _ACTIVE and dist.get_world_size() > 1
    try:
        yield
    finally:
        _ACTIVE = previous


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets ``RANK``
    and ``WORLD_SIZE``), whatever the world size."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(launcher: str, nproc_per_node: int, argv: list[str]) -> int:
    """Run ``python <argv>`` in ``nproc_per_node`` processes under the launcher command
    ``launcher`` (split like a shell line; a leading ``torchrun`` becomes this interpreter's
    ``-m torch.distributed.run``), with ``--nproc-per-node N`` appended; waits and returns the
    launcher's exit status (torchrun's: non-zero when a rank failed)."""
    command = shlex.split(launcher)
    if command[0] == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]
    command += [f"--nproc-per-node={nproc_per_node}", *argv]
    logger.info("%d processes: %s", nproc_per_node, shlex.join(command))
    return subprocess.run(command, check=False).returncode


def init_from_env(device_type: str) -> torch.device | None:
    """Initialise the default process group from torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` or a rendezvous): NCCL for ``cuda``, gloo
    otherwise. Returns this rank's CUDA device (``cuda:LOCAL_RANK``) on CUDA, None on CPU, and
    does nothing (None) when not launched by torchrun or launched as a world of one."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return None
    cuda = device_type == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
    return device


def part_bounds(n: int, part: int, n_parts: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of part ``part`` of ``n`` rows split into ``n_parts`` contiguous parts
    whose sizes differ by at most one (the first parts are the smaller)."""
    return part * n // n_parts, (part + 1) * n // n_parts


def all_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over the ranks (a new tensor, no gradient); ``t`` itself at world size 1."""
    if not _ACTIVE:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def all_min(t: Tensor) -> Tensor:
    """Elementwise minimum of ``t`` over the ranks (no gradient); ``t`` at world size 1."""
    if not _ACTIVE:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out


def all_any(t: Tensor) -> Tensor:
    """Elementwise OR of the bool tensor ``t`` over the ranks; ``t`` at world size 1."""
    if not _ACTIVE:
        return t
    return all_sum(t.to(torch.int32)) > 0


class _GlobalSum(torch.autograd.Function):
    """Forward: the sum over ranks; backward: the gradient passed through unchanged (the rank's
    own contribution; the trainer sums parameter gradients over ranks)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def global_sum(t: Tensor) -> Tensor:
    """``t`` summed over the ranks, with the gradient of this rank's ``t`` only (module
    docstring); ``t`` itself at world size 1."""
    return _GlobalSum.apply(t) if _ACTIVE else t


def global_mean(t: Tensor) -> Tensor:
    """Mean of ``t [batch, ...]`` over dim 0 of the global batch, with :func:`global_sum`'s
    gradient; ``t.mean(dim=0)`` at world size 1."""
    if not _ACTIVE:
        return t.mean(dim=0)
    return global_sum(t.sum(dim=0)) / global_count(t.shape[0], t.device)


def global_count(n: int, device: torch.device) -> int:
    """``n`` summed over the ranks (e.g. the global batch size from the local one)."""
    if not _ACTIVE:
        return n
    return int(all_sum(torch.tensor(n, dtype=torch.int64, device=device)))


def all_gather_cat(t: Tensor) -> tuple[Tensor, list[int]]:
    """The 1-d tensors ``t`` of every rank concatenated in rank order, and their lengths (they
    may differ: padded for the collective, trimmed after). ``(t, [len(t)])`` at world size 1."""
    if not _ACTIVE:
        return t, [t.numel()]
    sizes = torch.zeros(world_size(), dtype=torch.int64, device=t.device)
    sizes[rank()] = t.numel()
    lengths = all_sum(sizes).tolist()
    padded = t.new_zeros(max(lengths))
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)]), lengths


@torch.no_grad()
def all_reduce_grads(params: Iterable[Tensor]) -> None:
    """Sum every parameter's ``.grad`` over the ranks, in place, with one ``all_reduce`` of a
    flattened buffer (a missing gradient counts as zeros and is created). No-op at world size
    1."""
    if not _ACTIVE:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        g.copy_(flat[offset : offset + g.numel()].view(g.shape))
        p.grad = g
        offset += g.numel()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself at world size 1.
    With NCCL the pickle travels through the current CUDA device (:func:`init_from_env` sets
    it)."""
    if not _ACTIVE:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op at world size 1)."""
    if _ACTIVE:
        dist.barrier()
