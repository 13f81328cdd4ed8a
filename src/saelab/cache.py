"""The cache stage's work: token contexts -> activations at the hookpoint in a zarr store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from saelab.capture import capture_resid
from saelab.config import PipelineConfig, recorded_path
from saelab.store import ActivationWriter, check_finite

log = logging.getLogger(__name__)


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

    Raises:
        InputError: the model's activations hold NaN or inf (e.g. a float16 overflow); the
            message names the store rows, and nothing is written.
    """
    n_ctx, ctx_len = contexts.shape
    d_in = model.config.get_text_config().hidden_size
    attrs = {
        "model": recorded_path(cfg.model.name_or_path),
        "gguf_file": cfg.model.gguf_file,
        "model_dtype": cfg.model.dtype,
        "hookpoint": cfg.model.hookpoint,
        "ctx_len": ctx_len,
        "tokens_source": source,
    }
    device = next(model.parameters()).device
    batch = cfg.cache.batch_size
    start = time.perf_counter()
    with ActivationWriter(
        out, n_ctx * ctx_len, d_in, store_dtype or cfg.cache.store_dtype, cfg.cache.codec,
        cfg.cache.codec_level, cfg.cache.chunk_tokens, attrs,
    ) as writer, tqdm(total=n_ctx * ctx_len, desc=f"cache {out.name}", unit="tok",
                      unit_scale=True) as bar:  # fmt: skip
        for i in range(0, n_ctx, batch):
            ids = torch.from_numpy(contexts[i : i + batch].astype(np.int64)).to(device)
            # [batch * ctx_len, d_in]
            resid = capture_resid(model, cfg.model, ids).reshape(-1, d_in)
            check_finite(
                resid, f"cache: the model's {cfg.model.hookpoint} activations for store {out}",
                i * ctx_len, f"check model.dtype (now {cfg.model.dtype}) and the model",
            )  # fmt: skip
            writer.write(resid)
            bar.update(ids.numel())
        seconds = time.perf_counter() - start
        writer.attrs["tokens_per_s"] = n_ctx * ctx_len / seconds
    log.info("cached %d tokens of %s in %.0f s", n_ctx * ctx_len, source, seconds)
