"""Fault tolerance of the training loop: signals held for the length of a step, so an interrupt
never leaves a step half done, and the RNG states a checkpoint must capture to resume
bit-identically (:mod:`saelab.checkpoint` writes them)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from saelab.sae.model import SparseAutoencoder


@contextmanager
def signals_held(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the block runs, then handle them as they would have been
    (Ctrl-C raises KeyboardInterrupt; the CLI turns SIGTERM into SystemExit), so an interrupt
    never leaves a training step half done. If the block raises, held signals are dropped (its
    exception ends the step anyway). Python runs signal handlers in the main thread only:
    elsewhere nothing can interrupt the block and this holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append((signum, frame))

    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    for signum, frame in held:
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:  # SIG_DFL, or a handler not installed from Python
            signal.raise_signal(signum)


def rng_states(sae: SparseAutoencoder, device: torch.device) -> dict[str, Tensor | None]:
    """torch's CPU RNG, the CUDA device's (None on CPU) and the activation's own (or None)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "activation": sae.activation.rng_state()}


def set_rng_states(
    sae: SparseAutoencoder, rng: dict[str, Tensor | None], device: torch.device
) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    sae.activation.set_rng_state(rng["activation"])
