"""The one place a variant is declared: :class:`VariantSpec` entries, read by everything else.

A variant module (``saelab/sae/<module>.py``) declares each variant it defines once, beside its
classes, with :func:`register`: its name, its activation and/or model class, its hyperparameters
with their types and allowed values (:class:`HParam`), its SAELens architecture, and the line of
the variants table. From the registry, and nowhere else:

- ``params.yaml`` validation (:mod:`saelab.config`): ``variants`` must name registered variants,
  ``variant_params.<variant>`` gets a frozen pydantic model generated from the spec's
  hyperparameters, whose checks (:meth:`HParam.ok`) give the one-line
  ``params: <dotted.key> must be <allowed>`` errors (:meth:`HParam.allowed_text`, which also
  words the field constraints of the other sections);
- the command line's ``--variant`` choices (:mod:`saelab.cli`);
- :func:`saelab.sae.build_sae` and :func:`saelab.sae.load_sae`;
- the SAELens architecture map of the export (:mod:`saelab.export`);
- the README's variants table (:func:`variants_table`, checked by ``tests/test_registry.py``,
  rewritten by ``scripts/variants_table.py``).

This module itself imports neither torch nor the variant modules; :func:`variants` imports every
module of the :mod:`saelab.sae` package once (that is how a new module is found: adding a
variant touches its own module, ``params.yaml``, its tests and the docs table, nothing else).
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# (dotted params key, allowed) of a violated cross-parameter constraint
Violation = tuple[str, str]


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a variant: a keyword of its class, a key of
    ``params.yaml``'s ``variant_params.<variant>``.

    type: ``int``, ``float``, ``str``, ``bool``, ``float | None`` (with ``null`` set), or
        ``tuple[float, ...]`` (a YAML list).
    low / high: inclusive bounds of a number, or exclusive with ``low_open`` / ``high_open``.
    choices: the allowed strings.
    null: what ``null`` means (e.g. ``"from the first batch"``; ``""``: not said): then null is
        allowed.
    check / allowed: a custom predicate on a non-null value and its ``allowed`` text (for a
        list); used instead of low/high/choices.
    doc: one line for the reader.
    """

    name: str
    type: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    null: str | None = None
    check: Callable[[Any], bool] | None = None
    allowed: str | None = None

    @property
    def annotation(self) -> Any:
        """The config field's type (``X | None`` when null is allowed)."""
        return self.type | None if self.null is not None else self.type

    def ok(self, value: Any) -> bool:
        """Whether ``value`` (already of :attr:`annotation`'s type) is allowed."""
        if value is None:
            return self.null is not None
        if self.check is not None:
            return bool(self.check(value))
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def allowed_text(self) -> str:
        """What the error says is allowed, e.g. ``a number in [0, 1]``, ``one of top, sample``,
        ``null (from the first batch) or a number > 0``."""
        if self.allowed is not None:
            text = self.allowed
        elif self.choices is not None:
            text = f"one of {', '.join(self.choices)}"
        else:
            text = "an integer" if self.type is int else "a number"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        if self.null is None:
            return text
        return f"null ({self.null}) or {text}" if self.null else f"null or {text}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and math.isfinite(x) else f"{x:g}"


@dataclass(frozen=True)
class VariantSpec:
    """A registered SAE variant.

    name: as in ``params.yaml`` (``variants``, ``variant_params.<name>``) and ``cfg.json``.
    model: the SAE class (a :class:`~saelab.sae.model.SparseAutoencoder` subclass; None: that
        class itself); its ``load`` reads a saved SAE of this variant.
    activation: the sparsity module class, built as ``activation(k, **hparams)`` and given to
        ``model(d_in, d_sae, activation, generator)``; None: the model takes the
        hyperparameters itself, ``model(d_in, d_sae, k, **hparams, generator=generator)``
        (Switch).
    hparams: the hyperparameters besides k, in the order of ``params.yaml`` and ``cfg.json``.
    params_class: name of the generated config model (``NoParams`` when there are none).
    saelens: the SAELens architecture its export is (``topk``, ``jumprelu``, ``standard``), or
        None: not exportable.
    constraints: ``(hparams, k, d_sae) -> [Violation]``: checks across parameters, run for the
        variants in ``variants`` only.
    rule / source: the variants table's "sparsity rule" and "source" cells (Markdown).
    """

    name: str
    model: type | None = None
    activation: type | None = None
    hparams: tuple[HParam, ...] = ()
    params_class: str = "NoParams"
    saelens: str | None = None
    constraints: Callable[[Mapping[str, Any], int, int], list[Violation]] | None = None
    rule: str = ""
    source: str = ""

    def build(self, d_in: int, d_sae: int, k: int, hparams: Mapping[str, Any], generator: Any):
        """A freshly initialised SAE of this variant (see :attr:`activation`).

        Raises:
            ValueError: hyperparameters unknown, missing (TypeError of the class, re-raised
                with the variant's name) or out of range (the class's own check).
        """
        if self.activation is not None:
            return self.sae_class(d_in, d_sae, self.make_activation(k, hparams), generator)
        try:
            return self.sae_class(d_in, d_sae, k, **hparams, generator=generator)
        except TypeError as e:  # an unknown or missing keyword
            raise ValueError(f"{self.name}: bad hyperparameters {sorted(hparams)} ({e})") from e

    @property
    def sae_class(self) -> type:
        """:attr:`model`, or :class:`~saelab.sae.model.SparseAutoencoder` when None."""
        if self.model is not None:
            return self.model
        from saelab.sae.model import SparseAutoencoder

        return SparseAutoencoder

    def make_activation(self, k: int, hparams: Mapping[str, Any]) -> Any:
        """The activation module ``activation(k, **hparams)``.

        Raises:
            ValueError: the variant has no activation module, or bad hyperparameters.
        """
        if self.activation is None:
            raise ValueError(f"{self.name}: no activation module (a model of its own)")
        try:
            return self.activation(k, **hparams)
        except TypeError as e:  # an unknown or missing keyword
            raise ValueError(f"{self.name}: bad hyperparameters {sorted(hparams)} ({e})") from e


_REGISTRY: dict[str, VariantSpec] = {}
_DISCOVERED = False


def register(spec: VariantSpec) -> VariantSpec:
    """Add ``spec`` (called at import by the module that defines the variant's classes).

    Raises:
        ValueError: a variant of that name is already registered by another class.
    """
    held = _REGISTRY.get(spec.name)
    if held is not None and (held.model, held.activation) != (spec.model, spec.activation):
        raise ValueError(f"SAE variant {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def variants() -> dict[str, VariantSpec]:
    """Every registered variant by name, in registration order (``saelab.sae`` first: its
    activations, then Switch; then the other modules of the package, alphabetically). The first
    call imports every module of :mod:`saelab.sae`."""
    global _DISCOVERED
    if not _DISCOVERED:
        package = importlib.import_module("saelab.sae")
        for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
            importlib.import_module(f"saelab.sae.{module}")
        _DISCOVERED = True
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    """The registered variants' names (:func:`variants`' order)."""
    return tuple(variants())


def get(name: str) -> VariantSpec:
    """The spec of variant ``name``.

    Raises:
        ValueError: no such variant (the message lists the registered ones).
    """
    specs = variants()
    if name not in specs:
        raise ValueError(f"unknown SAE variant {name!r}; allowed: {', '.join(sorted(specs))}")
    return specs[name]


def saelens_architectures() -> dict[str, str]:
    """``{variant: SAELens architecture}`` of the exportable variants."""
    return {n: s.saelens for n, s in variants().items() if s.saelens is not None}


def variants_table() -> str:
    """The README's variants table (Markdown), one row per registered variant."""
    rows = [
        "| variant | sparsity rule | source | own params | SAELens export |",
        "|---|---|---|---|---|",
    ]
    for spec in variants().values():
        own = ", ".join(f"`{h.name}`" for h in spec.hparams) or "—"
        export = f"`{spec.saelens}`" if spec.saelens else "—"
        rows.append(f"| `{spec.name}` | {spec.rule} | {spec.source} | {own} | {export} |")
    return "\n".join(rows) + "\n"
