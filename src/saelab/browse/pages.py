"""The two feature-page stages: ``features@<variant>`` (one SAE's pages) and ``features_index``
(the cross-variant comparison), as library functions called by :mod:`saelab.cli`."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from saelab.browse.build import Lens, PageInfo, write_compare_pages, write_variant_pages
from saelab.browse.collect import collect_features
from saelab.browse.lens import logit_lens, nearest_by_cosine
from saelab.config import ConfigError, PipelineConfig, check_provenance
from saelab.sae import BatchTopK, SwitchSAE, load_sae, read_sae_config

log = logging.getLogger(__name__)


def _eval_tokens(tokens: Path, n_ctx: int, ctx_len: int):
    """The first ``n_ctx`` eval contexts of the token group (those the eval cache holds)."""
    from saelab.data import read_tokens

    contexts = read_tokens(tokens, "eval")
    if contexts.shape[1] != ctx_len or len(contexts) < n_ctx:
        raise ConfigError(
            f"--tokens {tokens}: eval split of shape {contexts.shape} does not hold the "
            f"{n_ctx} contexts of {ctx_len} tokens of the activation cache"
        )
    return contexts[:n_ctx]


def build_features(
    cfg: PipelineConfig, variant: str, sae_dir: Path, tokens: Path, activations: Path, out: Path
) -> dict[str, Any]:
    """Write the feature pages of the SAE in ``sae_dir`` into ``out`` (a new directory).

    One pass of the SAE (its inference function) over every cached eval token
    (``activations/eval``), the logit lens through the model's final norm and unembedding,
    decoder neighbours; see :mod:`saelab.browse.build` for the files. Returns the cost:
    ``wall_s`` (seconds, by part), ``peak_rss_mb`` and ``bytes`` written.

    Raises:
        ConfigError: the SAE is not a ``variant`` SAE, or the tokens do not match the cache.
    """
    from saelab.capture import load_model, load_tokenizer, resolve_device
    from saelab.store import ActivationStore

    fc = cfg.features
    t0 = time.perf_counter()
    sae_cfg = read_sae_config(sae_dir)
    if sae_cfg.get("variant") != variant:
        raise ConfigError(f"--sae {sae_dir} holds a {sae_cfg.get('variant')} SAE, not {variant}")
    sae = load_sae(sae_dir)
    store = ActivationStore(activations / "eval")
    check_provenance(cfg.model, store=store, sae=sae, sae_dir=sae_dir)
    contexts = _eval_tokens(tokens, store.n_tokens // store.ctx_len, store.ctx_len)
    stats = collect_features(
        sae, activations / "eval", n_top=fc.n_top, n_samples=fc.n_samples,
        before=fc.context_before, after=fc.context_after, batch_contexts=fc.batch_contexts,
        exclude_first_position=cfg.sae.exclude_first_position, seed=fc.seed,
    )  # fmt: skip
    t_pass = time.perf_counter()
    model = load_model(cfg.model, resolve_device(cfg.model.device))
    t_model = time.perf_counter()
    top_ids, top_logits, bottom_ids, bottom_logits = logit_lens(model, sae.W_dec, fc.n_logits)
    del model
    nb_ids, nb_cos = nearest_by_cosine(sae.W_dec, sae.W_dec, fc.n_neighbours, exclude_self=True)
    lens = Lens(top_ids, top_logits, bottom_ids, bottom_logits, nb_ids, nb_cos)
    t_lens = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    threshold = sae.activation.threshold if isinstance(sae.activation, BatchTopK) else None
    info = PageInfo(
        variant=variant, variants=cfg.variants, sae=sae_cfg, ctx_len=store.ctx_len,
        before=fc.context_before,
        n_experts=sae.n_experts if isinstance(sae, SwitchSAE) else None,
        threshold=None if threshold is None else float(threshold),
        exclude_first_position=cfg.sae.exclude_first_position, wall_s=t_lens - t0,
    )  # fmt: skip
    decode = lambda ids: tokenizer.batch_decode([[i] for i in ids])  # noqa: E731
    write_variant_pages(out, stats, lens, contexts, decode, info)
    t_end = time.perf_counter()
    cost = {
        "wall_s": {"pass": t_pass - t0, "model_load": t_model - t_pass,
                   "lens": t_lens - t_model, "write": t_end - t_lens, "total": t_end - t0},
        "tokens": stats.n_tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "files": sum(1 for p in out.rglob("*") if p.is_file()),
    }  # fmt: skip
    (out / "cost.json").write_text(json.dumps(cost, indent=1) + "\n")
    log.info("%s feature pages: %s", variant, json.dumps(cost))
    return cost


def build_compare(cfg: PipelineConfig, models: Path, out: Path) -> dict[str, Any]:
    """The cross-variant pages of every variant of ``cfg.variants`` (decoders from
    ``models/<variant>``) in ``out``; returns the per-pair summary
    (:func:`saelab.browse.build.write_compare_pages`).

    Raises:
        ConfigError: the SAEs differ in d_in.
    """
    decoders = {v: load_sae(models / v).W_dec.detach() for v in cfg.variants}
    if len({w.shape[1] for w in decoders.values()}) > 1:
        raise ConfigError(f"--models {models}: the SAEs of {cfg.variants} differ in d_in")
    with torch.no_grad():
        return write_compare_pages(out, decoders)


__all__ = ["build_compare", "build_features", "nearest_by_cosine"]
