"""Top-k selection kernels: each row's k largest (:func:`row_topk`), the batch's ``n_keep``
largest (:func:`batch_topk`, BatchTopK's selection, Bussmann et al. 2024, sec. 3) and the same
over the global batch of data-parallel training (:func:`global_batch_topk`).

Exact: each returns the entries ``torch.topk`` would (the same values; among tied entries
possibly other indices), computed with less work than one ``topk`` over all entries (measured
in docs/performance.md, "Host memory and the per-row selection"; ``bench/topk.py``). Tests
compare each against ``torch.topk`` (``tests/test_activations.py``).

Shapes (suffixes, see :mod:`saelab.sae`): ``_BS`` [batch, d_sae] (or [batch, n]), ``_BK``
[batch, k], ``_K`` [n_keep] flat, ``_C`` candidates; indices int64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab import distributed

# Rows of the batch used to find a lower bound for BatchTopK's batch threshold (see
# :func:`_batch_topk_indices_bounded`); a speed knob only, the selection is exact whatever it is.
_SAMPLE_ROWS = 128


def row_topk(x_BS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each row's ``k`` largest entries of ``x_BS [batch, n]`` (any float dtype): (values
    [batch, k], indices [batch, k] int64), unordered: ``x_BS.topk(k, dim=1, sorted=False)``
    (the same values; among tied entries possibly other indices), faster on CPU for ``k << n``
    (docs/performance.md; ``bench/topk.py``).

    Two levels of chunk maxima. Split a row into chunks (entry j in chunk ``j mod (n / c1)``, so
    the chunk maxima are an elementwise max of ``c1`` contiguous slices, one pass over the row).
    The k largest entries lie in the k chunks of largest maximum: a chunk holding one of them,
    value v, has a maximum >= v; were it not among those k chunks, their k maxima and v would be
    k + 1 entries >= v, and v would not be among the k largest (ties: the values selected are the
    same). The same holds one level up for groups of ``c2`` chunks. So: group maxima -> the k
    best groups -> their ``k * c2`` chunk maxima -> the k best chunks -> their ``k * c1`` entries
    -> ``topk``. Only the first level reads all n entries; ``torch.topk`` over them costs about
    three such passes. Falls back to ``torch.topk`` when ``x_BS`` is not contiguous or its rows
    do not split into at least ``2k`` groups.
    """
    batch, n = x_BS.shape
    c1 = 8 if k <= 64 else 4  # entries per chunk: more chunks to gather from for a large k
    for c2 in (8, 4):  # chunks per group
        n2 = n // (c1 * c2)
        if n % (c1 * c2) == 0 and n2 >= 2 * k and x_BS.is_contiguous():
            break
    else:
        return x_BS.topk(k, dim=1, sorted=False)
    n1 = n // c1
    max_BN1 = x_BS.view(batch, c1, n1).amax(1)  # chunk j: entries j + i * n1
    max_BN2 = max_BN1.view(batch, c2, n2).amax(1)  # group g: chunks g + i * n2
    chunks_BC = _members(max_BN2.topk(k, dim=1, sorted=False).indices, c2, n2)  # [batch, k*c2]
    best_BK = max_BN1.gather(1, chunks_BC).topk(k, dim=1, sorted=False).indices
    entries_BC = _members(chunks_BC.gather(1, best_BK), c1, n1)  # [batch, k*c1]
    values_BK, pick_BK = x_BS.gather(1, entries_BC).topk(k, dim=1, sorted=False)
    return values_BK, entries_BC.gather(1, pick_BK)


def _members(groups_BK: Tensor, size: int, stride: int) -> Tensor:
    """[batch, k] int64 group indices g -> [batch, k * size] indices ``g + i * stride`` of their
    members, i < size."""
    offsets = torch.arange(size, device=groups_BK.device) * stride
    return (groups_BK.unsqueeze(2) + offsets).flatten(1)


def batch_topk(pre_BS: Tensor, n_keep: int) -> tuple[Tensor, Tensor]:
    """The ``n_keep`` largest entries of ``pre_BS [batch, d_sae]`` as (rows, cols), [n_keep]
    int64 each, token-major (rows non-decreasing): BatchTopK's selection (Bussmann et al. 2024,
    sec. 3).

    Exact, without a selection over all ``batch * d_sae`` entries (one ``topk`` over a 67M-entry
    tensor runs on one thread) and without a sort: each token's ``m = 4 * n_keep / batch``
    largest entries are the candidates, and the ``n_keep`` largest candidates are kept, read back
    in token order from a ``[batch, m]`` mask. With θ the smallest kept value, a token whose
    smallest candidate is < θ has no entry >= θ outside its candidates, so when every token is
    like that the result is the global selection (up to the order of ties, which ``topk`` leaves
    unspecified). A token with all ``m`` candidates >= θ (more than 4× the mean share, and
    positive) makes it fall back to :func:`_batch_topk_indices_bounded`.
    """
    batch, d_sae = pre_BS.shape
    n_keep = min(n_keep, pre_BS.numel())
    m = min(d_sae, 4 * math.ceil(n_keep / batch))
    cand_v_BM, cand_i_BM = row_topk(pre_BS, m)
    top = cand_v_BM.flatten().topk(n_keep, sorted=False)
    if m < d_sae:
        theta = top.values.min()
        row_min_B = cand_v_BM.min(dim=1).values
        if bool(((row_min_B >= theta) & (row_min_B > 0)).any()):
            flat_N = _batch_topk_indices_bounded(pre_BS, n_keep).sort().values
            return torch.div(flat_N, d_sae, rounding_mode="floor"), flat_N % d_sae
    kept_BM = torch.zeros(batch, m, dtype=torch.bool, device=pre_BS.device)
    kept_BM.view(-1)[top.indices] = True
    rows_N, slots_N = kept_BM.nonzero().unbind(1)
    return rows_N, cand_i_BM[rows_N, slots_N]


def global_batch_topk(pre_BS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """BatchTopK's selection of the ``k * batch`` largest entries over the *global* batch of
    data-parallel training, as (rows, cols) [n_kept] int64 of this rank's ``pre_BS [batch,
    d_sae]``, token-major; :func:`batch_topk` of ``pre_BS`` with ``n_keep = k * batch`` at world
    size 1 (the same call as before data parallelism).

    Exact: the global kept set restricted to one rank lies within that rank's own ``n_keep``
    largest entries (``n_keep = k * global batch``), so the ranks all-gather those values, take
    θ = the ``n_keep``-th largest of them, and each keeps its entries > θ; entries equal to θ
    are kept in rank order, then token order, until ``n_keep`` are kept in all. One process
    breaks such ties in ``topk``'s unspecified order; with float32 pre-activations of
    continuous inputs ties at θ do not occur in practice, in bf16 they can (then the kept set
    differs only among equal values).
    """
    batch, d_sae = pre_BS.shape
    if distributed.world_size() == 1:
        return batch_topk(pre_BS, k * batch)
    n_global = distributed.global_count(batch, pre_BS.device)
    n_keep = min(k * n_global, n_global * d_sae)
    rows_C, cols_C = batch_topk(pre_BS, min(n_keep, pre_BS.numel()))  # this rank's candidates
    values_C = pre_BS[rows_C, cols_C].float()
    gathered, _ = distributed.all_gather_cat(values_C)
    theta = gathered.topk(n_keep, sorted=False).values.min()
    greater_C, ties_C = values_C > theta, values_C == theta
    counts = torch.zeros(2, distributed.world_size(), dtype=torch.int64, device=pre_BS.device)
    counts[0, distributed.rank()], counts[1, distributed.rank()] = greater_C.sum(), ties_C.sum()
    counts = distributed.all_sum(counts)
    tie_budget = n_keep - int(counts[0].sum()) - int(counts[1, : distributed.rank()].sum())
    tie_order_C = ties_C.cumsum(0) - 1  # index of each tie among this rank's, token order
    keep_C = greater_C | (ties_C & (tie_order_C < tie_budget))
    return rows_C[keep_C], cols_C[keep_C]


def _batch_topk_indices_bounded(pre_BS: Tensor, n_keep: int) -> Tensor:
    """Flat indices of :func:`batch_topk`'s selection, unordered, for any distribution of the
    kept entries over the tokens: a quantile of a few rows gives a bound t, and the selection
    runs over the entries > t only.
    When fewer than ``n_keep`` entries exceed t, the kept set is not contained in them and this
    falls back to one ``topk`` over everything; when at least ``n_keep`` do, every one of the
    ``n_keep`` largest is among them."""
    flat_F = pre_BS.flatten()
    rows = pre_BS[:: max(1, pre_BS.shape[0] // _SAMPLE_ROWS)].flatten()
    # Aim at twice the kept fraction so that the bound holds with a wide margin.
    frac = min(1.0, 2.0 * n_keep / flat_F.numel())
    rank = max(1, int((1.0 - frac) * rows.numel()))
    bound = rows.kthvalue(rank).values
    candidates_C = (flat_F > bound).nonzero().squeeze(1)
    if candidates_C.numel() < n_keep:
        return flat_F.topk(n_keep, sorted=False).indices
    top = flat_F[candidates_C].topk(n_keep, sorted=False)
    return candidates_C[top.indices]
