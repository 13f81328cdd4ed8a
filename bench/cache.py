"""Benchmark: the cache stage against the truncated forward alone, and truncated vs full forward.

On real token contexts and the real model (``params.yaml``), each repeat times, on one batch of
``cache.batch_size`` contexts, one after the other:

- ``capture_resid``: the truncated forward (what the cache stage computes);
- a full forward (all layers, final norm, ``lm_head`` logits) and the decoder stack without
  ``lm_head`` (``model.model``);
- the cache stage's writing work on one whole store chunk (``cache.chunk_tokens`` rows, the
  repeat's captured activations tiled): :class:`saelab.store.ActivationWriter` as configured
  (bf16 encode, chunk buffer, Blosc-zstd compression, zarr write, close).

``cache_split`` runs exactly these two steps in turn per batch, so its time per token is the
forward's plus the writer's: ``stage tokens/s = 1 / (1/forward + 1/writer)``. Alternating the
operations within each repeat and taking medians keeps the ratios meaningful on a shared
machine whose load moves absolute times by 3x. ``--end-to-end N`` also times ``cache_split``
itself on N batches against ``capture_resid`` on the same N (its chunk is then clamped to
N batches' tokens). Targets (issue 5): cache stage within 10% of the truncated forward;
truncated forward ~= (layers up to the hook) / (all layers) of a full forward, printed next to
the matmul-FLOP ratio that counts ``lm_head``. Run::

    python bench/cache.py --tokens /work/main/data/tokens [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saelab.cache import cache_split
from saelab.capture import capture_resid, decoder_layers, load_model
from saelab.config import PipelineConfig, load_params
from saelab.data import read_tokens
from saelab.store import ActivationWriter


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linear_params(module: nn.Module) -> int:
    """Weights of the ``nn.Linear`` layers in ``module`` (2 FLOPs each per token)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flop_ratio(model: nn.Module, n_run: int) -> float:
    """Matmul FLOPs of ``n_run`` decoder layers over those of a full forward (all layers plus
    ``lm_head``); attention-score FLOPs (~4% of a layer at ctx 128) are left out."""
    layers = decoder_layers(model)
    per_layer = linear_params(layers[0])
    return n_run * per_layer / (len(layers) * per_layer + model.lm_head.weight.numel())


def write_chunk_seconds(cfg: PipelineConfig, resid: torch.Tensor, out: Path) -> float:
    """Seconds to write one ``cfg.cache.chunk_tokens``-row store of ``resid [n, d_in]`` rows
    (tiled) with the cache stage's writer settings, batch by batch as ``cache_split`` does."""
    n, d_in = resid.shape
    n_tokens = cfg.cache.chunk_tokens // n * n
    start = time.perf_counter()
    with ActivationWriter(out, n_tokens, d_in, cfg.cache.store_dtype, cfg.cache.codec,
                          cfg.cache.codec_level, cfg.cache.chunk_tokens,
                          {"ctx_len": cfg.data.ctx_len}) as writer:  # fmt: skip
        for _ in range(n_tokens // n):
            writer.write(resid)
    return (time.perf_counter() - start) / n_tokens * n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--end-to-end", type=int, default=0, metavar="N",
                        help="also time cache_split on N batches (0: skip)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    model = load_model(cfg.model, torch.device("cpu"))
    bs = cfg.cache.batch_size
    contexts = read_tokens(args.tokens, "train")  # [n_ctx, ctx_len] int32
    n_batch = max(args.repeats, args.end_to_end)
    batches = [torch.from_numpy(contexts[i * bs : (i + 1) * bs].astype(np.int64))
               for i in range(n_batch)]  # fmt: skip
    n_tok = batches[0].numel()

    capture_resid(model, cfg.model, batches[0])  # warm-up
    times: dict[str, list[float]] = {"truncated": [], "write": [], "full": [], "stack": []}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for r, ids in enumerate(batches[: args.repeats]):  # interleaved, one batch each
            start = time.perf_counter()
            resid = capture_resid(model, cfg.model, ids).reshape(n_tok, -1)
            times["truncated"].append(time.perf_counter() - start)
            times["full"].append(_timed(lambda ids=ids: model(input_ids=ids, use_cache=False)))
            times["stack"].append(
                _timed(lambda ids=ids: model.model(input_ids=ids, use_cache=False))
            )
            times["write"].append(write_chunk_seconds(cfg, resid, Path(tmp) / f"w{r}"))
        e2e = {"stage": [], "truncated": []}
        part, part_batches = contexts[: bs * args.end_to_end], batches[: args.end_to_end]
        for r in range(args.repeats if args.end_to_end else 0):
            out = Path(tmp) / f"e{r}"
            e2e["stage"].append(_timed(lambda o=out: cache_split(model, cfg, part, o, "bench")))
            e2e["truncated"].append(
                _timed(lambda: [capture_resid(model, cfg.model, ids) for ids in part_batches])
            )

    tps = {name: n_tok / statistics.median(t) for name, t in times.items()}
    stage_tps = 1 / (1 / tps["truncated"] + 1 / tps["write"])
    n_run = cfg.model.layer + (cfg.model.site == "resid_post")
    n_layers = len(decoder_layers(model))
    print(f"torch {torch.__version__}, {args.threads} threads; {cfg.model.hookpoint} "
          f"({n_run} of {n_layers} layers run); batch {bs} x {contexts.shape[1]} tokens; "
          f"store {cfg.cache.store_dtype} {cfg.cache.codec} level {cfg.cache.codec_level}, "
          f"chunk {cfg.cache.chunk_tokens}; median of {args.repeats}")  # fmt: skip
    for name, label in [("truncated", "truncated forward (capture_resid)"),
                        ("write", "store writer alone (whole chunk)"),
                        ("full", "full forward (logits)"),
                        ("stack", "decoder stack, no lm_head")]:  # fmt: skip
        print(f"{label:<36} tokens/s {tps[name]:>9,.0f}")
    print(f"{'cache stage (forward + writer)':<36} tokens/s {stage_tps:>9,.0f}")
    print(f"cache stage / truncated forward, time  {tps['truncated'] / stage_tps:.3f}"
          "   (target <= 1.10)")  # fmt: skip
    print(f"truncated / full forward, time         {tps['full'] / tps['truncated']:.3f}"
          f"   (layers {n_run}/{n_layers} = {n_run / n_layers:.3f}; "
          f"matmul FLOPs with lm_head {flop_ratio(model, n_run):.3f})")  # fmt: skip
    print(f"truncated / decoder stack, time        {tps['stack'] / tps['truncated']:.3f}"
          f"   (layers {n_run}/{n_layers} = {n_run / n_layers:.3f})")  # fmt: skip
    if args.end_to_end:
        ratio = statistics.median(e2e["stage"]) / statistics.median(e2e["truncated"])
        print(f"end to end: cache_split / capture_resid on {args.end_to_end} batches, time "
              f"{ratio:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
