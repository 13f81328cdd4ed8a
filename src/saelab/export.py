"""Export a trained SAE in SAELens's format, and read such an export back.

SAELens 6.x reads a directory holding ``cfg.json`` and ``sae_weights.safetensors``:

    from sae_lens import SAE
    sae = SAE.load_from_disk("exports/topk", device="cpu")

(SAELens is not a dependency of saelab; the format below was taken from SAELens 6.x's
``SAEConfig.to_dict`` / ``from_dict`` and its disk loader.) The weights are the four tensors of
our one layout, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]`` (float32), plus ``threshold [d_sae]`` for ``jumprelu``. SAELens computes
``pre = (x − b_dec) @ W_enc + b_enc`` (``apply_b_dec_to_input``) and
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
``cfg.json``'s ``metadata`` holds SAELens's fields (model name, ``hook_name`` in
TransformerLens style, e.g. ``blocks.15.hook_resid_pre``, ``hook_layer``, ``context_size``,
``prepend_bos: false`` since prepare adds no BOS, ``seqpos_slice [1, null]`` when position 0 was
excluded) and ours under ``saelab`` (variant, k, hparams, the SAE's metadata, e.g. ``max_norm``:
tokens above it should be left unreconstructed). ``sae_lens_version`` is the format version
written, ``"6.0.0"``, so that SAELens does not convert it as a pre-6.0 config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.config import HOOKPOINT_RE
from saelab.sae import (
    JumpReLU,
    SparseAutoencoder,
    SparsityActivation,
    SwitchSAE,
    load_sae,
    make_activation,
)
from saelab.sae.activations import BatchTopK

log = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
ARCHITECTURES = {
    "topk": "topk",
    "batchtopk": "jumprelu",
    "sampled": "jumprelu",
    "jumprelu": "jumprelu",
    "relu": "standard",
}


class ExportError(ValueError):
    """The SAE cannot be expressed in SAELens's format (e.g. a Switch SAE)."""


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


def saelens_config(sae: SparseAutoencoder, model_name: str | None = None) -> dict[str, Any]:
    """The ``cfg.json`` mapping of SAELens 6.x for ``sae`` (module docstring); ``model_name``
    overrides the model recorded in the SAE's metadata (SAELens/TransformerLens model name)."""
    meta = sae.metadata
    hook = meta.get("hookpoint")
    match = HOOKPOINT_RE.match(hook) if hook else None
    cfg: dict[str, Any] = {
        "architecture": ARCHITECTURES[sae.variant],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name or meta.get("model"),
            "hook_name": hook,
            "hook_layer": int(match.group(1)) if match else None,
            "hook_head_index": None,
            "context_size": meta.get("context_size"),
            "prepend_bos": False,
            "seqpos_slice": [1, None] if meta.get("exclude_first_position") else [None],
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        },
        "saelab": {
            "variant": sae.variant,
            "k": sae.activation.k,
            "hparams": sae.hparams(),
            "metadata": meta,
        },  # fmt: skip
    }
    if sae.variant == "topk":
        cfg.update(k=sae.activation.k, rescale_acts_by_decoder_norm=False)
    return cfg


def export_saelens(sae: SparseAutoencoder, out: str | Path, model_name: str | None = None) -> None:
    """Write ``sae`` to ``out`` (created) as SAELens's ``cfg.json`` + ``sae_weights.safetensors``.

    Raises:
        ExportError: a Switch SAE (no SAELens equivalent).
    """
    if isinstance(sae, SwitchSAE) or sae.variant not in ARCHITECTURES:
        raise ExportError(
            f"a {sae.variant} SAE has no SAELens architecture (exportable: "
            f"{', '.join(ARCHITECTURES)}); a Switch SAE routes each token to one expert"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(sae), str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CFG).write_text(json.dumps(saelens_config(sae, model_name), indent=2) + "\n")
    log.info("exported %s SAE as SAELens %s to %s", sae.variant, ARCHITECTURES[sae.variant], out)


def export_dir(sae_dir: str | Path, out: str | Path, model_name: str | None = None) -> None:
    """``saelab export``: read the SAE saved in ``sae_dir`` and export it to ``out``."""
    export_saelens(load_sae(sae_dir), out, model_name)


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
    sae.metadata = dict(cfg.get("saelab", {}).get("metadata", {}))
    return sae.eval()


def _activation_of(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> SparsityActivation:
    """The saelab sparsity module equivalent to a SAELens architecture (see load_saelens)."""
    arch, k = cfg["architecture"], cfg.get("saelab", {}).get("k", 1)
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
