"""The cache stage's work: token contexts -> activations at the hookpoint in a zarr store.

In one process the splits are written by :class:`~saelab.store.ActivationWriter`. Under
``torch.distributed`` (``saelab cache`` with ``distributed.cache_nproc_per_node`` > 1, or
started by torchrun; :func:`saelab.distributed.data_parallel` active) the N ranks write one
store per split together, and it is the store of one process, chunk file for chunk file:

- rank ``r`` owns a run of whole chunks (:func:`~saelab.store.chunk_part`: chunk counts
  differing by at most one, in rank order), and is the only writer of their files;
- it runs the forward passes of the one-process loop that produce those rows: the batches of
  ``cache.batch_size`` contexts starting at multiples of it (:func:`batch_starts`), the same
  contexts in the same batch shapes, so the same floats on a given device and thread count;
  a batch that straddles two ranks' rows is computed by both, each writing its own rows;
- the store's attributes are global: rank 0 creates the array and, after a barrier, writes
  the attributes of the one-process store (``tokens_per_s``: all the store's tokens over the
  wall time between the barriers); the directory of both splits is moved into place by rank 0
  once every rank is done (:func:`~saelab.store.shared_atomic_dir`).

A rank with no chunk (more ranks than chunks) only waits at the barriers.

Several hookpoints from one truncated forward (issue 14, part 3; ``model.extra_hookpoints``):
:func:`cache_split_hookpoints` writes one store per hookpoint, each the store :func:`cache_split`
writes for that hookpoint; :func:`cache_activations` uses it when there are extra hookpoints (one
process only: params refuse them with ``distributed.cache_nproc_per_node`` > 1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from saelab import distributed
from saelab.capture import (
    capture_resid,
    capture_resids,
    check_hookpoint,
    check_hookpoints,
    decoder_layers,
    dtype_name,
)
from saelab.config import ConfigError, PipelineConfig, recorded_path
from saelab.data import read_tokens
from saelab.store import (
    ActivationWriter,
    StorePartWriter,
    check_finite,
    chunk_part,
    create_shared_store,
    finish_shared_store,
    shared_atomic_dir,
    store_attrs,
)

log = logging.getLogger(__name__)


def cache_activations(
    model: nn.Module,
    cfg: PipelineConfig,
    tokens: str,
    out: str | Path,
    hookpoints_out: str | Path | None = None,
) -> None:
    """Both splits of the token group ``tokens`` (``cache.max_train_tokens`` /
    ``max_eval_tokens`` of them, whole contexts) -> the stores ``<out>/train`` and
    ``<out>/eval`` at ``model.hookpoint``, and ``<hookpoints_out>/<hookpoint>/{train,eval}``
    at each of ``model.extra_hookpoints``, from one truncated forward per batch
    (:func:`cache_split_hookpoints`). Without extra hookpoints the primary stores are written
    by :func:`cache_split` as ever (the distributed cache included), and ``hookpoints_out``,
    when given, is an empty directory (the cache stage's output for DVC).

    Each directory is written atomically (:func:`~saelab.store.shared_atomic_dir`: by all
    ranks under data parallelism, module docstring), ``hookpoints_out`` moved into place
    first, ``out`` last: after an interrupt at most one of them is new, and the stage reruns.

    Raises:
        ConfigError: extra hookpoints but no ``hookpoints_out``, or an extra hookpoint's layer
            is not in the model.
        InputError: non-finite activations (:func:`cache_split`); nothing is written.
    """
    extras = cfg.model.extra_hookpoints
    if extras and hookpoints_out is None:
        raise ConfigError("params: model.extra_hookpoints needs saelab cache --hookpoints-out")
    check_hookpoints(cfg.model, len(decoder_layers(model)))
    with ExitStack() as stack:
        tmp = stack.enter_context(shared_atomic_dir(out))
        if hookpoints_out is not None:  # entered last, so moved into place first
            tmp_extras = stack.enter_context(shared_atomic_dir(hookpoints_out))
        for split, contexts, dtype in _splits(cfg, tokens):
            source = f"{tokens}:{split}"
            if extras:
                outs = [tmp / split, *(tmp_extras / h / split for h in extras)]
                hookpoints = cfg.model.hookpoints
                cache_split_hookpoints(model, cfg, hookpoints, contexts, outs, source, dtype)
            else:
                cache_split(model, cfg, contexts, tmp / split, source, dtype)


def _splits(cfg: PipelineConfig, tokens: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """``(split, contexts [n_ctx, ctx_len] int32, store dtype)`` of the train and eval splits
    of the token group ``tokens``, cut to ``cache.max_train_tokens`` / ``max_eval_tokens``
    (whole contexts)."""
    splits = {
        "train": (cfg.cache.max_train_tokens, cfg.cache.store_dtype),
        "eval": (cfg.cache.max_eval_tokens, cfg.cache.eval_store_dtype),
    }
    for split, (max_tokens, dtype) in splits.items():
        contexts = read_tokens(tokens, split)
        if max_tokens is not None:
            contexts = contexts[: max_tokens // contexts.shape[1]]
        yield split, contexts, dtype


def _attrs(cfg: PipelineConfig, model: nn.Module, ctx_len: int, source: str) -> dict:
    """The store's provenance; ``model_dtype``: the dtype the LM ran in (``model.dtype: auto``
    resolved)."""
    return {
        "model": recorded_path(cfg.model.name_or_path),
        "gguf_file": cfg.model.gguf_file,
        "model_dtype": dtype_name(model),
        "hookpoint": cfg.model.hookpoint,
        "ctx_len": ctx_len,
        "tokens_source": source,
    }


def cache_split(
    model: nn.Module,
    cfg: PipelineConfig,
    contexts: np.ndarray,
    out: Path,
    source: str,
    store_dtype: str | None = None,
) -> None:
    """Run the truncated forward over ``contexts`` and write ``[n_ctx * ctx_len, d_in]``
    activations (all positions, position 0 included; readers drop it) to the store ``out``.

    contexts: [n_ctx, ctx_len] int32 token ids. store_dtype: the stored dtype (None:
    ``cfg.cache.store_dtype``). Written atomically by :class:`ActivationWriter`;
    attrs record the model, hookpoint, ctx_len, the token array it came from and tokens/s.
    Under data parallelism every rank calls it with the same arguments and writes its chunks
    (module docstring; ``out`` then lies in :func:`~saelab.store.shared_atomic_dir`'s
    directory).

    Raises:
        InputError: the model's activations hold NaN or inf (e.g. a float16 overflow); the
            message names the store rows, and nothing is written.
    """
    if distributed.world_size() > 1:
        _cache_split_part(model, cfg, contexts, out, source, store_dtype or cfg.cache.store_dtype)
        return
    n_ctx, ctx_len = contexts.shape
    d_in = model.config.get_text_config().hidden_size
    attrs = _attrs(cfg, model, ctx_len, source)
    batch = cfg.cache.batch_size
    start = time.perf_counter()
    with ActivationWriter(
        out, n_ctx * ctx_len, d_in, store_dtype or cfg.cache.store_dtype, cfg.cache.codec,
        cfg.cache.codec_level, cfg.cache.chunk_tokens, attrs,
    ) as writer, tqdm(total=n_ctx * ctx_len, desc=f"cache {out.name}", unit="tok",
                      unit_scale=True) as bar:  # fmt: skip
        for i in range(0, n_ctx, batch):
            resid = _checked_resid(model, cfg, contexts[i : i + batch], i * ctx_len, out)
            writer.write(resid)
            bar.update(len(resid))
        seconds = time.perf_counter() - start
        writer.attrs["tokens_per_s"] = n_ctx * ctx_len / seconds
    log.info("cached %d tokens of %s in %.0f s", n_ctx * ctx_len, source, seconds)


def cache_split_hookpoints(
    model: nn.Module,
    cfg: PipelineConfig,
    hookpoints: Sequence[str],
    contexts: np.ndarray,
    outs: Sequence[Path],
    source: str,
    store_dtype: str | None = None,
) -> None:
    """:func:`cache_split` for several hookpoints from one truncated forward per batch, up to
    the deepest of them (:func:`~saelab.capture.capture_resids`; issue 14, part 3): ``outs[j]``
    is the store :func:`cache_split` writes with ``model.hookpoint = hookpoints[j]``, byte for
    byte but for ``tokens_per_s`` (here the tokens per second of the shared pass). One process
    only.

    Raises:
        ValueError: ``hookpoints`` and ``outs`` differ in length, a hookpoint is repeated, or
            data parallelism is active.
        ConfigError: a hookpoint is not ``blocks.<L>.hook_resid_pre|post`` of this model.
        InputError: non-finite activations at a hookpoint; no store is written.
    """
    if len(hookpoints) != len(outs):
        raise ValueError(f"{len(hookpoints)} hookpoints but {len(outs)} output stores")
    if distributed.world_size() > 1:
        raise ValueError("cache_split_hookpoints runs in one process (cache_split shards one)")
    models = [cfg.model.at(h) for h in hookpoints]  # ConfigError: model.hookpoint
    for m in models:
        check_hookpoint(m, len(decoder_layers(model)))
    n_ctx, ctx_len = contexts.shape
    d_in = model.config.get_text_config().hidden_size
    device = next(model.parameters()).device
    batch = cfg.cache.batch_size
    start = time.perf_counter()
    with ExitStack() as stack:
        writers = []
        for m, out in zip(models, outs, strict=True):
            attrs = _attrs(cfg.model_copy(update={"model": m}), model, ctx_len, source)
            c = cfg.cache
            writer = ActivationWriter(out, n_ctx * ctx_len, d_in, store_dtype or c.store_dtype,
                                      c.codec, c.codec_level, c.chunk_tokens, attrs)  # fmt: skip
            writers.append(stack.enter_context(writer))
        for i in tqdm(range(0, n_ctx, batch), desc=f"cache {len(models)} hookpoints"):
            ids = torch.from_numpy(contexts[i : i + batch].astype(np.int64)).to(device)
            for m, writer, resid in zip(models, writers, capture_resids(model, models, ids),
                                        strict=True):  # fmt: skip
                resid = resid.reshape(-1, d_in)  # [batch * ctx_len, d_in]
                check_finite(
                    resid, f"cache: the model's {m.hookpoint} activations for store "
                    f"{writer.path}", i * ctx_len,
                    f"check model.dtype (now {cfg.model.dtype}) and the model",
                )  # fmt: skip
                writer.write(resid)
        seconds = time.perf_counter() - start
        for writer in writers:
            writer.attrs["tokens_per_s"] = n_ctx * ctx_len / seconds
    log.info("cached %d tokens of %s at %d hookpoints in %.0f s", n_ctx * ctx_len, source,
             len(models), seconds)  # fmt: skip


def batch_starts(lo: int, hi: int, ctx_len: int, batch: int) -> range:
    """First contexts of the one-process loop's batches (``batch`` contexts from every
    multiple of ``batch``) that hold a row of ``[lo, hi)`` (rows of ``ctx_len``-token
    contexts); empty when ``lo == hi``."""
    if lo >= hi:
        return range(0)
    first, last = lo // ctx_len, (hi - 1) // ctx_len  # contexts holding rows lo and hi - 1
    return range(first // batch * batch, last + 1, batch)


def _checked_resid(
    model: nn.Module, cfg: PipelineConfig, contexts: np.ndarray, first_row: int, out: Path
) -> torch.Tensor:
    """The activations ``[len(contexts) * ctx_len, d_in]`` at params' hookpoint of a batch of
    contexts (``[batch, ctx_len]`` token ids), whose first row is store row ``first_row``.

    Raises:
        InputError: NaN or inf among them (:func:`~saelab.store.check_finite`, naming the rows).
    """
    device = next(model.parameters()).device
    ids = torch.from_numpy(contexts.astype(np.int64)).to(device)
    resid = capture_resid(model, cfg.model, ids).flatten(0, 1)
    check_finite(
        resid, f"cache: the model's {cfg.model.hookpoint} activations for store {out}",
        first_row, f"check model.dtype (now {cfg.model.dtype}) and the model",
    )  # fmt: skip
    return resid


def _cache_split_part(
    model: nn.Module,
    cfg: PipelineConfig,
    contexts: np.ndarray,
    out: Path,
    source: str,
    store_dtype: str,
) -> None:
    """:func:`cache_split` on one rank of several: this rank's chunks of the store ``out``."""
    n_ctx, ctx_len = contexts.shape
    n_tokens, d_in = n_ctx * ctx_len, model.config.get_text_config().hidden_size
    rank, batch = distributed.rank(), cfg.cache.batch_size
    if rank == 0:
        create_shared_store(out, n_tokens, d_in, store_dtype, cfg.cache.codec,
                            cfg.cache.codec_level, cfg.cache.chunk_tokens)  # fmt: skip
    distributed.barrier()  # the array exists
    start = time.perf_counter()
    lo, hi = chunk_part(n_tokens, cfg.cache.chunk_tokens, rank, distributed.world_size())
    with StorePartWriter(out, store_dtype, lo, hi) as part, tqdm(
        total=hi - lo, desc=f"cache {out.name} (rank {rank})", unit="tok", unit_scale=True,
    ) as bar:  # fmt: skip
        for i in batch_starts(lo, hi, ctx_len, batch):
            resid = _checked_resid(model, cfg, contexts[i : i + batch], i * ctx_len, out)
            first = i * ctx_len  # the store row of resid[0]
            own = resid[max(lo - first, 0) : min(hi - first, len(resid))]
            part.write(own)
            bar.update(len(own))
    distributed.barrier()  # every chunk file written
    seconds = time.perf_counter() - start
    if rank == 0:
        attrs = store_attrs(_attrs(cfg, model, ctx_len, source), store_dtype, n_tokens, d_in)
        finish_shared_store(out, {**attrs, "tokens_per_s": n_tokens / seconds})
        log.info("cached %d tokens of %s in %.0f s", n_tokens, source, seconds)
