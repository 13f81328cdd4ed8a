"""Load a Hugging Face causal LM and read or replace its residual stream with forward hooks.

Hookpoints use the SAELens/TransformerLens names: ``blocks.<L>.hook_resid_pre`` is the input of
decoder layer ``L``, ``blocks.<L>.hook_resid_post`` its output. Hooks are plain PyTorch hooks on the
model's own decoder-layer modules, so any architecture whose decoder layers form one
``nn.ModuleList`` (Llama, GPT-2, Mistral, Qwen, ...) works; hooks are always removed in ``finally``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saelab.config import ConfigError, ModelConfig, resolve_model_dtype

log = logging.getLogger(__name__)

Replacement = Callable[[torch.Tensor], torch.Tensor]


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass right after the hookpoint."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU raises ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params: device 'cuda' was asked for but no GPU is visible (use auto)")
    return torch.device(name)


def _pretrained_kwargs(cfg: ModelConfig, for_model: bool = False) -> tuple[str, dict]:
    path = Path(cfg.name_or_path).expanduser()
    kwargs: dict = {}
    if cfg.gguf_file is not None:
        kwargs["gguf_file"] = cfg.gguf_file
        if for_model:
            # Unpack the quantised blocks once at load time into plain dense weights: without a
            # published GGUF matmul kernel, transformers 5 would re-unpack them in every forward
            # (measured here: 149 tok/s instead of thousands for the truncated forward).
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if path.is_dir():
        return str(path), kwargs
    # A hub id: never fetch at run time unless the user explicitly allows it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cfg.name_or_path, kwargs


def _from_pretrained(loader: Callable, cfg: ModelConfig, dtype: torch.dtype | None = None):
    """``loader.from_pretrained`` (in ``dtype`` when given: a model) with a hub id missing from
    the local cache (offline) turned into a one-line ConfigError naming model.name_or_path."""
    name, kwargs = _pretrained_kwargs(cfg, for_model=dtype is not None)
    extra = {"dtype": dtype} if dtype is not None else {}
    try:
        return loader.from_pretrained(name, **kwargs, **extra)
    except OSError as e:
        raise ConfigError(
            f"params: model.name_or_path must be a local model directory or a hub id in the "
            f"local Hugging Face cache (nothing is downloaded); {name!r} failed: "
            f"{str(e).splitlines()[0]}"
        ) from e


def n_layers_of(cfg: ModelConfig) -> int:
    """Number of decoder layers, read from the model's config only (no weights loaded).

    Raises:
        ConfigError: the model cannot be found locally.
    """
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, cfg)
    return int(config.get_text_config().num_hidden_layers)


def check_hookpoint(cfg: ModelConfig, n_layers: int, key: str = "model.hookpoint") -> None:
    """Raise ConfigError naming ``key`` and the valid hookpoints when ``cfg.layer`` is out of
    range."""
    if not 0 <= cfg.layer < n_layers:
        raise ConfigError(
            f"params: {key} must be blocks.<L>.hook_resid_pre or "
            f"blocks.<L>.hook_resid_post with L in [0, {n_layers - 1}] for this model "
            f"(got {cfg.hookpoint})"
        )


def check_hookpoints(cfg: ModelConfig, n_layers: int) -> None:
    """:func:`check_hookpoint` of ``model.hookpoint`` and of each of ``model.extra_hookpoints``
    (named by index, ``model.extra_hookpoints[1]``)."""
    check_hookpoint(cfg, n_layers)
    for i, hookpoint in enumerate(cfg.extra_hookpoints):
        check_hookpoint(cfg.at(hookpoint), n_layers, f"model.extra_hookpoints[{i}]")


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer (a local directory or a hub id from the local cache)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, cfg)


def load_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Load the causal LM in ``cfg.dtype`` on ``device`` (``auto`` resolved for ``device`` by
    :func:`saelab.config.resolve_model_dtype`), in eval mode, gradients off.

    A GGUF file is dequantised by transformers (needs the ``gguf`` package; ~30 s on 2 cores for
    SmolLM2-135M). Raises ConfigError when the model cannot be found locally or the hookpoint's
    layer does not exist in it.
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, cfg, resolve_model_dtype(cfg, device))
    model.to(device).eval().requires_grad_(False)
    check_hookpoint(cfg, len(decoder_layers(model)))
    return model


def dtype_name(model: nn.Module) -> str:
    """The dtype the loaded ``model`` runs in, as params write it (``float32``, ``bfloat16``,
    ...): what stores and baselines record as ``model_dtype``."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers (``model.model.layers`` for Llama,
    ``model.transformer.h`` for GPT-2): the first ModuleList as long as ``num_hidden_layers``."""
    n = model.config.get_text_config().num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no ModuleList of {n} decoder layers found in {type(model).__name__}")


@contextmanager
def hook_resid(
    model: nn.Module, cfg: ModelConfig, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    """Call ``fn(resid)`` on the residual stream at the hookpoint during forward passes.

    resid: [batch, seq, d_in] in the model's dtype. When ``fn`` returns a tensor it replaces the
    activation for the rest of the forward pass; ``None`` leaves it unchanged. The hook is removed
    on exit, also on error.
    """
    layer = decoder_layers(model)[cfg.layer]
    if cfg.site == "resid_pre":

        def pre_hook(_module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_module, _args, output):
            resid = output[0] if isinstance(output, tuple) else output
            new = fn(resid)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = layer.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def capture_resid(
    model: nn.Module, cfg: ModelConfig, input_ids: torch.Tensor, **forward_kwargs: Any
) -> torch.Tensor:
    """Residual stream at the hookpoint, running only the layers up to it.

    input_ids: [batch, seq] int64. Returns [batch, seq, d_in] in the model's dtype. The forward
    pass is stopped by an exception right after the hookpoint, so no later layer, final norm or
    lm_head runs (the cost is ~(L+1)/n_layers of a full forward for resid_post).
    ``forward_kwargs`` go to the model's forward (default ``use_cache=False``; e.g. a KV cache
    and ``use_cache=True``, which the truncated forward fills up to the hookpoint's layer).
    """
    captured: list[torch.Tensor] = []

    def grab(resid: torch.Tensor) -> None:
        captured.append(resid.detach())
        raise _StopForward

    with hook_resid(model, cfg, grab):
        try:
            model(input_ids=input_ids, **{"use_cache": False, **forward_kwargs})
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"hookpoint {cfg.hookpoint} was not reached in the forward pass")
    return captured[0]


@torch.inference_mode()
def capture_resids(
    model: nn.Module, cfgs: Sequence[ModelConfig], input_ids: torch.Tensor
) -> list[torch.Tensor]:
    """Residual streams at several hookpoints of one model from one forward pass that runs only
    the layers up to the deepest of them (issue 14, part 3: several hookpoints per LM pass).

    cfgs: one :class:`ModelConfig` per hookpoint (same model; any order; distinct hookpoints).
    input_ids: [batch, seq] int64. Returns one [batch, seq, d_in] tensor in the model's dtype per
    cfg, in the order of ``cfgs``; each equals :func:`capture_resid` of its cfg (the same layers
    run on the same inputs). All but the deepest are copied when captured, so that no later layer
    can change them in place.

    Raises:
        ValueError: ``cfgs`` is empty or names a hookpoint twice.
        RuntimeError: a hookpoint was not reached.
    """
    names = [c.hookpoint for c in cfgs]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"capture_resids: distinct hookpoints needed, got {names}")
    order = [(c.layer, c.site == "resid_post") for c in cfgs]  # forward order of the hooks
    deepest = order.index(max(order))
    captured: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Callable[[torch.Tensor], None]:
        def fn(resid: torch.Tensor) -> None:
            captured[i] = resid.detach() if i == deepest else resid.detach().clone()
            if i == deepest:
                raise _StopForward

        return fn

    with ExitStack() as hooks:
        for i, c in enumerate(cfgs):
            hooks.enter_context(hook_resid(model, c, grab(i)))
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    if missing := [names[i] for i in range(len(cfgs)) if i not in captured]:
        raise RuntimeError(f"hookpoints {missing} were not reached in the forward pass")
    return [captured[i] for i in range(len(cfgs))]


def splice_fn(
    replace: Replacement, skip_first_position: bool, max_norm: float | None = None
) -> Callable:
    """Wrap ``replace`` ([n, d_in] float32 -> [n, d_in] float32) into a hook function that
    replaces the residual stream at every position, casting back to the model's dtype, except
    position 0 when ``skip_first_position`` and tokens whose norm exceeds ``max_norm`` (attention
    sinks, see ``SAEConfig``), which keep their clean activation."""

    def fn(resid: torch.Tensor) -> torch.Tensor:
        start = 1 if skip_first_position else 0
        tail = resid[:, start:].reshape(-1, resid.shape[-1]).float()  # [batch*(seq-start), d_in]
        new = replace(tail)
        if max_norm is not None:
            new = torch.where(tail.norm(dim=-1, keepdim=True) > max_norm, tail, new)
        new = new.to(resid.dtype).reshape(resid.shape[0], -1, resid.shape[-1])
        return torch.cat([resid[:, :start], new], dim=1)

    return fn
