"""Training checkpoints: what an interrupted :func:`~saelab.train.train_sae` needs to resume.

A checkpoint is one directory, written whole or not at all (:func:`saelab.store.atomic_dir`: a
kill while it is written leaves the previous checkpoint as it was):

- ``sae.safetensors`` + ``cfg.json``: the SAE as :meth:`SparseAutoencoder.save` writes it, but
  in the *scaled* input units of training (the input scale is not folded in; ``cfg.json``'s
  metadata says so and holds the scale). Not a usable SAE on raw activations.
- ``trainer_state.pt``: a :class:`TrainerState` as a dict of plain containers and tensors
  (``torch.save``), read back with ``weights_only=True``.

A checkpoint is resumed only when its fingerprint (:func:`fingerprint`: a hash of everything that
shapes the trajectory) equals the run's, so one left behind by a run with other params, another
variant or other data is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saelab.config import TrainConfig
from saelab.sae import load_sae
from saelab.sae.model import SparseAutoencoder
from saelab.store import atomic_dir

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
FORMAT = 1  # layout version of trainer_state.pt; part of the fingerprint
# TrainConfig fields that do not change the trained weights, so they may differ on resume.
_FREE_FIELDS = ("checkpoint_every", "log_every", "device")


@dataclass
class TrainerState:
    """The training loop's state after ``step`` completed steps (besides the SAE's weights).

    step: completed steps; tokens: tokens trained on; seconds: training time of every attempt
    so far; input_scale: the scale c of the training inputs ``c x``.
    optimizer: ``SAEAdam.state_dict()`` (:mod:`saelab.optim`).
    loop: the loop's book-keeping (``saelab.train._LoopState.state_dict``).
    rng: ``torch`` (CPU generator state), ``cuda`` (the device's, or None) and ``activation``
        (:meth:`~saelab.sae.activations.SparsityActivation.rng_state`), uint8 tensors.
    mlflow_run_id: the run the metrics went to, or None; fingerprint: see :func:`fingerprint`.
    """

    step: int
    tokens: int
    seconds: float
    input_scale: float
    optimizer: dict[str, Any]
    loop: dict[str, Any]
    rng: dict[str, Tensor | None]
    mlflow_run_id: str | None
    fingerprint: str


class Checkpoint(NamedTuple):
    """A checkpoint read back: the trainer state and the SAE's ``state_dict`` (CPU tensors)."""

    state: TrainerState
    sae_state: dict[str, Tensor]


def fingerprint(
    sae: SparseAutoencoder,
    cfg: TrainConfig,
    device: torch.device,
    data_id: Any = None,
) -> str:
    """Hex SHA-256 of what must match for a checkpoint to be resumed.

    The variant, k and its hyperparameters, d_in, d_sae, every :class:`TrainConfig` field but
    ``checkpoint_every``, ``log_every`` and ``device``, the device type (RNG states and numerics
    are per device type) and ``data_id``, a JSON-serialisable identity of the batches (e.g. the
    activation store's attributes and the token filters; None when the caller has none).
    """
    cfg_fields = cfg.model_dump(exclude=set(_FREE_FIELDS))
    parts = {
        "format": FORMAT,
        "variant": sae.variant,
        "k": sae.activation.k,
        "hparams": sae.hparams(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "train": cfg_fields,
        "device_type": device.type,
        "data": data_id,
    }
    canonical = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_checkpoint(directory: str | Path, sae: SparseAutoencoder, state: TrainerState) -> None:
    """Write (atomically, replacing an older one) the checkpoint of ``sae`` and ``state``."""
    metadata = {
        "checkpoint_step": state.step,
        "input_scale": state.input_scale,
        "units": "scaled inputs (input_scale * x); the scale is not folded in",
    }
    raw = {f.name: getattr(state, f.name) for f in fields(state)}
    with atomic_dir(directory) as tmp:
        sae.save(tmp, metadata)
        torch.save(raw, tmp / STATE_FILE)
    logger.info("checkpoint at step %d -> %s", state.step, directory)


def _read_state(directory: Path, mmap: bool = False) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True, mmap=mmap)


def _mismatch(raw: dict[str, Any], expected_fingerprint: str) -> str | None:
    """Why a trainer state read back cannot be resumed by this run, or None when it can."""
    names = {f.name for f in fields(TrainerState)}
    if not isinstance(raw, dict) or set(raw) != names:
        return f"its {STATE_FILE} does not hold the keys {sorted(names)}"
    if raw["fingerprint"] != expected_fingerprint:
        return "it was written by a run with other params, variant, data or device type"
    return None


def load_checkpoint(directory: str | Path, expected_fingerprint: str) -> Checkpoint | None:
    """The checkpoint in ``directory`` if this run (``expected_fingerprint``) can resume it.

    None when there is none; None with a warning that says why when it is unreadable (torn,
    corrupt, an older layout) or its fingerprint differs: the run then starts fresh.
    """
    directory = Path(directory)
    if not directory.exists():
        return None
    try:
        raw = _read_state(directory)
        reason = _mismatch(raw, expected_fingerprint)
        if reason is None:
            sae_state = load_sae(directory).state_dict()
            return Checkpoint(TrainerState(**raw), sae_state)
    except Exception as e:  # any unreadable checkpoint (torn, corrupt, other layout): start fresh
        reason = f"it is unreadable ({type(e).__name__}: {e})"
    logger.warning("not resuming from the checkpoint in %s: %s; starting fresh", directory, reason)
    return None


def peek_checkpoint(directory: str | Path, expected_fingerprint: str) -> str | None:
    """The MLflow run id of the checkpoint in ``directory`` if this run would resume it (see
    :func:`load_checkpoint`), else None. Reads only the small part of ``trainer_state.pt``
    (memory-mapped), so a caller can reopen that run before training."""
    directory = Path(directory)
    try:
        raw = _read_state(directory, mmap=True)
    except Exception:  # missing or unreadable: load_checkpoint says why when training starts
        return None
    if _mismatch(raw, expected_fingerprint) is not None:
        return None
    return raw["mlflow_run_id"]


def remove_checkpoint(directory: str | Path) -> None:
    """Delete the checkpoint directory (if any), e.g. once the run has completed."""
    directory = Path(directory)
    if directory.is_dir():
        shutil.rmtree(directory)
        logger.info("removed the checkpoint %s (training completed)", directory)
