"""Export a trained SAE in SAELens's format (or sparsify's), and read a SAELens export back.

SAELens 6.x reads a directory holding ``cfg.json`` and ``sae_weights.safetensors``:

    from sae_lens import SAE
    sae = SAE.load_from_disk("exports/topk", device="cpu")

(SAELens is not a dependency of saelab; the format below was taken from SAELens 6.x's
``SAEConfig.to_dict`` / ``from_dict`` and its disk loader, and ``tests/test_interop.py`` loads
every exportable variant in real SAELens, in a virtual environment of its own.) The weights are
the four tensors of our one layout, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]`` (float32), plus ``threshold [d_sae]`` for ``jumprelu``.
SAELens computes ``pre = (x − b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``) and
``x̂ = acts @ W_dec + b_dec``, as we do; the input scale is already folded into a saved SAE
(:meth:`~saelab.sae.model.SparseAutoencoder.fold_input_scale_`), hence
``normalize_activations: "none"``. Architectures:

- ``topk`` -> ``topk`` with ``k`` (``rescale_acts_by_decoder_norm: false``: our TopK selects on
  the raw pre-activations);
- ``batchtopk``, ``sampled`` -> ``jumprelu`` with ``threshold`` = the global θ broadcast to every
  latent (their inference rule; SAELens saves its own BatchTopK SAEs the same way);
- ``jumprelu`` -> ``jumprelu`` with ``threshold = exp(log_threshold)``;
- ``relu`` -> ``standard`` (ReLU);
- ``switch``: no SAELens architecture routes tokens to experts, so it is refused
  (:class:`ExportError`).

SAELens's JumpReLU is ``relu(pre) * (pre > θ)``, ours ``pre * (pre > θ)``: equal since θ >= 0.

SAELens keeps, at ``load_from_disk``, only the fields of its config class and *every* key of
``cfg.json``'s ``metadata`` (its ``SAEMetadata`` takes any key); a top-level key of its own is
dropped. So everything needed to reproduce our numbers is in ``metadata``
(:func:`saelens_metadata`): SAELens's own fields (``model_name`` as the hub id,
:func:`model_ref`; ``hook_name`` in TransformerLens style, e.g. ``blocks.15.hook_resid_pre``;
``hook_layer``; ``context_size``; ``prepend_bos: false`` since prepare adds no BOS;
``seqpos_slice [1, null]`` when position 0 was excluded), the model as we ran it
(``model_gguf_file``, ``model_dtype``), the sink rule (``saelab_max_norm``,
``saelab_sink_rule``; applied by :mod:`saelab.sink_rule`), and ``saelab`` (variant, k,
hparams, the SAE's own metadata). ``sae_lens_version`` is the format version written,
``"6.0.0"``, so that SAELens does not convert it as a pre-6.0 config.

sparsify (EleutherAI; what delphi's auto-interpretability reads) saves one directory per
hookpoint, named by the model's module (``layers.<i>``: the output of decoder layer i, so our
``blocks.<L>.hook_resid_pre`` is ``layers.<L-1>``), holding ``cfg.json`` (its
``SparseCoderConfig`` fields plus ``d_in``; its loader drops, with a message, any other key)
and ``sae.safetensors`` (``encoder.weight [d_sae, d_in]``,
``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``). Its one rule that fixes L0 per token is
TopK (``relu(pre)`` then the k largest): only ``topk`` exports there (:func:`export_sparsify`).
Beside them, ``saelab.json`` holds the SAELens export's ``metadata`` (model, sink rule, ...).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.config import (
    HOOKPOINT_RE,
    HUB_ID_RE,
    InputError,
    PipelineConfig,
    _looks_local,
    check_provenance,
    recorded_path,
    repo_root,
)
from saelab.sae import (
    JumpReLU,
    SparseAutoencoder,
    SparsityActivation,
    SwitchSAE,
    TopK,
    load_sae,
    make_activation,
)
from saelab.sae.activations import BatchTopK
from saelab.sae.registry import saelens_architectures

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SPARSIFY_METADATA = "saelab.json"
FORMATS = ("saelens", "sparsify")
# {variant: SAELens architecture} of the exportable variants, from their registry entries
ARCHITECTURES = saelens_architectures()
SINK_RULE = (
    "when splicing the reconstruction into the model, keep the original activation at the "
    "positions seqpos_slice excludes (position 0 for [1, null]) and at every token whose "
    "activation L2 norm (float32, the model's units) is > saelab_max_norm (null: no norm cut); "
    "saelab's metrics are measured so (saelab.sink_rule.splice_with_sink_rule)"
)


class ExportError(ValueError):
    """The SAE cannot be expressed in the format (e.g. a Switch SAE), or its model has no hub id."""


@dataclass(frozen=True)
class ModelRef:
    """The language model an SAE reads, as an export names it.

    hub_id: Hugging Face hub id (``org/name``) or another model name the user chose.
    gguf_file: the GGUF file loaded from it (None: a regular checkpoint).
    dtype: the dtype the model ran in when the activations were cached (None: unknown).
    """

    hub_id: str
    gguf_file: str | None
    dtype: str | None


def model_ref(
    meta: dict[str, Any], cfg: PipelineConfig | None = None, model_name: str | None = None
) -> ModelRef:
    """The model of an SAE whose metadata is ``meta`` (``cfg.json``'s ``metadata``).

    hub id, first found of: ``model_name``; ``cfg.export.hub_id`` when ``cfg``'s model (path
    and GGUF file) is the SAE's; the SAE's recorded model when it is a hub id; the
    ``_name_or_path`` of the local model directory's ``config.json`` when that is a hub id.
    dtype: ``meta["model_dtype"]``, else ``cfg.model.dtype`` when ``cfg``'s model is the SAE's
    and its dtype is not ``auto``.

    Raises:
        ExportError: no hub id found (the message says how to give one).
    """
    recorded, gguf = meta.get("model"), meta.get("gguf_file")
    same = cfg is not None and (recorded_path(cfg.model.name_or_path), cfg.model.gguf_file) == (
        recorded,
        gguf,
    )
    hub_id = model_name or (cfg.export.hub_id if same else None) or _hub_id_of(recorded)
    if hub_id is None:
        raise ExportError(
            f"the SAE's model {recorded!r} is a local directory without a hub id: set "
            "export.hub_id in params.yaml (for that model) or pass --model-name"
        )
    known = same and cfg.model.dtype != "auto"  # auto: decided by the device the LM ran on
    dtype = meta.get("model_dtype") or (cfg.model.dtype if known else None)
    return ModelRef(hub_id, gguf, dtype)


def _hub_id_of(recorded: str | None) -> str | None:
    """``recorded`` (a model param as outputs record it) if it is a hub id, else the
    ``_name_or_path`` of its directory's ``config.json`` when that is one, else None."""
    if recorded is None:
        return None
    path = Path(recorded).expanduser()
    path = path if path.is_absolute() else repo_root() / path
    if not path.is_dir():
        return None if _looks_local(recorded) else recorded
    config = path / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path") if config.is_file() else None
    return name if isinstance(name, str) and HUB_ID_RE.match(name) else None


def _threshold(sae: SparseAutoencoder) -> Tensor | None:
    """The per-latent JumpReLU threshold [d_sae] float32 for the jumprelu architecture, else
    None: θ broadcast for BatchTopK/Sampled, exp(log_threshold) for JumpReLU."""
    if isinstance(sae.activation, JumpReLU):
        return sae.activation.log_threshold.detach().exp().float()
    if isinstance(sae.activation, BatchTopK):
        return sae.activation.threshold.detach().float().expand(sae.d_sae).clone()
    return None


def saelens_tensors(sae: SparseAutoencoder) -> dict[str, Tensor]:
    """The tensors of ``sae_weights.safetensors`` (module docstring), contiguous float32 CPU."""
    tensors = {name: getattr(sae, name).detach() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    threshold = _threshold(sae)
    if threshold is not None:
        tensors["threshold"] = threshold
    return {name: t.float().cpu().contiguous() for name, t in tensors.items()}


def saelens_metadata(sae: SparseAutoencoder, model: ModelRef) -> dict[str, Any]:
    """``cfg.json``'s ``metadata``: SAELens's fields, the model as run, the sink rule and
    saelab's own block (module docstring). Every value is JSON."""
    meta = sae.metadata
    hook = meta.get("hookpoint")
    match = HOOKPOINT_RE.match(hook) if hook else None
    exclude_first = bool(meta.get("exclude_first_position"))
    return {
        "model_name": model.hub_id,
        "hook_name": hook,
        "hook_layer": int(match.group(1)) if match else None,
        "hook_head_index": None,
        "context_size": meta.get("context_size"),
        "prepend_bos": False,
        "seqpos_slice": [1, None] if exclude_first else [None],
        "model_gguf_file": model.gguf_file,
        "model_dtype": model.dtype,
        "saelab_max_norm": meta.get("max_norm"),
        "saelab_sink_rule": SINK_RULE,
        "saelab": {
            "variant": sae.variant,
            "k": sae.activation.k,
            "hparams": sae.hparams(),
            "metadata": meta,
        },
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
    }


def saelens_config(sae: SparseAutoencoder, model: ModelRef | None = None) -> dict[str, Any]:
    """The ``cfg.json`` mapping of SAELens 6.x for ``sae`` (module docstring); ``model``
    (default: :func:`model_ref` of the SAE's metadata) names the language model."""
    model = model_ref(sae.metadata) if model is None else model
    cfg: dict[str, Any] = {
        "architecture": ARCHITECTURES[sae.variant],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": saelens_metadata(sae, model),
    }
    if cfg["architecture"] == "topk":
        cfg.update(k=sae.activation.k, rescale_acts_by_decoder_norm=False)
    return cfg


def export_saelens(sae: SparseAutoencoder, out: str | Path, model: ModelRef | None = None) -> None:
    """Write ``sae`` to ``out`` (created) as SAELens's ``cfg.json`` + ``sae_weights.safetensors``;
    ``model`` as in :func:`saelens_config`.

    Raises:
        ExportError: a Switch SAE (no SAELens equivalent); no hub id (:func:`model_ref`).
    """
    if isinstance(sae, SwitchSAE) or sae.variant not in ARCHITECTURES:
        raise ExportError(
            f"a {sae.variant} SAE has no SAELens architecture (exportable: "
            f"{', '.join(ARCHITECTURES)}); a Switch SAE routes each token to one expert"
        )
    cfg = saelens_config(sae, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(sae), str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    log.info("exported %s SAE as SAELens %s to %s", sae.variant, ARCHITECTURES[sae.variant], out)


def sparsify_hookpoint(hookpoint: str) -> str:
    """The sparsify/delphi hookpoint (HF module name) whose output is ``hookpoint``:
    ``blocks.<L>.hook_resid_pre`` -> ``layers.<L-1>`` (``embed_tokens`` for L = 0),
    ``blocks.<L>.hook_resid_post`` -> ``layers.<L>``.

    Raises:
        ExportError: not a ``blocks.<L>.hook_resid_{pre,post}`` name.
    """
    match = HOOKPOINT_RE.match(hookpoint or "")
    if match is None:
        raise ExportError(f"hookpoint {hookpoint!r} is not blocks.<layer>.hook_resid_pre/post")
    layer, site = int(match.group(1)), match.group(2)
    if site == "resid_post":
        return f"layers.{layer}"
    return f"layers.{layer - 1}" if layer > 0 else "embed_tokens"


def export_sparsify(sae: SparseAutoencoder, out: str | Path, model: ModelRef | None = None) -> Path:
    """Write a TopK ``sae`` in sparsify's on-disk format under ``out/<hookpoint>/`` (module
    docstring; :func:`sparsify_hookpoint`); returns that directory. ``saelab.json`` beside
    sparsify's two files holds :func:`saelens_metadata` (the model, the sink rule, ...).

    Raises:
        ExportError: not a TopK SAE (sparsify has no other fixed-L0 rule), or no hub id.
    """
    if type(sae.activation) is not TopK:
        raise ExportError(
            f"a {sae.variant} SAE has no sparsify equivalent (exportable: topk): sparsify keeps "
            "the k largest relu(pre-activations) of every token"
        )
    model = model_ref(sae.metadata) if model is None else model
    cfg = {
        "activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_in),
        "normalize_decoder": True, "num_latents": sae.d_sae, "k": sae.activation.k,
        "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_in,
    }  # fmt: skip
    tensors = {
        "encoder.weight": sae.W_enc.detach().T,
        "encoder.bias": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    target = Path(out) / sparsify_hookpoint(sae.metadata.get("hookpoint"))
    target.mkdir(parents=True, exist_ok=True)
    save_file({k: t.float().cpu().contiguous() for k, t in tensors.items()},
              str(target / SPARSIFY_WEIGHTS))  # fmt: skip
    (target / SPARSIFY_CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    metadata = json.dumps(saelens_metadata(sae, model), indent=2)
    (target / SPARSIFY_METADATA).write_text(metadata + "\n")
    log.info("exported %s SAE in sparsify's format to %s", sae.variant, target)
    return target


def export_dir(
    sae_dir: str | Path,
    out: str | Path,
    cfg: PipelineConfig | None = None,
    model_name: str | None = None,
    fmt: str = "saelens",
    check_params: bool = False,
) -> None:
    """``saelab export``: read the SAE saved in ``sae_dir`` and export it to ``out`` in ``fmt``
    (:data:`FORMATS`), its model named by :func:`model_ref` (``cfg``: the params).

    ``check_params``: ``cfg`` was named by the user, so its model, GGUF file and hookpoint must
    be the SAE's (:func:`saelab.config.check_provenance`); otherwise ``cfg`` only lends its
    ``export.hub_id`` when its model is the SAE's. ``model_name`` must match a hub id the SAE
    recorded as its model.

    Raises:
        InputError: ``check_params`` and ``cfg`` describes another model or hookpoint; or
            ``model_name`` differs from the SAE's recorded hub id (one line naming both sides).
        ExportError: as :func:`export_saelens` / :func:`export_sparsify`.
    """
    sae = load_sae(sae_dir)
    if check_params and cfg is not None:
        check_provenance(cfg.model, sae=sae, sae_dir=sae_dir)
    _check_model_name(sae.metadata, model_name, sae_dir)
    model = model_ref(sae.metadata, cfg, model_name)
    if fmt == "sparsify":
        export_sparsify(sae, out, model)
    else:
        export_saelens(sae, out, model)


def _check_model_name(meta: dict[str, Any], model_name: str | None, sae_dir: str | Path) -> None:
    """InputError if ``model_name`` (``--model-name``) is not the hub id the SAE recorded as its
    model (when it recorded one; a local model's SAE can be given any hub id)."""
    recorded = meta.get("model")
    if model_name is None or recorded is None or _looks_local(recorded):
        return
    if model_name != recorded:
        raise InputError(
            f"--model-name is {model_name!r} but {Path(sae_dir) / 'cfg.json'}'s model is "
            f"{recorded!r}"
        )


def load_saelens(directory: str | Path) -> SparseAutoencoder:
    """Read a SAELens export (:func:`export_saelens`) back into a :class:`SparseAutoencoder`
    (CPU, eval mode) whose inference output is the SAELens SAE's, from the SAELens fields alone:
    ``topk`` -> TopK(k); ``standard`` -> ReLU; ``jumprelu`` with one threshold value for every
    latent -> BatchTopK with that global θ (covers θ = 0), otherwise JumpReLU with
    ``log_threshold = log(threshold)``. Training-only hyperparameters get neutral values; ``k``
    of the non-topk rules is the exported ``saelab.k`` (nominal: inference does not use it).

    Raises:
        ExportError: an architecture saelab does not export.
    """
    directory = Path(directory)
    cfg = json.loads((directory / SAELENS_CFG).read_text())
    tensors = load_file(str(directory / SAELENS_WEIGHTS))
    sae = SparseAutoencoder(cfg["d_in"], cfg["d_sae"], _activation_of(cfg, tensors))
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        _set_threshold(sae, tensors.get("threshold"))
    sae.metadata = dict(_saelab_block(cfg).get("metadata", {}))
    return sae.eval()


def _saelab_block(cfg: dict[str, Any]) -> dict[str, Any]:
    """saelab's block of an export: ``metadata.saelab`` (top-level ``saelab`` before it moved
    where SAELens keeps it)."""
    return cfg.get("metadata", {}).get("saelab") or cfg.get("saelab", {})


def _activation_of(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> SparsityActivation:
    """The saelab sparsity module equivalent to a SAELens architecture (see load_saelens)."""
    arch, k = cfg["architecture"], _saelab_block(cfg).get("k", 1)
    if arch == "topk":
        return make_activation("topk", cfg["k"])
    if arch == "standard":
        return make_activation("relu", k, l1_coef=0.0, init_b_enc="zero")
    if arch == "jumprelu":
        theta = tensors["threshold"]
        if bool((theta == theta[0]).all()):
            return make_activation("batchtopk", k)
        return make_activation("jumprelu", k, **_jumprelu_defaults())
    raise ExportError(f"{SAELENS_CFG}: architecture {arch!r} is not one saelab exports")


def _jumprelu_defaults() -> dict[str, Any]:
    """JumpReLU hyperparameters that only matter for training (inference uses θ alone)."""
    return {"bandwidth": 0.001, "l0_coef": 0.0, "init_threshold": None, "threshold_lr_scale": 1.0}


def _set_threshold(sae: SparseAutoencoder, threshold: Tensor | None) -> None:
    """Copy an exported ``threshold [d_sae]`` into the rebuilt activation's state."""
    if threshold is None:
        return
    if isinstance(sae.activation, JumpReLU):
        sae.activation.log_threshold.copy_(threshold.log())
    elif isinstance(sae.activation, BatchTopK):
        sae.activation.threshold.copy_(threshold[0])
