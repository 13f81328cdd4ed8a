"""Typed, frozen configuration loaded strictly from ``params.yaml``.

Every hyperparameter of the pipeline lives in ``params.yaml`` and nowhere else; output paths live
in ``dvc.yaml``. :func:`load_params` turns the YAML into a :class:`PipelineConfig`, a frozen
pydantic model with one model per section. Every key is required (``dvc.yaml`` lists them);
types are strict (an int is a number, an integral float an integer, a bool neither; YAML lists
become tuples); the range of one key is a field constraint, a check across keys a model
validator.
An unknown key, a missing key or a value out of range raises :class:`ConfigError` whose one-line
message names the dotted key and what is allowed (written from the constraint by
:meth:`saelab.sae.registry.HParam.allowed_text`), before any stage does work.

Relative paths in params (``data.corpus_dirs``, a local ``model.name_or_path``, a relative
``sqlite:///`` or plain-path ``tracking.tracking_uri``) mean paths relative to the repository
root, and are made absolute here, once, against :func:`repo_root`: ``../shared/data`` is the
same directory in the workspace, in ``dvc exp run --temp`` and in ``dvc queue start`` runs,
which execute in a throw-away copy under ``<repo>/.dvc/tmp/exps/`` (see :func:`resolve_paths`);
only then are the directories and files they name checked to exist.
Absolute paths, ``~`` paths and hub ids (``org/name``) are left as written.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import torch

    from saelab.sae.registry import HParam

Dtype = Literal["float32", "bfloat16", "float16"]
Codec = Literal["zstd", "blosc_zstd", "blosc_lz4", "none"]
Device = Literal["auto", "cpu", "cuda"]
Autocast = Literal["auto", "float32", "bfloat16"]
DTYPES, CODECS, DEVICES, AUTOCAST = (get_args(t) for t in (Dtype, Codec, Device, Autocast))
MODEL_DTYPES = ("auto", *DTYPES)
HOOKPOINT_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post)$")
HOOKPOINT_TEXT = "blocks.<layer>.hook_resid_pre or blocks.<layer>.hook_resid_post"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # name or org/name


class ConfigError(ValueError):
    """A parameter is missing, unknown or out of range; the message names the dotted key."""


class InputError(ConfigError):
    """An input the project reads is unreadable, corrupt or non-finite, or disagrees with the
    params or with another input (the SAE's metadata, a store's attributes); the one-line
    message names the file (or both sides) and what is wrong. A :class:`ConfigError`, so the
    command line prints it as one line and exits 2 (``saelab.cli.main``)."""


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer field: an int, or a float that is one (YAML's 1e6); never a bool (strict mode).
Int = Annotated[int, BeforeValidator(_integral)]
T = TypeVar("T", bound=BaseModel)


def _f(allowed: str | None = None, null: str | None = None, **constraints: Any) -> Any:
    """A required field with pydantic ``constraints`` (``ge``, ``gt``, ``le``, ``lt``,
    ``min_length``, ``pattern``). Its error's allowed text is written from them unless
    ``allowed`` is given; ``null``: what null means (an optional field)."""
    extra = {k: v for k, v in (("allowed", allowed), ("null", null)) if v is not None}
    return Field(json_schema_extra=extra or None, **constraints)


def _require(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"params: {key} must be {allowed}")


class Section(BaseModel):
    """Base of every section: frozen, strict, no unknown keys, YAML lists as tuples."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


class DataConfig(Section):
    """prepare stage: corpus -> packed token contexts.

    corpus_dirs: directories of plain-text documents (one document per file).
    ctx_len: tokens per context (the papers use 128).
    eval_fraction: fraction of each source's documents held out for evaluation (>= 1 per source).
    """

    corpus_dirs: tuple[str, ...] = _f("a non-empty list of directories", min_length=1)
    ctx_len: Int = Field(ge=2, le=8192)
    eval_fraction: float = Field(gt=0, lt=1)
    seed: Int


class ModelConfig(Section):
    """The language model and where its activations are read.

    name_or_path: a hub id (``org/name``, loaded from the local HF cache only when offline) or a
        local directory.
    gguf_file: a GGUF file inside that directory, or None for a regular checkpoint.
    dtype: the LM's weights and forward: ``float32``, ``bfloat16``, ``float16``, or ``auto``
        (bfloat16 where the device runs it natively, else float32: :func:`resolve_model_dtype`).
    hookpoint: ``blocks.<layer>.hook_resid_pre`` (input of decoder layer ``layer``) or
        ``blocks.<layer>.hook_resid_post`` (its output), SAELens/TransformerLens names: the
        primary hookpoint, which every stage reads.
    extra_hookpoints: more hookpoints (same names), distinct and other than ``hookpoint``,
        cached in the same truncated forward as it (up to the deepest) and each given its own
        SAEs, baseline and metrics by the ``*_hp`` stages of dvc.yaml; empty: none (the
        pipeline of one hookpoint). Order is free.
    """

    name_or_path: str
    gguf_file: str | None
    dtype: Literal["auto", Dtype]
    hookpoint: str = _f(HOOKPOINT_TEXT, pattern=HOOKPOINT_RE.pattern)
    extra_hookpoints: tuple[str, ...]
    device: Device

    @field_validator("extra_hookpoints")
    @classmethod
    def _hookpoint_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(names):
            _require(HOOKPOINT_RE.match(name) is not None, f"model.extra_hookpoints[{i}]",
                     f"{HOOKPOINT_TEXT} (got {name!r})")  # fmt: skip
        _require(len(set(names)) == len(names), "model.extra_hookpoints", "distinct hookpoints")
        return names

    @model_validator(mode="after")
    def _extras_not_primary(self) -> ModelConfig:
        _require(
            self.hookpoint not in self.extra_hookpoints,
            "model.extra_hookpoints",
            f"hookpoints other than model.hookpoint ({self.hookpoint})",
        )
        return self

    @property
    def hookpoints(self) -> tuple[str, ...]:
        """``hookpoint`` then ``extra_hookpoints``: every hookpoint the cache stage reads."""
        return (self.hookpoint, *self.extra_hookpoints)

    def at(self, hookpoint: str) -> ModelConfig:
        """This config as if ``hookpoint`` were ``model.hookpoint`` and there were no extra
        hookpoints (validated: ConfigError naming ``model.hookpoint``)."""
        return replace(self, hookpoint=hookpoint, extra_hookpoints=())

    @property
    def layer(self) -> int:
        """Index of the decoder layer the hookpoint belongs to."""
        return int(HOOKPOINT_RE.match(self.hookpoint).group(1))  # type: ignore[union-attr]

    @property
    def site(self) -> str:
        """``resid_pre`` or ``resid_post``."""
        return HOOKPOINT_RE.match(self.hookpoint).group(2)  # type: ignore[union-attr]


class CacheConfig(Section):
    """cache stage: activations at the hookpoint -> zarr.

    max_train_tokens / max_eval_tokens: tokens cached per split (position 0 of every context
        included; it is dropped when reading), rounded down to whole contexts; max_eval_tokens
        None: the whole eval split.
    batch_size: contexts per forward pass.
    store_dtype: of the train split; bfloat16 is stored as its uint16 bit pattern (zarr 3 has
        no bfloat16).
    eval_store_dtype: of the eval split. float32 by default: the spliced evaluation runs the
        model's suffix from it, and must give the clean CE of a full forward (the baseline stage
        checks it); bf16 rounding would move the clean CE itself.
    chunk_tokens: tokens per zarr chunk (a multiple of ctx_len keeps contexts whole).
    """

    max_train_tokens: Int = Field(gt=0)
    max_eval_tokens: Int | None = _f(null="the whole eval split", gt=0)
    batch_size: Int = Field(gt=0)
    store_dtype: Dtype
    eval_store_dtype: Dtype
    codec: Codec
    codec_level: Int = Field(ge=0, le=22)
    chunk_tokens: Int = Field(ge=1024)


class SAEConfig(Section):
    """Shape of every SAE.

    d_sae: dictionary size (number of latents).
    exclude_first_position: drop position 0 of every context from training, metrics and
        splicing. On SmolLM2 it is an attention sink whose residual norm (~29,000 at layer 15)
        is ~80x the mean; left in, it dominates the MSE and BatchTopK's batch budget.
    exclude_norm_factor: also treat as sinks (excluded the same way, and left untouched when
        splicing) the tokens whose residual norm exceeds this multiple of the median token norm,
        or null for none. On SmolLM2 a few tokens past position 0 (after a weak first token, or
        at ``<|endoftext|>``) reach norms of ~20,000 too: 1 in ~8,000 tokens, yet ~65% of the
        eval split's sum of squared norms (measured on the default cache). Massive activations:
        Sun et al. 2024, "Massive Activations in Large Language Models".
    """

    d_sae: Int = Field(gt=0)
    exclude_first_position: bool
    exclude_norm_factor: float | None = Field(gt=1)


class TrainConfig(Section):
    """train stage, shared by every variant.

    n_tokens: training tokens (after dropping position 0); may exceed the cache (epochs).
    batch_size: tokens per step (the BatchTopK paper uses 4096).
    lr: Adam learning rate; None means ``2e-4 / sqrt(d_sae / 2**14)`` (Gao et al. 2024, sec. 2.3).
    warmup_steps: linear warm-up; lr_decay_fraction: linear decay to 0 over this final fraction.
    threshold_fraction: BatchTopK's inference threshold θ is the mean, over this final fraction
        of the steps, of each batch's smallest kept activation (Bussmann et al. 2024, sec. 3).
    scale_tokens: tokens used to estimate the input scaling so that E||x||^2 = d_in.
    dead_tokens: a latent that has not fired for this many tokens is dead (Gao et al. 2024 use
        10M; scaled down for short runs).
    k_aux, aux_coef: AuxK loss on the top k_aux dead latents, weight aux_coef (Gao et al. 2024,
        appendix A.2: d_in/2 and 1/32).
    shuffle_chunks: zarr chunks held in memory and shuffled together at token level.
    log_every: steps between logged means of the training metrics.
    checkpoint_every: steps between training checkpoints (0: never). A checkpoint holds the
        weights, Adam's state, the RNG states and the loop's book-keeping, so an interrupted run
        resumes where it stopped and ends with the same weights as an uninterrupted one; it is
        also written when the run is interrupted (Ctrl-C, SIGTERM), and removed when the run
        completes (see :func:`saelab.train.train_sae` and :mod:`saelab.checkpoint`).
    autocast: precision of the SAE's matmuls in training: ``float32``, ``bfloat16``
        (``torch.autocast``: weights, Adam state and losses stay float32) or ``auto``: bfloat16
        on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), float32 elsewhere (an
        AVX2-only CPU runs a bf16 GEMM ~7x slower than fp32; ``docs/performance.md``).
    """

    n_tokens: Int
    batch_size: Int = Field(gt=0)
    lr: float | None = _f(null="auto", gt=0)
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    warmup_steps: Int = Field(ge=0)
    lr_decay_fraction: float = Field(ge=0, le=1)
    grad_clip: float = Field(gt=0)
    threshold_fraction: float = Field(gt=0, le=1)
    scale_tokens: Int = Field(gt=0)
    dead_tokens: Int = Field(gt=0)
    k_aux: Int = Field(gt=0)
    aux_coef: float = Field(ge=0)
    shuffle_chunks: Int = Field(gt=0)
    log_every: Int = Field(gt=0)
    checkpoint_every: Int = _f("an integer >= 0 (0: never)", ge=0)
    seed: Int
    device: Device
    autocast: Autocast

    @model_validator(mode="after")
    def _whole_batch(self) -> TrainConfig:
        _require(self.n_tokens >= self.batch_size, "train.n_tokens", "an integer >= batch_size")
        return self

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size


class HParams(Section):
    """Base of the generated model of one variant's hyperparameters (one field per
    :class:`~saelab.sae.registry.HParam` of its spec, checked by its ``ok``; all required, so
    that ``dvc.yaml`` can list ``variant_params.<variant>`` for every train stage)."""


class VariantParams(Section):
    """Per-variant hyperparameters, one section per registered variant
    (:mod:`saelab.sae.registry`); the model is generated from the registry
    (:func:`variant_params_class`), and this is its base."""

    def of(self, variant: str) -> dict[str, Any]:
        """The variant's hyperparameters: ``build_sae``'s ``hparams``."""
        return getattr(self, variant).model_dump()


def _hparam_field(key: str, h: HParam) -> tuple[Any, Any]:
    """``(annotation, field)`` of ``h``: its type (``int`` as :data:`Int`), checked by
    ``h.ok``, whose error is ``params: <key> must be <h.allowed_text()>``."""

    def check(value: Any) -> Any:
        _require(h.ok(value), key, h.allowed_text())
        return value

    hint = Int if h.type is int else h.type
    return Annotated[hint | None if h.null is not None else hint, AfterValidator(check)], ...


@functools.cache
def variant_params_class() -> type[VariantParams]:
    """The frozen model of ``params.yaml``'s ``variant_params``: a field per registered
    variant, of a generated :class:`HParams` model named by its spec's ``params_class``
    (``NoParams`` when it has none) with a typed field per hyperparameter."""
    from saelab.sae import registry

    sections: dict[str, Any] = {}
    for name, spec in registry.variants().items():
        hparams = {h.name: _hparam_field(f"variant_params.{name}.{h.name}", h)
                   for h in spec.hparams}  # fmt: skip
        cls = create_model(spec.params_class, __base__=HParams, __module__=__name__,
                           __doc__=f"{name}: {spec.rule}", **hparams)  # fmt: skip
        sections[name] = (cls, ...)
    return create_model("VariantParams", __base__=VariantParams, __module__=__name__, **sections)


def variant_names() -> tuple[str, ...]:
    """The registered SAE variants (:func:`saelab.sae.registry.names`)."""
    from saelab.sae import registry

    return registry.names()


def __getattr__(name: str) -> Any:
    """Names derived from the variant registry, for callers of the constants they replace:
    ``VARIANTS`` and the Sampled / ReLU choices (the registry's specs hold them)."""
    from saelab.sae import registry

    choices = {
        "SAMPLED_SCORES": ("sampled", "score"),
        "SAMPLED_POOLS": ("sampled", "pool"),
        "RELU_INIT_B_ENC": ("relu", "init_b_enc"),
    }
    if name == "VARIANTS":
        return registry.names()
    if name in choices:
        variant, key = choices[name]
        return next(h.choices for h in registry.get(variant).hparams if h.name == key)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EvalConfig(Section):
    """evaluate stage.

    n_ctx: eval contexts evaluated (the first n_ctx cached ones), or None: every cached one.
    batch_size: contexts per forward pass.
    n_bootstrap, bootstrap_seed: resamples and seed of the bootstrap intervals over contexts
        (:mod:`saelab.stats`); one seed for every SAE, so that comparisons are paired.
    """

    n_ctx: Int | None = _f(null="all", gt=0)
    batch_size: Int = Field(gt=0)
    n_bootstrap: Int = Field(ge=100)
    bootstrap_seed: Int


class FeaturesConfig(Section):
    """features@<variant> stage: the feature pages (``saelab.browse``).

    n_top: top-activating contexts kept per latent; n_samples: uniform random firings kept per
        latent (shown weakest first: what the latent does when it fires weakly);
    context_before / context_after: tokens shown before / after the firing token;
    n_logits: tokens listed as promoted and as suppressed (logit lens); n_neighbours: nearest
        latents by decoder cosine; batch_contexts: contexts per SAE forward in the pass (its
        dense ``[batch_contexts * ctx_len, d_sae]`` code is the pass's largest tensor);
    seed: of the random sample.
    """

    n_top: Int = Field(ge=1)
    n_samples: Int = Field(ge=1)
    context_before: Int = Field(ge=0)
    context_after: Int = Field(ge=0)
    n_logits: Int = Field(ge=1)
    n_neighbours: Int = Field(ge=1)
    batch_contexts: Int = Field(ge=1)
    seed: Int


class StructureConfig(Section):
    """probe_data and structure@<variant> stages (definitions: saelab.probes, saelab.structure).

    contexts_per_source: sparse-probing contexts (of data.ctx_len tokens) per corpus source,
        shared evenly among its documents.
    min_docs_per_class: a source or author class needs this many documents (split by document).
    min_docs_per_decade: a decade class needs this many speeches.
    n_folds: document folds (fewer when a class has fewer documents).
    ks: latents the sparse probes may use (SAEBench: 1, 2, 5; the issue adds 10, 20).
    random_draws: draws of k random latents for the random baseline.
    n_words: first-letter words (80% train, 20% test), None: the whole single-token alphabetic
        vocabulary (SAEBench).
    words_per_prefix: words of a split sharing one draw of ICL examples, their prompts run on
        one KV cache of it (1: SAEBench's independent draw per word).
    icl_examples: ICL examples per first-letter prompt (SAEBench: 10).
    max_k: largest k of the letter k-sparse probes (SAEBench max_k_value 10).
    f1_jump_threshold: F1 gain that adds a main latent (SAEBench 0.03).
    l1_decay: L1 coefficient of the letters' latent-selection probe (SAEBench 0.01).
    min_probe_f1: letters whose probe F1 is at most this are not scored (SAEBench 0.6).
    n_bootstrap: resamples of every interval.
    seed: every draw (contexts' folds, words, ICL examples, random latents, bootstrap).
    """

    contexts_per_source: Int = Field(gt=0)
    min_docs_per_class: Int = Field(ge=2)
    min_docs_per_decade: Int = Field(ge=2)
    n_folds: Int = Field(ge=2)
    ks: tuple[Annotated[Int, Field(gt=0)], ...] = _f(
        "a non-empty list of integers > 0", min_length=1
    )
    random_draws: Int = Field(gt=0)
    n_words: Int | None
    words_per_prefix: Int = Field(gt=0)
    icl_examples: Int = Field(gt=0)
    max_k: Int = Field(gt=0)
    f1_jump_threshold: float = Field(ge=0)
    l1_decay: float = Field(ge=0)
    min_probe_f1: float = Field(ge=0, lt=1)
    n_bootstrap: Int = Field(gt=0)
    seed: Int

    @model_validator(mode="after")
    def _words_for_every_group(self) -> StructureConfig:
        group = self.icl_examples + self.words_per_prefix
        _require(
            self.n_words is None or self.n_words >= 10 * group,
            "structure.n_words",
            "null or an integer >= 10 * (structure.icl_examples + structure.words_per_prefix)"
            " (each 80/20 split needs a group's examples)",
        )  # fmt: skip
        return self


class TrackingConfig(Section):
    """MLflow. tracking_uri None: ``sqlite:///<repo root>/mlflow.db`` (see tracking.py); a
    relative ``sqlite:///<path>`` or plain path is relative to the repo root
    (:func:`resolve_paths`)."""

    experiment: str = _f("a non-empty string", min_length=1)
    tracking_uri: str | None


class ExportConfig(Section):
    """``saelab export`` (no DVC stage reads it, so changing it re-runs nothing).

    hub_id: the model's Hugging Face hub id (``org/name``), written as SAELens's
        ``metadata.model_name`` of every export. None: ``model.name_or_path`` when that is a hub
        id, else the ``_name_or_path`` of the local model directory's ``config.json`` when that
        is one; an SAE whose model has none must be exported with ``--model-name``.
    """

    hub_id: str | None = _f("a hub id (name or org/name)", pattern=HUB_ID_RE.pattern)


class DistributedConfig(Section):
    """Several processes for the train and cache stages (:mod:`saelab.distributed`).

    nproc_per_node: processes of ``saelab train`` on this machine, each on a disjoint slice of
        every batch (one per GPU on CUDA, NCCL; gloo processes on CPU). 1: one process, no
        ``torch.distributed``.
    cache_nproc_per_node: processes of ``saelab cache`` on this machine, each writing a
        disjoint run of whole chunks of every store (:mod:`saelab.cache`; the stores are those
        of one process). 1: one process. A key of its own, so that changing how training is
        spread does not re-run the cache stage and everything after it.
    launcher: the command that starts them when a count is > 1, split like a shell line,
        followed by ``--nproc-per-node N`` and the command; a leading ``torchrun`` runs this
        interpreter's ``-m torch.distributed.run``. Not used when the command is already
        running under torchrun (several nodes: start torchrun with a rendezvous on each node,
        README).
    """

    nproc_per_node: Int = Field(ge=1)
    cache_nproc_per_node: Int = Field(ge=1)
    launcher: str = _f("a command, e.g. 'torchrun --standalone'", pattern=r"\S")


class PipelineConfig(Section):
    """The whole of params.yaml.

    k: target mean L0 (active latents per token) of every variant (relu: set by its l1_coef).
    variants: SAE variants to train and evaluate, registered ones (:mod:`saelab.sae.registry`).
    variant_params: each variant's own hyperparameters (a :func:`variant_params_class`).
    """

    k: Int
    variants: tuple[str, ...]
    variant_params: SerializeAsAny[VariantParams]  # dumped as the generated model
    data: DataConfig
    model: ModelConfig
    cache: CacheConfig
    sae: SAEConfig
    train: TrainConfig
    evaluate: EvalConfig
    tracking: TrackingConfig
    features: FeaturesConfig
    structure: StructureConfig
    export: ExportConfig
    distributed: DistributedConfig

    @field_validator("variant_params", mode="before")
    @classmethod
    def _registered(cls, raw: Any) -> Any:
        """A mapping is validated by the registry's generated model (errors named under
        ``variant_params``)."""
        if isinstance(raw, VariantParams):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError("params: variant_params must be a mapping of VariantParams keys")
        return _validate(variant_params_class(), raw, "variant_params")

    @model_validator(mode="after")
    def _across_sections(self) -> PipelineConfig:
        names = variant_names()
        _require(len(self.variants) > 0, "variants", f"a non-empty list from {', '.join(names)}")
        for v in self.variants:
            _require(v in names, "variants", f"names from {', '.join(names)}; got {v!r}")
        _require(len(set(self.variants)) == len(self.variants), "variants", "distinct names")
        d_sae, ctx_len, nproc = self.sae.d_sae, self.data.ctx_len, self.distributed.nproc_per_node
        _require(0 < self.k <= d_sae, "k", f"an integer in [1, sae.d_sae={d_sae}]")
        for key in ("max_train_tokens", "max_eval_tokens"):
            _require(
                getattr(self.cache, key) is None or getattr(self.cache, key) >= ctx_len,
                f"cache.{key}",
                f"an integer >= data.ctx_len={ctx_len} (one whole context)",
            )
        _require(
            self.train.batch_size >= nproc,
            "train.batch_size",
            f"an integer >= distributed.nproc_per_node={nproc}",
        )
        _require(
            not self.model.extra_hookpoints or self.distributed.cache_nproc_per_node == 1,
            "model.extra_hookpoints",
            "[] while distributed.cache_nproc_per_node > 1 (the cache of several processes "
            "writes one hookpoint)",
        )
        self._check_variant_constraints()
        return self

    def _check_variant_constraints(self) -> None:
        """The cross-parameter constraints of the trained variants' specs (e.g. Switch's
        experts split ``sae.d_sae`` evenly and each holds at least k latents)."""
        from saelab.sae import registry

        for v in self.variants:
            spec = registry.get(v)
            if spec.constraints is None:
                continue
            hparams = self.variant_params.of(v)
            for key, allowed in spec.constraints(hparams, self.k, self.sae.d_sae):
                _require(False, key, allowed)


def _validate(cls: type[T], raw: Any, prefix: str = "") -> T:
    """``cls`` validated from ``raw``; a :class:`ConfigError` naming the first wrong key
    (under ``prefix``) otherwise."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise _config_error(e.errors()[0], cls, prefix) from None


def replace(section: T, **changes: Any) -> T:
    """``section`` with ``changes``, validated (``model_copy(update=...)`` is not): a
    :class:`ConfigError` names the key (``model.hookpoint``) when a change is out of range."""
    prefix = next((n for n, f in PipelineConfig.model_fields.items()
                   if f.annotation is type(section)), "")  # fmt: skip
    return _validate(type(section), {**dict(section), **changes}, prefix)


def at_hookpoint(cfg: PipelineConfig, hookpoint: str | None) -> PipelineConfig:
    """The config a stage of one extra hookpoint runs with (``train_hp``, ``baseline_hp``,
    ``evaluate_hp`` of dvc.yaml, ``--hookpoint`` of their commands): ``cfg`` as if params said
    ``model.hookpoint: <hookpoint>`` and ``model.extra_hookpoints: []``. ``cfg`` itself when
    ``hookpoint`` is None or ``model.hookpoint``.

    Raises:
        ConfigError: ``hookpoint`` is neither ``model.hookpoint`` nor one of
            ``model.extra_hookpoints``.
    """
    if hookpoint is None or hookpoint == cfg.model.hookpoint:
        return cfg
    extras = cfg.model.extra_hookpoints
    if hookpoint not in extras:
        raise ConfigError(
            f"--hookpoint {hookpoint} must be model.hookpoint ({cfg.model.hookpoint}) or one of "
            f"params model.extra_hookpoints ({', '.join(extras) or 'none'})"
        )
    return cfg.model_copy(update={"model": cfg.model.at(hookpoint)})


_TYPE_NAMES = {"int_type": "int", "int_from_float": "int", "float_type": "float",
               "string_type": "str", "bool_type": "bool"}  # fmt: skip


def _config_error(err: Any, cls: type[BaseModel], prefix: str) -> ConfigError:
    """One pydantic error (``ValidationError.errors()[0]``, at ``err["loc"]`` in ``cls``) as a
    one-line message: ``params: <dotted.key> must be <allowed>``, ``params: unknown key <key>
    (allowed: ...)``, ``params: missing key <key>``, ``params: <key> must be of type int (got
    ...)``."""
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # raised by a validator, the key named already
        return cause
    names = [p for p in err["loc"] if isinstance(p, str)]
    key, kind = ".".join([prefix, *names] if prefix else names), err["type"]
    owner, field = _field_at(cls, names)
    if kind == "missing":
        return ConfigError(f"params: missing key {key}")
    if kind == "extra_forbidden":
        dot = key.rpartition(".")[0]
        allowed = ", ".join(f"{dot}.{n}" if dot else n for n in owner.model_fields) or "none"
        return ConfigError(f"params: unknown key {key} (allowed: {allowed})")
    if kind == "model_type":
        return ConfigError(f"params: {key} must be a mapping of {err['ctx']['class_name']} keys")
    if kind in ("tuple_type", "list_type"):
        return ConfigError(f"params: {key} must be a list")
    if kind in _TYPE_NAMES:  # a list's item: key[i]
        at = key + "".join(f"[{p}]" for p in err["loc"] if isinstance(p, int))
        return ConfigError(
            f"params: {at} must be of type {_TYPE_NAMES[kind]} (got {err['input']!r})"
        )
    return ConfigError(f"params: {key} must be {_allowed(field)}")


def _field_at(cls: type[BaseModel], names: list[str]) -> tuple[type[BaseModel], Any]:
    """The model holding the last key of ``names`` (a path from ``cls``) and that key's field
    (None for an unknown key)."""
    owner, field = cls, None
    for name in names:
        if field is not None:
            owner = field.annotation
        field = owner.model_fields.get(name)
        if field is None:
            break
    return owner, field


def _allowed(field: Any) -> str:
    """What ``field`` allows, in :meth:`~saelab.sae.registry.HParam.allowed_text`'s words:
    written from its constraints (``ge``/``gt``/``le``/``lt``, ``Literal`` choices, null when
    optional) unless the field states it (:func:`_f`)."""
    from saelab.sae.registry import HParam

    extra, hint, null = field.json_schema_extra or {}, field.annotation, None
    if type(None) in get_args(hint):
        hint = next(a for a in get_args(hint) if a is not type(None))
        null = extra.get("null", "")
    if get_origin(hint) is Annotated:
        hint = get_args(hint)[0]
    bound = {n: getattr(c, n) for c in field.metadata for n in ("ge", "gt", "le", "lt")
             if hasattr(c, n)}  # fmt: skip
    spec = HParam(
        "", int if hint is int else float, low=bound.get("gt", bound.get("ge")),
        high=bound.get("lt", bound.get("le")), low_open="gt" in bound, high_open="lt" in bound,
        choices=get_args(hint) if get_origin(hint) is Literal else None, null=null,
        allowed=extra.get("allowed"),
    )  # fmt: skip
    return spec.allowed_text()


def _looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: starts with ``.``, ``/`` or ``~``, or has more than one ``/``
    (hub ids are ``name`` or ``org/name``)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1


def repo_root() -> Path:
    """The repository root that relative paths in params, and MLflow's default store, refer to.

    ``$DVC_ROOT`` when set: DVC sets it for every stage command, and for ``dvc exp run`` (workspace,
    ``--temp`` or queued) to the root of the repository the experiment was started from, not the
    temporary copy under ``<repo>/.dvc/tmp/exps/`` it executes in (DVC 3.x,
    ``dvc/repo/experiments/queue/base.py``). Should ``$DVC_ROOT`` name such a copy (a DVC that
    does not override it), the root is taken above its ``.dvc`` folder. Outside DVC: the working
    directory. Returned resolved (absolute, no symlinks).
    """
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def recorded_path(path: str, root: Path | None = None) -> str:
    """How a path param is written into outputs (store attrs, cfg.json): relative to the
    repository root (default :func:`repo_root`) when it lies inside the root's parent folder
    (the checkout and ``../shared``), so that outputs do not depend on where the checkout is and a
    queued experiment records what the workspace would; other paths and hub ids unchanged."""
    root = repo_root() if root is None else root
    if not os.path.isabs(path) or not Path(path).is_relative_to(root.parent):
        return path
    return os.path.relpath(path, root)


def resolve_path(path: str, root: Path) -> str:
    """``path`` made absolute against ``root`` (lexically: ``root/../x`` -> ``<parent>/x``);
    absolute and ``~`` paths returned unchanged."""
    if path.startswith("~") or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(root, path))


def _resolve_uri(uri: str | None, root: Path) -> str | None:
    """A relative ``sqlite:///<path>`` or a plain relative path (MLflow's file store) made
    absolute against ``root``; any other URI (``sqlite:////abs``, ``http://``, ...) unchanged."""
    if uri is None:
        return None
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///") :]
        return uri if db in ("", ":memory:") else "sqlite:///" + resolve_path(db, root)
    if "://" not in uri and not uri.startswith("file:"):
        return resolve_path(uri, root)
    return uri


def resolve_paths(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    """``cfg`` with its relative path params made absolute against ``root`` (module docstring).

    ``model.name_or_path`` is a path when it looks like one (:func:`_looks_local`) or names an
    existing directory under ``root`` (as transformers prefers a local directory over a hub id);
    otherwise it is a hub id and kept. ``model.gguf_file`` stays relative to that directory.
    """
    model, name = cfg.model, cfg.model.name_or_path
    if _looks_local(name) or (name and (root / name).is_dir()):
        model = model.model_copy(update={"name_or_path": resolve_path(name, root)})
    corpus_dirs = tuple(resolve_path(d, root) for d in cfg.data.corpus_dirs)
    uri = _resolve_uri(cfg.tracking.tracking_uri, root)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"corpus_dirs": corpus_dirs}),
        "model": model,
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": uri}),
    })  # fmt: skip


def _check_paths(cfg: PipelineConfig) -> None:
    """The directories and files that the resolved params name exist."""
    for d in cfg.data.corpus_dirs:
        _require(Path(d).is_dir(), "data.corpus_dirs", f"existing directories; {d!r} is not one")
    model = cfg.model
    if _looks_local(model.name_or_path) or model.gguf_file is not None:
        path = Path(model.name_or_path).expanduser()
        _require(path.is_dir(), "model.name_or_path", f"an existing directory; {path} is not")
        if model.gguf_file is not None:
            _require(
                (path / model.gguf_file).is_file(),
                "model.gguf_file",
                f"a file inside {path}; {model.gguf_file!r} is not there",
            )


def parse_params(raw: Mapping[str, Any], root: Path | None = None) -> PipelineConfig:
    """Build and validate a :class:`PipelineConfig` from the parsed params mapping, relative
    paths made absolute against ``root`` (default :func:`repo_root`; see :func:`resolve_paths`).

    Raises:
        ConfigError: unknown, missing, mistyped or out-of-range key (the message names it).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError("params: the file must hold a mapping of keys")
    cfg = resolve_paths(_validate(PipelineConfig, raw), repo_root() if root is None else root)
    _check_paths(cfg)
    return cfg


def load_params(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read ``params.yaml`` and return the validated :class:`PipelineConfig`.

    Raises:
        ConfigError: the file is missing or any key is wrong (see :func:`parse_params`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {path} not found")
    try:
        with path.open() as f:
            raw = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        what = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"params: {path} is not valid YAML ({what}{at})") from e
    return parse_params(raw)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matmuls natively: a CUDA GPU with bf16 tensor cores
    (compute capability 8.0 and up, Ampere, Hopper: ``torch.cuda.is_bf16_supported`` without
    emulation), or a CPU with AVX512-BF16 or AMX (torch's CPU feature probes). False elsewhere:
    on an AVX2-only CPU a bf16 GEMM is ~7x slower than fp32 (``bench/train_step.py``) and an
    older GPU emulates it. The one rule behind ``model.dtype: auto`` and ``train.autocast:
    auto``."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, n, lambda: False)() for n in probes)


def resolve_model_dtype(model: ModelConfig, device: torch.device) -> torch.dtype:
    """The dtype the LM of ``model`` is loaded and run in on ``device``: ``model.dtype``, or for
    ``auto`` bfloat16 where :func:`native_bf16` holds, else float32 (the tolerances measured
    against float32 are in docs/performance.md, "The LM in bf16")."""
    import torch

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    return torch.bfloat16 if native_bf16(device) else torch.float32


def resolve_model(model: ModelConfig, device: torch.device) -> ModelConfig:
    """``model`` with ``dtype`` resolved for ``device`` (:func:`resolve_model_dtype`): the
    config a stage that runs the LM records (store attrs, baseline.json, metrics) and checks
    provenance with, so no output says ``auto``."""
    name = str(resolve_model_dtype(model, device)).removeprefix("torch.")
    return model.model_copy(update={"dtype": name})


PROVENANCE_KEYS = ("model", "gguf_file", "hookpoint", "model_dtype", "d_in")


def check_provenance(
    model: ModelConfig,
    *,
    store: Any = None,
    sae: Any = None,
    sae_dir: str | Path | None = None,
    baseline: Mapping[str, Any] | None = None,
) -> None:
    """Raise :class:`InputError` (one line naming both sides) unless the params' ``model``, an
    activation store's attributes (``store``: a :class:`saelab.store.ActivationStore`), an SAE's
    ``cfg.json`` metadata and ``d_in`` (``sae``: a loaded SAE, read from ``sae_dir``) and a
    baseline's attributes agree on :data:`PROVENANCE_KEYS` (the model as recorded, the GGUF file,
    the hookpoint, the LM's dtype, d_in), before any work. Sides given as None are skipped, and
    so is a key that an input does not record; the params' ``model.dtype`` counts only when it is
    resolved (not ``auto``: a stage that runs the LM passes :func:`resolve_model`'s config).

    ``model_dtype`` is checked because the spliced ΔCE and KL are differences between the
    baseline's clean pass and the evaluation's spliced pass, and the cached activations are the
    input of both: all of them must come from one LM precision (docs/performance.md, "The LM
    in bf16": mixing a float32 clean CE with a bf16 spliced CE shifts ΔCE by more than the
    bf16/fp32 difference of ΔCE itself)."""
    params = {"model": recorded_path(model.name_or_path), "gguf_file": model.gguf_file,
              "hookpoint": model.hookpoint}  # fmt: skip
    if model.dtype != "auto":
        params["model_dtype"] = model.dtype
    sides: list[tuple[str, Mapping[str, Any]]] = [("params", params)]
    if store is not None:
        sides.append((f"activation store {store.path}", {**store.attrs, "d_in": store.d_in}))
    if sae is not None:
        where = Path(sae_dir) / "cfg.json" if sae_dir is not None else "the SAE's cfg.json"
        sides.append((str(where), {**sae.metadata, "d_in": sae.d_in}))
    if baseline is not None:
        sides.append(("the baseline's baseline.json", baseline))
    for key in PROVENANCE_KEYS:
        known = [(_provenance_label(side, key), v[key]) for side, v in sides if key in v]
        for (left, a), (right, b) in zip(known, known[1:], strict=False):
            if a != b:
                raise InputError(f"{left} is {a!r} but {right} is {b!r}")


def _provenance_label(side: str, key: str) -> str:
    if side == "params":
        name = {"model": "name_or_path", "model_dtype": "dtype"}.get(key, key)
        return f"params model.{name}"
    return f"{side}'s {key}"
