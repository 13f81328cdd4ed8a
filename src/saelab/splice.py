"""Splice a replacement into the residual stream and run only the part of the model after it.

Spliced evaluation compares the clean logits with the logits after the activation at the
hookpoint is replaced (SAE reconstruction, zero or mean ablation). A full forward per replacement
recomputes the layers before the hookpoint, whose output is the same every time. Here the clean
pass records, with forward pre-hooks, the call of every module after the hookpoint: the suffix
``layers[start:]``, the final norm and the LM head, each with the arguments it received besides
the hidden state (attention mask, position embeddings, position ids, ...). :func:`run_suffix`
then calls only those modules, in order, on a replaced hidden state: for
``blocks.15.hook_resid_pre`` of a 30-layer model, 15 layers instead of 30 per replacement.

The suffix is the chain ``layers[start] -> ... -> layers[-1] -> final norm -> lm_head`` with
``start = L`` for ``blocks.<L>.hook_resid_pre`` and ``L + 1`` for ``blocks.<L>.hook_resid_post``
(the output of layer L is the input of layer L + 1, or of the final norm after the last layer).
:func:`clean_forward` checks that in the clean pass each module of the chain received exactly
the previous one's output, so a model that does anything else between them (scaling, a
per-layer mask computed in the loop, logit soft-capping after the head, ...) fails loudly rather
than giving wrong logits. Covers Llama-family models and GPT-2 (transformers 5 decoder layers
return a tensor; a tuple's first element is taken as the hidden state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.capture import decoder_layers
from saelab.config import ModelConfig

# Attribute names of the final norm on the base model: Llama/Mistral/Qwen, GPT-2, Phi, OPT.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass(frozen=True)
class Call:
    """One module call of the suffix: ``module(hidden, *args, **kwargs)``."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class Suffix:
    """The forward pass after the hookpoint, recorded during a clean pass.

    resid: [batch, seq, d_in] in the model's dtype, the clean residual stream at the hookpoint
        (a copy). calls: the suffix modules in order (later decoder layers, final norm, lm_head).
    """

    resid: Tensor
    calls: tuple[Call, ...]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer: the first of FINAL_NORM_NAMES found on
    ``model.base_model``. Raises ValueError when there is none."""
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"no final norm ({', '.join(FINAL_NORM_NAMES)}) on {type(base).__name__}: "
        "spliced evaluation cannot run the suffix of this model"
    )


def suffix_modules(model: nn.Module, cfg: ModelConfig) -> list[nn.Module]:
    """The modules run after the hookpoint, in order: ``layers[start:]`` (start = L for
    resid_pre, L + 1 for resid_post), the final norm and ``model.get_output_embeddings()``."""
    start = cfg.layer + (cfg.site == "resid_post")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return [*decoder_layers(model)[start:], final_norm(model), head]


def _hidden(args: tuple, kwargs: dict) -> tuple[Tensor, tuple, dict]:
    """Split a module call into (hidden state, other positional args, other kwargs)."""
    if args:
        return args[0], args[1:], kwargs
    rest = dict(kwargs)
    return rest.pop("hidden_states"), args, rest


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _check_chain(inputs: list[Tensor], outputs: list[Tensor], modules: list[nn.Module]) -> None:
    """Raise ValueError unless every module after the first received the previous output."""
    if len(inputs) != len(modules) or len(outputs) != len(modules):
        raise RuntimeError(
            f"expected one call of each of the {len(modules)} suffix modules in the clean "
            f"forward, got {len(inputs)} (is a module shared or skipped?)"
        )
    for i in range(1, len(modules)):
        if not (inputs[i] is outputs[i - 1] or torch.equal(inputs[i], outputs[i - 1])):
            raise ValueError(
                f"{type(modules[i]).__name__} (suffix module {i}) did not receive the output of "
                f"{type(modules[i - 1]).__name__}: the model transforms the residual stream "
                "between modules, which run_suffix would skip"
            )


@torch.inference_mode()
def clean_forward(model: nn.Module, cfg: ModelConfig, input_ids: Tensor) -> tuple[Tensor, Suffix]:
    """One clean forward that also records the suffix after ``cfg.hookpoint``.

    input_ids: [batch, seq] int64. Returns the clean logits [batch, seq, vocab] (model dtype, as
    ``model(input_ids=...).logits``) and the :class:`Suffix`. Runs without a KV cache, so the
    recorded calls can be replayed. Raises ValueError when the model does more between the
    suffix modules than pass the hidden state along (see the module docstring).
    """
    modules = suffix_modules(model, cfg)
    calls: list[Call] = []
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, rest_kwargs = _hidden(args, kwargs)
        inputs.append(hidden)
        calls.append(Call(module, rest, rest_kwargs))

    def post_hook(_module: nn.Module, _args: tuple, output: Any) -> None:
        outputs.append(_first(output))

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook))
        logits = model(input_ids=input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    _check_chain(inputs, outputs, modules)
    return logits, Suffix(inputs[0].clone(), tuple(calls))


@torch.inference_mode()
def run_suffix(suffix: Suffix, resid: Tensor) -> Tensor:
    """Logits [batch, seq, vocab] with ``resid`` [batch, seq, d_in] (model dtype, same shape as
    ``suffix.resid``) in place of the residual stream at the hookpoint: only the recorded suffix
    modules run, each with the arguments of its clean call."""
    if resid.shape != suffix.resid.shape:
        raise ValueError(f"resid shape {tuple(resid.shape)} != {tuple(suffix.resid.shape)}")
    hidden = resid
    for call in suffix.calls:
        hidden = _first(call.module(hidden, *call.args, **call.kwargs))
    return hidden
