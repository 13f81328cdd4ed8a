"""The baseline stage: what spliced evaluation needs from the model, computed once per eval split
and shared by every SAE evaluated on it.

Only the spliced pass depends on the SAE. The clean next-token CE, the zero- and mean-ablated CE
and the clean logits (for KL) are the same for every SAE, so this stage computes them once, from
the cached eval activations (``data/activations/eval``, float32): for each batch of eval
contexts, the suffix after the hookpoint (:class:`saelab.splice.SuffixRunner`) runs on the
cached residual stream (clean), on it with every non-spared token zeroed, and with every
non-spared token replaced by the mean activation x̄. It writes:

- ``tokens.npz``: per-prediction CE (nats) ``ce_clean``, ``ce_zero_ablated``,
  ``ce_mean_ablated`` ``[n_ctx, ctx_len - 1 - start] float32`` (predictions at positions
  ``start .. ctx_len - 2``; start = 1 when position 0 is excluded), ``spared [n_ctx, ctx_len]
  bool`` (tokens that keep their clean activation in every replaced pass: position 0 when
  excluded, and sinks with norm > ``max_norm``) and ``mean_act [d_in] float32``;
- ``expected_unembed/``: a store ``[n_ctx * n_pred, d_in] float32`` (n_pred = ctx_len - 1 -
  start predictions per context, context-major) of u = p_cleanᵀ W_U, the LM head's rows
  averaged under each prediction's clean next-token distribution, and ``kl_const [n_ctx,
  n_pred] float32`` in ``tokens.npz`` (Σ p log p − p·b_U): with them an SAE's evaluation gets
  KL(p_clean ‖ q) = kl_const − u·h + logsumexp(W_U h + b_U) from the spliced LM-head input h
  alone, with no clean logits (:func:`clean_kl_terms`; exact for a linear head, which the CE
  check below guarantees on the checked batches). A model whose logits are soft-capped after
  the head (Gemma 2, :func:`saelab.splice.final_logit_softcap`) is not linear in h: its
  baseline stores ``final_hidden/`` instead, the clean LM-head inputs ``[n_ctx * ctx_len,
  d_in] float32``, and each evaluation runs the head on them for the clean logits
  (``baseline.json``'s ``kl``: ``terms`` or ``clean_head``);
- ``baseline.json``: the attributes every evaluation checks against (hookpoint, ``max_norm``,
  contexts, model) and the two checks below.

Checks, on the first batches of each shape (where :class:`~saelab.splice.SuffixRunner` runs a
full clean forward anyway): the cached activations equal the model's own at the hookpoint for
these tokens (else the cache belongs to other tokens, another model or another hookpoint), and
the CE of the full forward equals the CE through the recorded suffix from the cache (else the
model does something the suffix does not replay, e.g. a logit transform after the head).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from saelab.capture import dtype_name
from saelab.config import (
    ConfigError,
    InputError,
    ModelConfig,
    check_provenance,
    recorded_path,
    resolve_model,
)
from saelab.splice import CleanPass, SuffixRunner, final_logit_softcap
from saelab.store import ActivationStore, ActivationWriter, atomic_dir

log = logging.getLogger(__name__)

# Largest relative error ||x_cache - x_model|| / ||x_model|| of a token between the cache and the
# model's own activation: float32 stores differ only by the GEMM blocking of another batch size
# (~1e-6); 16-bit stores by their rounding (bf16: 2^-9 per element). The coarser of the store's
# and the LM's dtype applies: an LM run in bf16 rounds every layer's output, so another batch
# size (another GEMM blocking) moves its activations by about that much (docs/performance.md,
# "The LM in bf16").
CACHE_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
# nats/token between the full forward and the suffix from the cache, by the LM's dtype
CE_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 1e-2}
EXPECTED_UNEMBED = "expected_unembed"  # the store of u = p_clean^T W_U (module docstring)
FINAL_HIDDEN = "final_hidden"  # the clean LM-head inputs, for soft-capped heads


def token_losses(logits: Tensor, input_ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Per-token CE [batch, seq−1−start] and log-probs [batch, seq−1−start, vocab] (float32) of
    the predictions made at positions start..seq−2."""
    logp = F.log_softmax(logits[:, start:-1].float(), dim=-1)
    targets = input_ids[:, start + 1 :]
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp


def token_ce(logits: Tensor, input_ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """Per-token CE and log-partition logsumexp(logits) [batch, seq−1−start] (float32, nats) of
    the predictions at positions start..seq−2, without materialising the log-probs (what
    :func:`token_losses` gives, in one reduction over the vocabulary)."""
    z = logits[:, start:-1].float()
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(-1, input_ids[:, start + 1 :].unsqueeze(-1)).squeeze(-1)
    return lse - target, lse


def linear_head(model: nn.Module) -> nn.Linear:
    """The model's LM head (``get_output_embeddings()``), which must be an ``nn.Linear``
    (weight [vocab, d_model]) for :func:`clean_kl_terms`; ValueError otherwise."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s LM head is {type(head).__name__}, not Linear")
    return head


def clean_kl_terms(logp_clean: Tensor, head: nn.Linear) -> tuple[Tensor, Tensor]:
    """(u [..., d_model], kl_const [...]) float32 from clean log-probs ``logp_clean [...,
    vocab]`` such that, for the LM-head input h of any other pass with logits z = W_U h + b_U,
    KL(p_clean ‖ softmax(z)) = kl_const − u·h + logsumexp(z): u = p_cleanᵀ W_U, kl_const =
    Σ p log p − p·b_U (expanding log softmax(z) = z − logsumexp(z) in the KL's definition)."""
    p = logp_clean.exp()
    u = p @ head.weight.float()
    const = (p * logp_clean).sum(-1)
    if head.bias is not None:
        const = const - p @ head.bias.float()
    return u, const


def kl_from_terms(u: Tensor, kl_const: Tensor, final: Tensor, lse: Tensor) -> Tensor:
    """KL(p_clean ‖ q) per prediction [...] float32 (nats) from :func:`clean_kl_terms`' ``u``
    [..., d_model] and ``kl_const`` [...], the pass's LM-head inputs ``final`` [..., d_model]
    and its log-partition ``lse`` [...] (:func:`token_ce`); the dot product in float64."""
    dot = (u.double() * final.double()).sum(-1)
    return (kl_const.double() - dot + lse.double()).float()


def spared_mask(x: Tensor, skip_first_position: bool, max_norm: float | None) -> Tensor:
    """``[batch, seq] bool``: the tokens of ``x`` [batch, seq, d_in] that keep their clean
    activation when the hookpoint is replaced: position 0 when ``skip_first_position``, and
    tokens whose norm exceeds ``max_norm`` (attention sinks, see ``SAEConfig``)."""
    spared = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    if skip_first_position:
        spared[:, 0] = True
    if max_norm is not None:
        spared |= x.norm(dim=-1) > max_norm
    return spared


def eval_contexts(tokens: np.ndarray, store: ActivationStore, n_ctx: int | None) -> np.ndarray:
    """The eval contexts ``[n, ctx_len] int64`` evaluated: the first ``n_ctx`` cached ones (None:
    every cached context). ``tokens``: the eval split ``[n_tokens_ctx, ctx_len]`` int32.

    Raises:
        ConfigError: n_ctx exceeds the cached eval contexts (both numbers named), or the store's
            ctx_len differs from the tokens'.
    """
    if store.ctx_len != tokens.shape[1]:
        raise ConfigError(
            f"activation store {store.path} has ctx_len {store.ctx_len} but the eval tokens "
            f"have {tokens.shape[1]}: re-run the cache stage"
        )
    cached = store.n_tokens // store.ctx_len
    if cached > len(tokens):
        raise ConfigError(
            f"activation store {store.path} holds {cached} contexts, the eval split only "
            f"{len(tokens)}: re-run the cache stage"
        )
    if n_ctx is not None and n_ctx > cached:
        raise ConfigError(
            f"params: evaluate.n_ctx must be at most the {cached} cached eval contexts "
            f"(cache.max_eval_tokens) or null for all; got {n_ctx}"
        )
    return tokens[: cached if n_ctx is None else n_ctx].astype(np.int64)


def read_contexts(store: ActivationStore, first: int, n: int) -> Tensor:
    """Cached activations of contexts ``first .. first + n - 1``: ``[n, ctx_len, d_in] float32``."""
    t = store.ctx_len
    return store.read(first * t, (first + n) * t).view(n, t, store.d_in)


def check_cache(clean: CleanPass, x: Tensor, store: ActivationStore, hookpoint: str) -> None:
    """Raise InputError unless the cached ``x`` [batch, seq, d_in] is the model's own activation
    ``clean.resid`` at ``hookpoint`` within :data:`CACHE_TOLERANCE` of the coarser of the
    store's dtype and the model's."""
    ref = clean.resid.float()
    error = ((x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).max().item()
    tolerance = max(CACHE_TOLERANCE[store.dtype], CACHE_TOLERANCE[_name(clean.resid.dtype)])
    if error > tolerance:
        raise InputError(
            f"activation store {store.path} does not hold the model's {hookpoint} activations of "
            f"these eval tokens (relative error {error:.2e} > {tolerance:.0e}): "
            "re-run the cache stage"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def mean_activation(
    store: ActivationStore, n_ctx: int, batch: int, skip_first: bool, max_norm: float | None
) -> Tensor:
    """x̄ ``[d_in] float32``: the mean over the first ``n_ctx`` contexts of the tokens that are
    not spared (:func:`spared_mask`), i.e. the tokens the reconstruction metrics use."""
    total, count = torch.zeros(store.d_in, dtype=torch.float64), 0
    for i in range(0, n_ctx, batch):
        x = read_contexts(store, i, min(batch, n_ctx - i))
        kept = x[~spared_mask(x, skip_first, max_norm)]
        total += kept.double().sum(0)
        count += len(kept)
    if count == 0:
        raise ValueError(f"no eval token of {store.path} is left after the sink rule")
    return (total / count).float()


@dataclass(frozen=True)
class BaselineSpec:
    """What the baseline is computed on: eval contexts [n, ctx_len] int64, the sink rule, and the
    contexts per forward."""

    contexts: np.ndarray
    skip_first_position: bool
    max_norm: float | None
    batch_size: int


@torch.inference_mode()
def compute_baseline(
    model: nn.Module, model_cfg: ModelConfig, store: ActivationStore, spec: BaselineSpec, out: Path
) -> dict[str, Any]:
    """Write the baseline (module docstring) of ``spec.contexts`` to the directory ``out``
    (which must exist and be empty: the caller makes it atomic). Returns its attributes.

    Raises:
        ConfigError: the cache does not match the model's activations (:func:`check_cache`, an
            InputError), or the suffix's CE does not match the full forward's (the model does
            something the suffix does not replay).
    """
    n, t = spec.contexts.shape
    start = int(spec.skip_first_position)
    device = next(model.parameters()).device
    mean = mean_activation(store, n, spec.batch_size, spec.skip_first_position, spec.max_norm)
    runner, checks = SuffixRunner(model, model_cfg), []
    ce = {key: np.empty((n, t - 1 - start), np.float32) for key in ("clean", "zero", "mean")}
    spared_all = np.empty((n, t), bool)
    kl_const = np.empty((n, t - 1 - start), np.float32)
    terms = final_logit_softcap(model) is None  # else: the clean LM-head inputs (module doc)
    head = linear_head(model) if terms else None
    begin = time.perf_counter()
    writer = _kl_writer(out, terms, n, t, start, store.d_in)
    with writer:
        for i in tqdm(range(0, n, spec.batch_size), desc="baseline", unit="batch"):
            ids = torch.from_numpy(spec.contexts[i : i + spec.batch_size]).to(device)
            x = read_contexts(store, i, len(ids)).to(device)
            spared = spared_mask(x, spec.skip_first_position, spec.max_norm)
            clean = runner.prepare(ids)
            final = runner.final_hidden(ids.shape, x)
            ce_clean, logp_clean = token_losses(runner.head(ids.shape, final), ids, start)
            if clean is not None:
                check_cache(clean, x, store, model_cfg.hookpoint)
                checks.append(_check_ce(clean, ids, start, ce_clean))
            zero = torch.where(spared[..., None], x, 0.0)
            mean_x = torch.where(spared[..., None], x, mean.to(x))
            rows = slice(i, i + len(ids))
            ce["clean"][rows] = ce_clean.cpu().numpy()
            ce["zero"][rows] = token_losses(runner.logits(ids.shape, zero), ids, start)[0].cpu()
            ce["mean"][rows] = token_losses(runner.logits(ids.shape, mean_x), ids, start)[0].cpu()
            spared_all[rows] = spared.cpu().numpy()
            if head is None:
                writer.write(final.reshape(-1, store.d_in))
            else:
                u, c = clean_kl_terms(logp_clean, head)
                kl_const[rows] = c.cpu().numpy()
                writer.write(u.reshape(-1, store.d_in))
    np.savez(
        out / "tokens.npz", ce_clean=ce["clean"], ce_zero_ablated=ce["zero"],
        ce_mean_ablated=ce["mean"], spared=spared_all, mean_act=mean.numpy(),
        **({"kl_const": kl_const} if terms else {}),
    )  # fmt: skip
    attrs = {
        "n_ctx": n, "ctx_len": t, "start": start, "max_norm": spec.max_norm,
        "hookpoint": model_cfg.hookpoint, "model": recorded_path(model_cfg.name_or_path),
        "gguf_file": model_cfg.gguf_file, "model_dtype": dtype_name(model), "d_in": store.d_in,
        "store_dtype": store.dtype, "checks": checks, "clean_forwards": runner.clean_forwards,
        "seconds": time.perf_counter() - begin, "kl": "terms" if terms else "clean_head",
    }  # fmt: skip
    (out / "baseline.json").write_text(json.dumps(attrs, indent=1))
    return attrs


def _kl_writer(out: Path, terms: bool, n: int, t: int, start: int, d_in: int) -> ActivationWriter:
    """The writer of the baseline's KL store (module docstring): ``expected_unembed`` rows per
    prediction, or (``terms`` false) ``final_hidden`` rows per token."""
    if terms:
        n_pred = t - 1 - start
        attrs = {"ctx_len": n_pred, "what": "p_clean^T W_U per prediction"}
        return ActivationWriter(out / EXPECTED_UNEMBED, n * n_pred, d_in, "float32", "none", 0,
                                64 * n_pred, attrs)  # fmt: skip
    attrs = {"ctx_len": t, "what": "clean LM head input (final norm output)"}
    return ActivationWriter(out / FINAL_HIDDEN, n * t, d_in, "float32", "none", 0, 64 * t, attrs)


def _check_ce(clean: CleanPass, ids: Tensor, start: int, ce_suffix: Tensor) -> dict[str, float]:
    """CE of one batch by the full forward and by the suffix from the cache; ConfigError (a
    ValueError, one line from the command line) when they differ by more than
    :data:`CE_TOLERANCE` nats/token (for the model's dtype)."""
    full = token_losses(clean.logits, ids, start)[0].mean().item()
    cached = ce_suffix.mean().item()
    if abs(full - cached) > CE_TOLERANCE[_name(clean.resid.dtype)]:
        raise ConfigError(
            f"the suffix run from the cache gives CE {cached:.6f} but the full forward "
            f"{full:.6f} nats/token: the model transforms the logits or the residual stream in "
            "a way the recorded suffix does not replay"
        )
    return {"ce_full_forward": full, "ce_from_cache": cached}


@dataclass(frozen=True)
class Baseline:
    """A baseline read back (module docstring): arrays of ``tokens.npz``, the attributes of
    ``baseline.json`` and the KL store: ``expected_unembed`` (``attrs["kl"] == "terms"``) or
    ``final_hidden`` (``"clean_head"``)."""

    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any]
    kl_store: ActivationStore


def load_baseline(path: str | Path) -> Baseline:
    """Read the baseline directory ``path``.

    Raises:
        ConfigError: a file is missing or unreadable (the message names it).
    """
    path = Path(path)
    try:
        attrs = json.loads((path / "baseline.json").read_text())
        with np.load(path / "tokens.npz") as npz:
            arrays = {key: npz[key] for key in npz.files}
        kl = attrs.get("kl", "terms")
        unembed = ActivationStore(path / (EXPECTED_UNEMBED if kl == "terms" else FINAL_HIDDEN))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(
            f"baseline {path} is missing or corrupt ({e}): re-run the baseline stage"
        ) from e
    return Baseline(arrays, attrs, unembed)


def run_baseline_stage(cfg: Any, tokens: Path, activations: Path, out: Path) -> dict[str, Any]:
    """The baseline stage for the pipeline config ``cfg``: eval contexts of ``tokens``, cached
    activations ``activations/eval`` and the sink norm from ``activations/train`` (the rule the
    SAEs are trained with: ``sae.exclude_norm_factor`` × the median training-token norm).
    Writes ``out`` atomically and returns its attributes."""
    from saelab.capture import load_model, resolve_device
    from saelab.data import read_tokens
    from saelab.store import sink_norm

    device = resolve_device(cfg.model.device)
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, device)})
    store = ActivationStore(activations / "eval")
    check_provenance(cfg.model, store=store)
    check_provenance(cfg.model, store=ActivationStore(activations / "train"))
    contexts = eval_contexts(read_tokens(tokens, "eval"), store, cfg.evaluate.n_ctx)
    max_norm = sink_norm(
        activations / "train", cfg.sae.exclude_norm_factor, cfg.train.scale_tokens,
        exclude_first_position=cfg.sae.exclude_first_position,
    )  # fmt: skip
    model = load_model(cfg.model, device)
    spec = BaselineSpec(contexts, cfg.sae.exclude_first_position, max_norm, cfg.evaluate.batch_size)
    with atomic_dir(out) as tmp:
        attrs = compute_baseline(model, cfg.model, store, spec, tmp)
    log.info("baseline of %d eval contexts in %.0f s", len(contexts), attrs["seconds"])
    return attrs
