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
per-layer mask computed in the loop, ...) fails loudly rather than giving wrong logits.

After the head, a model may transform the logits before returning them. The one transform known
here is the final logit soft-capping of Gemma 2 and 3 (``config.final_logit_softcapping`` = c:
``logits = c · tanh(head / c)``, Gemma Team 2024, "Gemma 2", sec. 2): it is recorded with the
head's call and applied by every replay, exactly as transformers computes it. The clean pass then
checks that the recorded chain, transform included, reproduces ``model(...).logits`` exactly;
any other transform fails there with a :class:`~saelab.config.ConfigError` naming the model,
rather than giving spliced CE and KL on the wrong logits. Covers Llama-family models, GPT-2 and
Gemma 2 (transformers 5 decoder layers return a tensor; a tuple's first element is taken as the
hidden state).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from saelab.capture import decoder_layers
from saelab.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

# Attribute names of the final norm on the base model: Llama/Mistral/Qwen, GPT-2, Phi, OPT.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass(frozen=True)
class Call:
    """One module call of the suffix: ``module(hidden, *args, **kwargs)``, its output then
    soft-capped to ``softcap · tanh(output / softcap)`` when ``softcap`` is set (the LM head of
    a model with final logit soft-capping; module docstring)."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    softcap: float | None = None


def final_logit_softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-capping c (``config.final_logit_softcapping``: Gemma 2 and
    3), or None when it has none."""
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and config is not None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def softcap_logits(logits: Tensor, cap: float) -> Tensor:
    """``cap · tanh(logits / cap)``, in the order of operations of transformers' Gemma 2 (so
    that a replay equals the model's own logits bit for bit)."""
    return torch.tanh(logits / cap) * cap


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
    """Raise ConfigError (a ValueError: one line from the command line) unless every module
    after the first received the previous output."""
    if len(inputs) != len(modules) or len(outputs) != len(modules):
        raise RuntimeError(
            f"expected one call of each of the {len(modules)} suffix modules in the clean "
            f"forward, got {len(inputs)} (is a module shared or skipped?)"
        )
    for i in range(1, len(modules)):
        if not (inputs[i] is outputs[i - 1] or torch.equal(inputs[i], outputs[i - 1])):
            raise ConfigError(
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
    cap = final_logit_softcap(model)
    if cap is not None:
        calls[-1] = dataclasses.replace(calls[-1], softcap=cap)
    _check_logits(model, outputs[-1], cap, logits)
    return logits, Suffix(inputs[0].clone(), tuple(calls))


def _check_logits(model: nn.Module, head: Tensor, cap: float | None, logits: Tensor) -> None:
    """ConfigError unless the LM head's output ``head`` (soft-capped by ``cap`` when set) is
    exactly the ``logits`` the model returned [batch, seq, vocab]."""
    replayed = head if cap is None else softcap_logits(head, cap)
    if replayed.shape != logits.shape or not torch.equal(replayed, logits):
        known = "" if cap is None else f" soft-capped at {cap}"
        raise ConfigError(
            f"params: model.name_or_path must be a model whose logits are its LM head's "
            f"output{known}; {type(model).__name__} transforms them after the head, which the "
            "spliced suffix cannot replay (spliced CE and KL would be wrong)"
        )


@torch.inference_mode()
def run_suffix(suffix: Suffix, resid: Tensor) -> Tensor:
    """Logits [batch, seq, vocab] with ``resid`` [batch, seq, d_in] (model dtype, same shape as
    ``suffix.resid``) in place of the residual stream at the hookpoint: only the recorded suffix
    modules run, each with the arguments of its clean call."""
    if resid.shape != suffix.resid.shape:
        raise ValueError(f"resid shape {tuple(resid.shape)} != {tuple(suffix.resid.shape)}")
    return run_calls(suffix.calls, resid)


@torch.inference_mode()
def run_calls(calls: tuple[Call, ...], hidden: Tensor) -> Tensor:
    """Call ``calls`` in order on ``hidden`` (each module's first output feeds the next)."""
    for call in calls:
        hidden = _first(call.module(hidden, *call.args, **call.kwargs))
        if call.softcap is not None:
            hidden = softcap_logits(hidden, call.softcap)
    return hidden


def same_arguments(a: Any, b: Any) -> bool:
    """True when two recorded call arguments are equal: tensors of the same shape, dtype and
    values; tuples, lists and dicts element by element; anything else by ``is`` or ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(torch.equal(a, b))
        )  # fmt: skip
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_arguments, a, b))
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_arguments(a[key], b[key]) for key in a)
        )
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a usable == is not provably equal
        return False


def same_calls(a: tuple[Call, ...], b: tuple[Call, ...]) -> bool:
    """True when two recorded suffixes call the same modules with equal arguments."""
    return len(a) == len(b) and all(
        x.module is y.module
        and x.softcap == y.softcap
        and same_arguments((x.args, x.kwargs), (y.args, y.kwargs))
        for x, y in zip(a, b, strict=True)
    )


@dataclass(frozen=True)
class CleanPass:
    """A full clean forward of one batch: logits [batch, seq, vocab] and the residual stream at
    the hookpoint [batch, seq, d_in] (both in the model's dtype)."""

    logits: Tensor
    resid: Tensor


class SuffixRunner:
    """Run the suffix after the hookpoint on residual streams that were not computed here (e.g.
    read from the activation cache), recording the suffix's call arguments once per batch shape.

    The arguments a decoder layer receives besides the hidden state (position embeddings,
    attention mask, position ids) depend on the batch's shape, not on its tokens, for models
    that are given no padding mask (Llama family, GPT-2). :meth:`prepare` runs a full clean
    forward for the first two batches of each shape and compares their recorded arguments;
    when they agree, later batches of that shape reuse them with no forward. When they differ
    (a model whose arguments depend on the tokens), every batch of that shape gets its own
    clean forward: slower, never wrong.
    """

    CHECKS_PER_SHAPE = 2

    def __init__(self, model: nn.Module, cfg: ModelConfig) -> None:
        self.model, self.cfg = model, cfg
        self._calls: dict[tuple[int, ...], tuple[Call, ...]] = {}
        self._seen: dict[tuple[int, ...], int] = {}
        self._per_batch: set[tuple[int, ...]] = set()
        self.clean_forwards = 0  # full forwards run so far

    def prepare(self, input_ids: Tensor) -> CleanPass | None:
        """Get the suffix arguments for ``input_ids`` [batch, seq] int64. Returns the clean pass
        when a full forward ran for this batch (so the caller can check its own inputs against
        it), else None."""
        shape = tuple(input_ids.shape)
        seen = self._seen.get(shape, 0)
        self._seen[shape] = seen + 1
        if seen >= self.CHECKS_PER_SHAPE and shape not in self._per_batch:
            return None
        logits, suffix = clean_forward(self.model, self.cfg, input_ids)
        self.clean_forwards += 1
        previous = self._calls.get(shape)
        if previous is not None and not same_calls(previous, suffix.calls):
            if shape not in self._per_batch:
                logger.warning(
                    "the suffix's call arguments depend on the tokens for %s: recording them "
                    "with a full forward per batch", type(self.model).__name__,
                )  # fmt: skip
            self._per_batch.add(shape)
        self._calls[shape] = suffix.calls
        return CleanPass(logits, suffix.resid)

    def calls(self, shape: tuple[int, ...]) -> tuple[Call, ...]:
        """The recorded calls for a batch of ``shape`` (batch, seq); :meth:`prepare` first."""
        return self._calls[shape]

    def logits(self, input_shape: tuple[int, ...], resid: Tensor) -> Tensor:
        """Logits [batch, seq, vocab] with ``resid`` [batch, seq, d_in] at the hookpoint."""
        return run_calls(self.calls(input_shape), resid.to(_dtype(self.model)))

    def final_hidden(self, input_shape: tuple[int, ...], resid: Tensor) -> Tensor:
        """The LM head's input [batch, seq, d_in] (the final norm's output) with ``resid`` at the
        hookpoint: the suffix without its last call."""
        return run_calls(self.calls(input_shape)[:-1], resid.to(_dtype(self.model)))

    def head(self, input_shape: tuple[int, ...], final_hidden: Tensor) -> Tensor:
        """Logits [batch, seq, vocab] from the LM head's input [batch, seq, d_in]."""
        return run_calls(self.calls(input_shape)[-1:], final_hidden.to(_dtype(self.model)))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
