"""One streaming pass over the eval activations that keeps, per latent, what a feature page shows.

Memory is bounded by ``d_sae`` times a constant, never ``n_tokens x d_sae``: per latent a running
top-N of its activations (the top-activating contexts), a uniform random sample of its firings
(a bottom-k sketch: the ``n_samples`` firings with the smallest hash keys; Cohen & Kaplan 2007,
"Summarizing data using bottom-k sketches"), a histogram of its activations on log2 bins, its
firing count and activation sum. Each kept firing carries the latent's activations over a window
of its context, taken from the batch in which the firing arrived (batches are whole contexts, so
the window is always in that batch).

Row indices ``r`` are rows of the activation store: context ``r // ctx_len``, position
``r % ctx_len``. A latent fires on token t when its activation ``f_ti > 0`` (the SAE in eval
mode: BatchTopK and Sampled with their global threshold θ). Excluded tokens (position 0 and
sinks above the SAE's ``max_norm``, as everywhere in saelab) are never encoded; in a window their
activation is NaN, as is any position outside the context.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from saelab.sae import SparseAutoencoder, SwitchSAE
from saelab.store import ActivationStore

# Activation histogram: log2 bins of width 1/HIST_BINS_PER_OCTAVE octave over
# [2^HIST_LOG2_MIN, 2^HIST_LOG2_MAX); smaller and larger activations fall in the end bins.
HIST_BINS_PER_OCTAVE = 4
HIST_LOG2_MIN = -10
HIST_LOG2_MAX = 14
HIST_BINS = (HIST_LOG2_MAX - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE


def hist_bin(values: Tensor) -> Tensor:
    """Histogram bin index [n] int64 of positive activations ``values [n]``: bin b covers
    ``[2^(HIST_LOG2_MIN + b / HIST_BINS_PER_OCTAVE), 2^(HIST_LOG2_MIN + (b + 1) / ...))``."""
    b = torch.floor((values.double().log2() - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE)
    return b.clamp(0, HIST_BINS - 1).long()


def hist_edges() -> np.ndarray:
    """The HIST_BINS + 1 bin edges of :func:`hist_bin` (activation units)."""
    return 2.0 ** (HIST_LOG2_MIN + np.arange(HIST_BINS + 1) / HIST_BINS_PER_OCTAVE)


def sample_keys(rows: Tensor, latents: Tensor, d_sae: int, seed: int) -> Tensor:
    """Pseudo-random keys in [0, 1) [n] float64 of the firings ``(rows [n], latents [n])``: a
    splitmix64 hash of ``row * d_sae + latent`` and ``seed``, so the sample does not depend on
    how the pass is batched (Steele et al. 2014, "Fast splittable pseudorandom number
    generators")."""
    with np.errstate(over="ignore"):
        z = rows.numpy().astype(np.uint64) * np.uint64(d_sae) + latents.numpy().astype(np.uint64)
        z = z + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / float(2**53))


class RunningTopN:
    """Per latent, the ``n`` entries with the largest score seen so far (ties: the earlier row
    wins), each with its value and a window of activations.

    State (``d_sae`` latents, ``n`` slots, ``window`` positions): ``score [d_sae, n]`` float64
    (-inf in an empty slot), ``row [d_sae, n]`` int64 (-1 empty), ``value [d_sae, n]`` float32,
    ``windows [d_sae, n, window]`` float32; each latent's slots sorted best first.
    """

    def __init__(self, d_sae: int, n: int, window: int) -> None:
        if n < 1:
            raise ValueError(f"RunningTopN: n must be >= 1, got {n}")
        self.d_sae, self.n = d_sae, n
        self.score = torch.full((d_sae, n), float("-inf"), dtype=torch.float64)
        self.row = torch.full((d_sae, n), -1, dtype=torch.long)
        self.value = torch.zeros(d_sae, n)
        self.windows = torch.full((d_sae, n, window), float("nan"))

    def update(
        self, latents: Tensor, rows: Tensor, scores: Tensor, values: Tensor, windows_of
    ) -> None:
        """Offer the entries ``latents, rows [m]`` int64, ``scores [m]`` float64, ``values [m]``
        of one batch, whose rows all come after every row offered before. ``windows_of(idx)``
        returns the windows ``[len(idx), window]`` of the offered entries ``idx``; it is called
        only for those that enter the top-n."""
        full = self.row[:, -1] >= 0
        bar = torch.where(full, self.score[:, -1], float("-inf"))
        keep = scores > bar[latents]  # a later row loses ties, so only strictly better enter
        if not keep.any():
            return
        idx = keep.nonzero().squeeze(1)
        touched = torch.zeros(self.d_sae, dtype=torch.bool)
        touched[latents[idx]] = True  # only these latents' slots change
        lat_old, slot_old = ((self.row >= 0) & touched[:, None]).nonzero(as_tuple=True)
        lat = torch.cat([lat_old, latents[idx]])
        score = torch.cat([self.score[lat_old, slot_old], scores[idx]])
        row = torch.cat([self.row[lat_old, slot_old], rows[idx]])
        source = torch.cat([-1 - slot_old, torch.arange(len(idx))])  # < 0: old slot, else new
        order = _lexsort(lat, -score, row)
        lat, score, row, source = lat[order], score[order], row[order], source[order]
        rank = _rank_in_group(lat)
        taken = rank < self.n
        lat, score, row, source, rank = (t[taken] for t in (lat, score, row, source, rank))
        old = source < 0
        new_value = torch.zeros(len(lat))
        new_windows = torch.empty(len(lat), self.windows.shape[2])
        new_value[old] = self.value[lat[old], -1 - source[old]]
        new_windows[old] = self.windows[lat[old], -1 - source[old]]
        fresh = idx[source[~old]]
        new_value[~old] = values[fresh].float()
        if len(fresh):
            new_windows[~old] = windows_of(fresh)
        self.score[lat, rank], self.row[lat, rank] = score, row
        self.value[lat, rank], self.windows[lat, rank] = new_value, new_windows


def _lexsort(*keys: Tensor) -> Tensor:
    """Indices that sort by ``keys[0]``, then ``keys[1]``, ... (ascending, stable)."""
    order = torch.arange(len(keys[0]))
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def _rank_in_group(sorted_groups: Tensor) -> Tensor:
    """Position of each entry within its run of equal values in ``sorted_groups [m]``."""
    if len(sorted_groups) == 0:
        return sorted_groups.clone()
    starts = torch.ones(len(sorted_groups), dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start_index = torch.where(starts, torch.arange(len(sorted_groups)), 0).cummax(0).values
    return torch.arange(len(sorted_groups)) - start_index


@dataclass(frozen=True)
class FeatureStats:
    """What :class:`FeatureCollector` gathered (``d_sae`` latents; ``n_top`` and ``n_samples``
    slots, empty slots have row -1; ``window = before + 1 + after`` positions).

    n_tokens: tokens encoded (excluded ones not counted); n_excluded: tokens left out.
    fire_counts [d_sae] int64; act_sums [d_sae] float64 (sum of f_ti over firings);
    hist [d_sae, HIST_BINS] int64 (see :func:`hist_bin`);
    top_rows / top_values / top_windows [d_sae, n_top(, window)]: the top-activating firings;
    sample_rows / sample_values / sample_windows [d_sae, n_samples(, window)]: a uniform random
    sample of the firings (without replacement);
    expert_counts [n_experts] int64 tokens routed to each expert (Switch SAEs), else None.
    """

    n_tokens: int
    n_excluded: int
    fire_counts: Tensor
    act_sums: Tensor
    hist: Tensor
    top_rows: Tensor
    top_values: Tensor
    top_windows: Tensor
    sample_rows: Tensor
    sample_values: Tensor
    sample_windows: Tensor
    expert_counts: Tensor | None


class FeatureCollector:
    """Accumulates :class:`FeatureStats` over batches of whole contexts (module docstring).

    Args:
        d_sae: latents; n_top: top-activating firings kept per latent; n_samples: random
            firings kept per latent; before, after: window positions before and after the
            firing token; ctx_len: tokens per context; seed: of the sample keys.
    """

    def __init__(
        self, d_sae: int, n_top: int, n_samples: int, before: int, after: int, ctx_len: int,
        seed: int,
    ) -> None:  # fmt: skip
        self.d_sae, self.ctx_len, self.seed = d_sae, ctx_len, seed
        self.offsets = torch.arange(-before, after + 1)  # [window]
        window = len(self.offsets)
        self.top = RunningTopN(d_sae, n_top, window)
        self.samples = RunningTopN(d_sae, n_samples, window)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)
        self.act_sums = torch.zeros(d_sae, dtype=torch.float64)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.long)
        self.n_tokens = self.n_excluded = 0
        self.expert_counts: Tensor | None = None
        self._next_row = 0

    def update(self, first_row: int, acts_TS: Tensor, kept_T: Tensor) -> None:
        """Add the batch of rows ``first_row .. first_row + T - 1`` (whole contexts, after every
        row added before): ``acts_TS [T, d_sae]`` float32 activations (ignored where not kept),
        ``kept_T [T]`` bool, False for excluded tokens.

        Raises:
            ValueError: rows out of order or not whole contexts.
        """
        T = acts_TS.shape[0]
        if first_row != self._next_row or first_row % self.ctx_len or T % self.ctx_len:
            raise ValueError(
                f"FeatureCollector: expected whole contexts from row {self._next_row}, got "
                f"rows {first_row}..{first_row + T}"
            )
        self._next_row += T
        self.n_tokens += int(kept_T.sum())
        self.n_excluded += int((~kept_T).sum())
        acts_TS = torch.where(kept_T[:, None], acts_TS.float(), 0.0)
        t, lat = (acts_TS > 0).nonzero(as_tuple=True)  # row-major: by token, then latent
        values = acts_TS[t, lat]
        self.fire_counts += torch.bincount(lat, minlength=self.d_sae)
        self.act_sums.index_add_(0, lat, values.double())
        self.hist += torch.bincount(lat * HIST_BINS + hist_bin(values), minlength=len(self.hist))
        rows = t + first_row
        windows_of = self._windows_of(acts_TS, kept_T, t, lat)
        self.top.update(lat, rows, values.double(), values, windows_of)
        keys = -sample_keys(rows, lat, self.d_sae, self.seed)  # largest -key = smallest key
        self.samples.update(lat, rows, keys, values, windows_of)

    def add_expert_counts(self, expert_T: Tensor, n_experts: int) -> None:
        """Count the kept tokens routed to each expert (``expert_T [n_kept]`` int64)."""
        counts = torch.bincount(expert_T.cpu(), minlength=n_experts)
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts

    def _windows_of(self, acts_TS: Tensor, kept_T: Tensor, t: Tensor, lat: Tensor):
        """``windows_of(idx)`` for :meth:`RunningTopN.update`: the latent's activations at the
        window positions of firings ``idx`` [len(idx), window] (NaN outside the context or at
        excluded tokens)."""

        def windows_of(idx: Tensor) -> Tensor:
            pos = (t[idx] % self.ctx_len)[:, None] + self.offsets  # [m, window]
            inside = (pos >= 0) & (pos < self.ctx_len)
            tok = (t[idx] - t[idx] % self.ctx_len)[:, None] + pos.clamp(0, self.ctx_len - 1)
            vals = acts_TS[tok, lat[idx][:, None]]
            return torch.where(inside & kept_T[tok], vals, float("nan"))

        return windows_of

    def result(self) -> FeatureStats:
        return FeatureStats(
            n_tokens=self.n_tokens, n_excluded=self.n_excluded, fire_counts=self.fire_counts,
            act_sums=self.act_sums, hist=self.hist.view(self.d_sae, HIST_BINS),
            top_rows=self.top.row, top_values=self.top.value, top_windows=self.top.windows,
            sample_rows=self.samples.row, sample_values=self.samples.value,
            sample_windows=self.samples.windows, expert_counts=self.expert_counts,
        )  # fmt: skip


def iter_contexts(store: ActivationStore, batch_contexts: int) -> Iterator[tuple[int, Tensor]]:
    """One pass over ``store`` in row order in blocks of ``batch_contexts`` whole contexts
    (the last may hold fewer): ``(first_row, x [n_ctx * ctx_len, d_in] float32)``. Each zarr chunk
    is read once."""
    rows_per_block = batch_contexts * store.ctx_len
    carry = torch.empty(0, store.d_in)
    first = 0
    for c in range(store.n_chunks):
        block = torch.cat([carry, store.read(*store.chunk_range(c))])
        n_full = len(block) // rows_per_block
        for b in range(n_full):
            yield first, block[b * rows_per_block : (b + 1) * rows_per_block]
            first += rows_per_block
        carry = block[n_full * rows_per_block :]
    if len(carry):
        yield first, carry


@torch.no_grad()
def collect_features(
    sae: SparseAutoencoder,
    activations: str | Path,
    *,
    n_top: int,
    n_samples: int,
    before: int,
    after: int,
    batch_contexts: int,
    exclude_first_position: bool,
    seed: int,
) -> FeatureStats:
    """Run ``sae``'s inference function (``sae.encode``: BatchTopK and Sampled use their global
    threshold) over every row of the activation store ``activations`` and collect
    :class:`FeatureStats`.

    Excluded, never encoded: position 0 of each context when ``exclude_first_position``, and
    tokens whose norm exceeds ``sae.metadata["max_norm"]`` (when set), as in training and
    evaluation. Memory: one block of ``batch_contexts * ctx_len`` tokens (its dense
    ``[tokens, d_sae]`` code) plus the collector's per-latent state.
    """
    store = ActivationStore(activations)
    max_norm = sae.metadata.get("max_norm")
    collector = FeatureCollector(sae.d_sae, n_top, n_samples, before, after, store.ctx_len, seed)
    blocks = iter_contexts(store, batch_contexts)
    total = -(-store.n_tokens // (batch_contexts * store.ctx_len))
    for first, x in tqdm(blocks, total=total, desc="feature pass", unit="block"):
        kept = torch.ones(len(x), dtype=torch.bool)
        if exclude_first_position:
            kept &= store.keep_mask(first, first + len(x))
        if max_norm is not None:
            kept &= x.norm(dim=-1) <= max_norm
        acts = torch.zeros(len(x), sae.d_sae)
        if kept.any():
            acts[kept] = sae.encode(x[kept])
        if isinstance(sae, SwitchSAE) and kept.any():
            collector.add_expert_counts(sae.route(x[kept])[1], sae.n_experts)
        collector.update(first, acts, kept)
    return collector.result()
