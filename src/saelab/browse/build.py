"""Static feature pages: HTML rendered by jinja2 (autoescaped), vanilla JS, data as JSON.

Layout of one variant's pages (``features/<variant>/``)::

    index.html            the page (index of all latents; ``#latent=<i>`` shows latent i)
    static/browse.js|css  the viewer (no network, no CDN)
    data/meta.js          the SAE and the pass (variant, k, d_sae, tokens, exclusions, cost)
    data/index.js         per-latent columns for the index (density, max act, top tokens, ...)
    data/vocab.js         the decoded string of every token id the data refers to
    data/shard_<n>.js     SHARD_SIZE latents each: contexts, samples, histogram, logit lens,
                          neighbours; loaded only when one of its latents is opened

Every data file is JSON wrapped in one call, ``SAELAB.receive(kind, {...})``, so that the pages
load their data with ``<script>`` elements: browsers refuse ``fetch`` of ``file://`` URLs, and
the pages must work opened as files. Corpus text is untrusted: it exists only inside JSON strings
(``json.dumps`` escapes quotes, backslashes, control and non-ASCII characters) and the viewer
puts it into the page with ``textContent`` only, never as HTML.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jinja2 import Environment, FileSystemLoader, select_autoescape
from torch import Tensor

from saelab.browse.collect import HIST_BINS_PER_OCTAVE, HIST_LOG2_MIN, FeatureStats
from saelab.evaluate import DENSE_FREQUENCY

HERE = Path(__file__).parent
SHARD_SIZE = 64  # latents per shard file
INDEX_TOKENS = 3  # distinct top-context tokens and promoted tokens listed in the index


def environment() -> Environment:
    """The jinja2 environment of the page templates, autoescaping every ``.html`` template."""
    return Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def write_data(path: Path, kind: str, payload: Mapping[str, Any]) -> None:
    """Write ``SAELAB.receive(kind, payload)`` to ``path`` (payload as JSON, ASCII only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    path.write_text(f"SAELAB.receive({json.dumps(kind)},{text});\n", encoding="ascii")


def copy_static(out: Path) -> None:
    """Copy the viewer's JS and CSS into ``out/static``."""
    shutil.copytree(HERE / "static", out / "static", dirs_exist_ok=True)


def _r(x: float) -> float | None:
    """A float for the JSON: 4 significant digits; NaN -> None."""
    return None if x != x else float(f"{x:.4g}")


@dataclass(frozen=True)
class Lens:
    """Logit lens and decoder neighbours of every latent ([d_sae, n] each, best first)."""

    top_ids: Tensor
    top_logits: Tensor
    bottom_ids: Tensor
    bottom_logits: Tensor
    neighbour_ids: Tensor
    neighbour_cos: Tensor


@dataclass(frozen=True)
class PageInfo:
    """What the page says about the SAE and the pass (rendered into the HTML and meta.js).

    variant, variants: this SAE's variant and all the pipeline's (for the navigation);
    sae: ``cfg.json`` of the SAE (d_in, d_sae, k, hparams, metadata); ctx_len; before: window
    positions before the firing token; n_experts: Switch's, else None; threshold: BatchTopK /
    Sampled's global θ, else None; exclude_first_position; wall_s: seconds of the pass so far.
    """

    variant: str
    variants: tuple[str, ...]
    sae: Mapping[str, Any]
    ctx_len: int
    before: int
    n_experts: int | None
    threshold: float | None
    exclude_first_position: bool
    wall_s: float


class Vocab:
    """The token ids referred to by the data, decoded when written."""

    def __init__(self) -> None:
        self.ids: set[int] = set()

    def use(self, ids: Sequence[int]) -> list[int]:
        self.ids.update(int(i) for i in ids)
        return [int(i) for i in ids]

    def payload(self, decode: Callable[[list[int]], list[str]]) -> dict[str, str]:
        ids = sorted(self.ids)
        return {str(i): s for i, s in zip(ids, decode(ids), strict=True)}


def _window(
    row: int, windows: Tensor, tokens_NL: np.ndarray, ctx_len: int, before: int, vocab: Vocab
) -> dict[str, Any]:
    """One example: ``ctx`` (context index), ``pos`` (first window position), ``at`` (index of
    the firing token in the window), ``tok`` (token ids), ``act`` (the latent's activation per
    token; null: excluded token)."""
    ctx, p = divmod(row, ctx_len)
    start, stop = max(0, p - before), min(ctx_len, p - before + windows.shape[0])
    acts = windows[start - (p - before) : stop - (p - before)].tolist()
    return {
        "ctx": ctx, "pos": start, "at": p - start,
        "tok": vocab.use(tokens_NL[ctx, start:stop].tolist()), "act": [_r(a) for a in acts],
    }  # fmt: skip


def _percentile(hist_H: np.ndarray, value: float) -> float:
    """Approximate percentile (0-100) of ``value`` among a latent's firings from its histogram
    (half of its own bin counted below)."""
    b = int(np.clip(np.floor((np.log2(value) - HIST_LOG2_MIN) * HIST_BINS_PER_OCTAVE), 0,
                    len(hist_H) - 1))  # fmt: skip
    total = hist_H.sum()
    return float(100 * (hist_H[:b].sum() + hist_H[b] / 2) / total) if total else 0.0


def latent_record(
    i: int, stats: FeatureStats, lens: Lens, tokens_NL: np.ndarray, info: PageInfo, vocab: Vocab
) -> dict[str, Any]:
    """Everything the latent page shows for latent ``i`` (a shard entry)."""
    fires = int(stats.fire_counts[i])
    rec: dict[str, Any] = {"id": i, "fires": fires}
    hist_H = stats.hist[i].numpy()
    nz = np.nonzero(hist_H)[0]
    rec["hist"] = [int(nz[0]), hist_H[nz[0] : nz[-1] + 1].tolist()] if len(nz) else [0, []]

    def examples(rows: Tensor, values: Tensor, windows: Tensor) -> list[dict[str, Any]]:
        out = []
        for r, v, w in zip(rows.tolist(), values.tolist(), windows, strict=True):
            if r >= 0:
                ex = _window(r, w, tokens_NL, info.ctx_len, info.before, vocab)
                out.append({**ex, "value": _r(v), "pct": _r(_percentile(hist_H, v))})
        return out

    rec["top"] = examples(stats.top_rows[i], stats.top_values[i], stats.top_windows[i])
    samples = examples(stats.sample_rows[i], stats.sample_values[i], stats.sample_windows[i])
    rec["samples"] = sorted(samples, key=lambda ex: ex["value"])
    rec["promote"] = _pairs(lens.top_ids[i], lens.top_logits[i], vocab)
    rec["suppress"] = _pairs(lens.bottom_ids[i], lens.bottom_logits[i], vocab)
    rec["neighbours"] = _pairs(lens.neighbour_ids[i], lens.neighbour_cos[i], None)
    return rec


def _pairs(ids: Tensor, values: Tensor, vocab: Vocab | None) -> list[list]:
    """``[[id, value], ...]`` of two ``[n]`` tensors (token ids recorded in ``vocab``)."""
    ids_list = ids.tolist() if vocab is None else vocab.use(ids.tolist())
    return [[i, _r(v)] for i, v in zip(ids_list, values.tolist(), strict=True)]


def _top_tokens(stats: FeatureStats, tokens_NL: np.ndarray, ctx_len: int) -> list[list[int]]:
    """Per latent, up to INDEX_TOKENS distinct tokens at which its top contexts fire, by count
    (ties: the higher activation first)."""
    flat = tokens_NL.reshape(-1)
    out = []
    for rows in stats.top_rows.tolist():
        ids = [int(flat[r]) for r in rows if r >= 0]
        counts: dict[int, int] = {}
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
        out.append(sorted(counts, key=lambda t: (-counts[t], ids.index(t)))[:INDEX_TOKENS])
    return out


def index_payload(
    stats: FeatureStats, lens: Lens, tokens_NL: np.ndarray, info: PageInfo, vocab: Vocab
) -> dict[str, Any]:
    """Columns of the index of all latents (``d_sae`` entries each)."""
    n = max(stats.n_tokens, 1)
    fires = stats.fire_counts.double()
    density = (fires / n).tolist()
    mean = (stats.act_sums / fires.clamp_min(1)).tolist()
    d_expert = len(density) // info.n_experts if info.n_experts else None
    return {
        "variant": info.variant,
        "fires": stats.fire_counts.tolist(),
        "density": [float(f"{d:.4g}") for d in density],
        "max": [_r(v) for v in stats.top_values[:, 0].tolist()],
        "mean": [_r(v) for v in mean],
        "top_tokens": [vocab.use(t) for t in _top_tokens(stats, tokens_NL, info.ctx_len)],
        "promote": [vocab.use(t) for t in lens.top_ids[:, :INDEX_TOKENS].tolist()],
        "expert": [i // d_expert for i in range(len(density))] if d_expert else None,
        "dense_frequency": DENSE_FREQUENCY,
    }


def meta_payload(stats: FeatureStats, info: PageInfo) -> dict[str, Any]:
    """The SAE and the pass, for the page header."""
    md = info.sae.get("metadata", {})
    fires = stats.fire_counts
    return {
        "variant": info.variant, "variants": list(info.variants), "d_sae": info.sae["d_sae"],
        "d_in": info.sae["d_in"], "k": info.sae["k"], "hparams": info.sae.get("hparams", {}),
        "hookpoint": md.get("hookpoint"), "model": md.get("model"), "ctx_len": info.ctx_len,
        "n_tokens": stats.n_tokens, "n_excluded": stats.n_excluded,
        "exclude_first_position": info.exclude_first_position, "max_norm": md.get("max_norm"),
        "threshold": info.threshold, "n_experts": info.n_experts,
        "expert_tokens": None if stats.expert_counts is None else stats.expert_counts.tolist(),
        "n_dead": int((fires == 0).sum()),
        "n_dense": int((fires.double() / max(stats.n_tokens, 1) > DENSE_FREQUENCY).sum()),
        "hist_log2_min": HIST_LOG2_MIN, "hist_bins_per_octave": HIST_BINS_PER_OCTAVE,
        "shard_size": SHARD_SIZE, "wall_s": round(info.wall_s, 1),
    }  # fmt: skip


def write_variant_pages(
    out: Path,
    stats: FeatureStats,
    lens: Lens,
    tokens_NL: np.ndarray,
    decode: Callable[[list[int]], list[str]],
    info: PageInfo,
) -> None:
    """Write one variant's pages into the (empty or new) directory ``out`` (module docstring).

    Args:
        tokens_NL: the eval contexts ``[n_ctx, ctx_len]`` int32 whose rows the stats refer to;
        decode: token ids -> their strings (one string per id).
    """
    vocab = Vocab()
    d_sae = len(stats.fire_counts)
    for s in range(0, d_sae, SHARD_SIZE):
        latents = [latent_record(i, stats, lens, tokens_NL, info, vocab)
                   for i in range(s, min(s + SHARD_SIZE, d_sae))]  # fmt: skip
        write_data(out / "data" / f"shard_{s // SHARD_SIZE:04d}.js", "shard",
                   {"variant": info.variant, "first": s, "latents": latents})  # fmt: skip
    index = index_payload(stats, lens, tokens_NL, info, vocab)
    write_data(out / "data" / "index.js", "index", index)
    meta = meta_payload(stats, info)
    write_data(out / "data" / "meta.js", "meta", meta)
    write_data(out / "data" / "vocab.js", "vocab", {"variant": info.variant,
                                                    "tokens": vocab.payload(decode)})  # fmt: skip
    copy_static(out)
    html = environment().get_template("variant.html").render(meta=meta)
    (out / "index.html").write_text(html, encoding="utf-8")


def pair_payload(a: str, b: str, idx: Tensor, cos: Tensor, back_idx: Tensor) -> dict[str, Any]:
    """Nearest latent of SAE ``b`` for every latent of SAE ``a`` by decoder cosine: ``nearest``
    [d_sae_a], ``cos`` [d_sae_a], ``mutual`` [d_sae_a] (1 when ``a``'s latent is also the nearest
    of its match; ``back_idx [d_sae_b]`` is b's nearest in a)."""
    mutual = (back_idx[idx] == torch.arange(len(idx))).int()
    return {"a": a, "b": b, "nearest": idx.tolist(), "cos": [_r(c) for c in cos.tolist()],
            "mutual": mutual.tolist()}  # fmt: skip


def write_compare_pages(out: Path, decoders: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """The cross-variant pages in ``out``: for every ordered pair of SAEs (A, B), the nearest
    B latent of each A latent by decoder cosine (:func:`saelab.browse.lens.nearest_by_cosine`).

    Args:
        decoders: variant -> ``W_dec [d_sae, d_in]`` (all the same d_in).

    Returns:
        per pair ``"A/B"``: median cosine, fraction of A latents with a match above 0.9 and 0.7,
        fraction of mutual nearest neighbours (also in ``data/variants.js``).
    """
    from saelab.browse.lens import nearest_by_cosine

    variants = list(decoders)
    nearest = {}
    for a in variants:
        for b in variants:
            if a != b:
                idx, cos = nearest_by_cosine(decoders[a], decoders[b], 1, exclude_self=False)
                nearest[a, b] = (idx[:, 0], cos[:, 0])
    summary = {}
    for (a, b), (idx, cos) in nearest.items():
        payload = pair_payload(a, b, idx, cos, nearest[b, a][0])
        write_data(out / "data" / f"pair_{a}_{b}.js", "pair", payload)
        summary[f"{a}/{b}"] = {
            "median_cos": _r(float(cos.median())),
            "above_0.9": _r(float((cos > 0.9).double().mean())),
            "above_0.7": _r(float((cos > 0.7).double().mean())),
            "mutual": _r(float(np.mean(payload["mutual"]))),
        }
    d_sae = {v: int(w.shape[0]) for v, w in decoders.items()}
    write_data(out / "data" / "variants.js", "variants",
               {"variants": variants, "d_sae": d_sae, "pairs": summary})  # fmt: skip
    copy_static(out)
    html = environment().get_template("compare.html").render(variants=variants, pairs=summary)
    (out / "index.html").write_text(html, encoding="utf-8")
    return summary
