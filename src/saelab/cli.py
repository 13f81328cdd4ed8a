"""``saelab`` command line: one click command per pipeline stage (dvc.yaml calls them through
``stages/*.py``). Every hyperparameter comes from ``--params`` (params.yaml); the options here are
paths only. A bad parameter stops the command with one line naming the key, before any work.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from saelab.allocator import keep_freed_memory
from saelab.config import (
    ConfigError,
    PipelineConfig,
    at_hookpoint,
    check_provenance,
    load_params,
    recorded_path,
    resolve_model,
    variant_names,
)

if TYPE_CHECKING:
    from saelab.store import ActivationStore

log = logging.getLogger("saelab")

PARAMS = click.option(
    "--params", "params_path", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="params.yaml to read every hyperparameter from.",
)  # fmt: skip
VARIANT = click.option("--variant", required=True, type=click.Choice(variant_names()))
# input directories of the stage commands (each must exist)
TOKENS = click.option("--tokens", required=True, type=click.Path(exists=True, file_okay=False))
ACTIVATIONS = click.option(
    "--activations", required=True, type=click.Path(exists=True, file_okay=False)
)
SAE_DIR = click.option(
    "--sae", "sae_dir", required=True, type=click.Path(exists=True, file_okay=False)
)
HOOKPOINT = click.option(
    "--hookpoint", default=None,
    help="one of params' model.extra_hookpoints: run as if it were model.hookpoint (the *_hp "
    "stages of dvc.yaml); default: model.hookpoint",
)  # fmt: skip


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group()
@click.option(
    "--malloc", type=click.Choice(["keep", "default"]), default="keep", show_default=True,
    envvar="SAELAB_MALLOC", show_envvar=True,
    help="keep: glibc keeps freed memory for reuse (every stage allocates the same large "
    "tensors per batch; faster, a higher resident peak; saelab.allocator); default: glibc's.",
)  # fmt: skip
def cli(malloc: str) -> None:
    """Train and compare sparse autoencoders on a language model's activations."""
    _setup_logging()
    keep_freed_memory(malloc == "keep" and not _cuda_available())


def _cuda_available() -> bool:
    """Whether torch sees a CUDA GPU: the stages then run on it (``device: auto``), their large
    per-step tensors live in CUDA's own caching allocator, and glibc's setting would only raise
    the host's resident peak (:mod:`saelab.allocator`), so it is left at glibc's default."""
    import torch

    return torch.cuda.is_available()


@cli.command()
@PARAMS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="token zarr group")
def prepare(params_path: str, out: str) -> None:
    """Corpus -> tokenized, packed contexts (train/eval split by document) in a zarr group."""
    from saelab.capture import check_hookpoints, load_tokenizer, n_layers_of
    from saelab.data import (
        docs_per_source,
        fallback_decoded,
        prepare_tokens,
        read_corpus,
        separator_token_id,
        split_documents,
        write_tokens,
    )

    cfg = load_params(params_path)
    check_hookpoints(cfg.model, n_layers_of(cfg.model))
    tokenizer = load_tokenizer(cfg.model)
    try:
        docs = read_corpus(cfg.data.corpus_dirs)
    except ValueError as e:
        raise ConfigError(f"params: data.corpus_dirs must hold text documents ({e})") from e
    train_docs, eval_docs = split_documents(docs, cfg.data.eval_fraction, cfg.data.seed)
    try:
        splits = prepare_tokens(train_docs, eval_docs, tokenizer, cfg.data.ctx_len, cfg.data.seed)
    except ValueError as e:
        raise ConfigError(
            f"params: data.ctx_len must leave each split a whole context ({e})"
        ) from e
    attrs = {
        "corpus_dirs": [recorded_path(d) for d in cfg.data.corpus_dirs],
        "docs_per_source": {
            "train": docs_per_source(train_docs),
            "eval": docs_per_source(eval_docs),
        },
        "eval_documents": [d.key for d in eval_docs],
        "fallback_decoded": fallback_decoded(docs),
        "tokenizer": recorded_path(cfg.model.name_or_path),
        "separator_token_id": separator_token_id(tokenizer),
        "seed": cfg.data.seed,
    }
    write_tokens(out, splits, attrs)
    log.info("wrote %s: %s", out, {k: v.shape for k, v in splits.items()})


@cli.command()
@PARAMS
@TOKENS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="activation dir")
@click.option(
    "--hookpoints-out", default=None, type=click.Path(file_okay=False),
    help="directory of the stores of model.extra_hookpoints, <dir>/<hookpoint>/{train,eval} "
    "(written empty when there are none); required when there are some",
)  # fmt: skip
def cache(params_path: str, tokens: str, out: str, hookpoints_out: str | None) -> None:
    """Activations at the hookpoint for both splits -> zarr stores ``<out>/{train,eval}``, and
    at each extra hookpoint -> ``<hookpoints-out>/<hookpoint>/{train,eval}`` from the same
    forward passes.

    With ``distributed.cache_nproc_per_node`` > 1 it starts itself that many times under
    ``distributed.launcher`` (torchrun); started by torchrun (``WORLD_SIZE`` > 1), the ranks
    write disjoint chunks of the same stores, which rank 0 moves into place once all are done:
    the stores of one process (:mod:`saelab.cache`)."""
    import torch

    from saelab import distributed
    from saelab.cache import cache_activations
    from saelab.capture import load_model, resolve_device

    cfg = load_params(params_path)
    if cfg.distributed.cache_nproc_per_node > 1 and not distributed.launched_by_torchrun():
        n, launcher = cfg.distributed.cache_nproc_per_node, cfg.distributed.launcher
        args = ["--params", params_path, "--tokens", tokens, "--out", out]
        args += ["--hookpoints-out", hookpoints_out] if hookpoints_out is not None else []
        sys.exit(distributed.relaunch(launcher, n, ["-m", "saelab.cli", "cache", *args]))
    device = resolve_device(cfg.model.device)
    device = distributed.init_from_env(device.type) or device
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, device)})  # attrs: no "auto"
    model = load_model(cfg.model, device)
    try:
        with distributed.data_parallel():
            cache_activations(model, cfg, tokens, out, hookpoints_out)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@cli.command()
@PARAMS
@VARIANT
@HOOKPOINT
@ACTIVATIONS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="SAE directory")
@click.option(
    "--checkpoints", "checkpoint_dir", default=None, type=click.Path(file_okay=False),
    help="Checkpoint directory: written every train.checkpoint_every steps and on interrupt, "
    "resumed (in the same MLflow run) when it matches, removed when training completes. "
    "Default: no checkpoints.",
)  # fmt: skip
def train(
    params_path: str,
    variant: str,
    hookpoint: str | None,
    activations: str,
    out: str,
    checkpoint_dir: str | None,
) -> None:
    """Train one SAE variant on the cached train activations; save safetensors + cfg.json.

    With ``distributed.nproc_per_node`` > 1 it starts itself that many times under
    ``distributed.launcher`` (torchrun); started by torchrun (``WORLD_SIZE`` > 1), each process
    trains on its slice of every batch (:mod:`saelab.distributed`), and rank 0 alone logs to
    MLflow and writes the SAE."""
    import torch

    from saelab import distributed
    from saelab.capture import resolve_device
    from saelab.checkpoint import fingerprint, peek_checkpoint
    from saelab.sae import build_sae
    from saelab.store import ActivationStore, atomic_dir
    from saelab.tracking import NullTracker, flatten, mlflow_run, tracking_uri
    from saelab.train import train_sae

    base = load_params(params_path)
    cfg = at_hookpoint(base, hookpoint)
    if cfg.distributed.nproc_per_node > 1 and not distributed.launched_by_torchrun():
        args = ["--params", params_path, "--variant", variant, "--activations", activations,
                "--out", out]  # fmt: skip
        args += ["--hookpoint", hookpoint] if hookpoint is not None else []
        args += ["--checkpoints", checkpoint_dir] if checkpoint_dir is not None else []
        n, launcher = cfg.distributed.nproc_per_node, cfg.distributed.launcher
        sys.exit(distributed.relaunch(launcher, n, ["-m", "saelab.cli", "train", *args]))
    device = resolve_device(cfg.train.device)
    device = distributed.init_from_env(device.type) or device
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    store = ActivationStore(Path(activations) / "train")
    check_provenance(cfg.model, store=store)
    batches, max_norm = _training_batches(cfg, store, part=(rank, world))
    whole = _training_batches(cfg, store, max_norm=max_norm)[0] if world > 1 else None
    data_id = {"store": store.attrs, "exclude_first_position": cfg.sae.exclude_first_position,
               "max_norm": max_norm}  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.train.seed)
    hparams = cfg.variant_params.of(variant)
    sae = build_sae(variant, store.d_in, cfg.sae.d_sae, cfg.k, hparams, generator)
    checkpoints = Path(checkpoint_dir) if checkpoint_dir is not None else None
    run_id = None  # a resumed training logs to the run of its checkpoint
    if checkpoints is not None:
        run_id = peek_checkpoint(checkpoints, fingerprint(sae, cfg.train, device, data_id))
    if rank != 0:  # the other ranks train in step with rank 0 and write nothing
        train_sae(sae, batches, cfg.train, NullTracker(), device, checkpoints, data_id, whole)
        torch.distributed.destroy_process_group()
        return
    uri = tracking_uri(cfg.tracking.tracking_uri)
    name, tags = _run_name_and_tags(base, cfg, uri, variant)  # a new run's
    with mlflow_run(cfg.tracking.experiment, uri, name, tags, run_id) as tracker:
        tracker.log_params({"variant": variant, "world_size": world,
                            **flatten(cfg.model_dump())})  # fmt: skip
        summary = train_sae(sae, batches, cfg.train, tracker, device, checkpoints, data_id, whole)
        tracker.log_metrics({f"train_summary/{k}": v for k, v in summary.items()})
        metadata = _sae_metadata(cfg, store.attrs, summary, tracker.run_id)
        metadata["max_norm"] = max_norm
        with atomic_dir(out) as tmp:
            sae.cpu().save(tmp, metadata)
        tracker.log_artifacts(out, f"models/{variant}")
    if world > 1:
        torch.distributed.destroy_process_group()


def _nested_run_tags(
    cfg: PipelineConfig, uri: str, variant: str, hookpoint: str | None = None
) -> dict[str, str]:
    """Tags of a new variant run (:func:`~saelab.tracking.variant_run_tags`): nested under the
    pipeline run's parent when run by DVC, standalone otherwise; the run of an extra hookpoint
    (``hookpoint``) is also tagged :data:`~saelab.tracking.HOOKPOINT_TAG`."""
    from saelab.tracking import HOOKPOINT_TAG, params_hash, variant_run_tags

    digest = params_hash(cfg.model_dump())
    tags = variant_run_tags(cfg.tracking.experiment, uri, variant, digest)
    return tags if hookpoint is None else {**tags, HOOKPOINT_TAG: hookpoint}


def _run_name_and_tags(
    base: PipelineConfig, cfg: PipelineConfig, uri: str, variant: str
) -> tuple[str, Callable[[], dict[str, str]]]:
    """The MLflow run name and the tags (a callable: :func:`_nested_run_tags`) of a new run of
    ``variant`` with ``cfg``, which is ``base`` (the params as loaded) or ``base`` at one of its
    extra hookpoints (:func:`~saelab.config.at_hookpoint`). Such a run is named
    ``<variant> <hookpoint>`` and nests under the parent of ``base``: one pipeline run, one
    parent."""
    hookpoint = None if cfg is base else cfg.model.hookpoint
    name = variant if hookpoint is None else f"{variant} {hookpoint}"
    return name, functools.partial(_nested_run_tags, base, uri, variant, hookpoint)


def _training_batches(
    cfg: PipelineConfig,
    store: ActivationStore,
    part: tuple[int, int] = (0, 1),
    max_norm: float | None = None,
) -> tuple[Iterator, float | None]:
    """The seeded stream of shuffled training batches (sinks dropped), or part ``part`` of
    every batch (data-parallel training), and the norm above which a token counts as a sink
    (None: no norm cut; computed unless ``max_norm`` is given)."""
    from saelab.store import ShuffledBatches, drop_outliers, sink_norm

    exclude = cfg.sae.exclude_first_position
    if max_norm is None:
        max_norm = sink_norm(
            store.path, cfg.sae.exclude_norm_factor, cfg.train.scale_tokens,
            exclude_first_position=exclude,
        )  # fmt: skip
    batches = drop_outliers(
        ShuffledBatches(
            store.path, cfg.train.batch_size, exclude_first_position=exclude,
            shuffle_chunks=cfg.train.shuffle_chunks, seed=cfg.train.seed, part=part,
        ),
        max_norm,
    )  # fmt: skip
    return batches, max_norm


def _sae_metadata(cfg: PipelineConfig, store_attrs: dict, summary: dict, run_id: str) -> dict:
    return {
        "model": recorded_path(cfg.model.name_or_path),
        "gguf_file": cfg.model.gguf_file,
        "model_dtype": store_attrs.get("model_dtype"),
        "hookpoint": cfg.model.hookpoint,
        "context_size": cfg.data.ctx_len,
        "exclude_first_position": cfg.sae.exclude_first_position,
        "activations_n_tokens": store_attrs["n_tokens"],
        "train_summary": summary,
        "mlflow_run_id": run_id,
    }


@cli.command()
@PARAMS
@HOOKPOINT
@TOKENS
@ACTIVATIONS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="baseline dir")
def baseline(
    params_path: str, hookpoint: str | None, tokens: str, activations: str, out: str
) -> None:
    """Clean and ablated CE and the clean LM-head inputs of the eval contexts, shared by every
    SAE's evaluation (saelab.baseline)."""
    from saelab.baseline import run_baseline_stage

    cfg = at_hookpoint(load_params(params_path), hookpoint)
    attrs = run_baseline_stage(cfg, Path(tokens), Path(activations), Path(out))
    log.info("baseline: %s", json.dumps(attrs["checks"]))


@cli.command()
@PARAMS
@VARIANT
@HOOKPOINT
@TOKENS
@ACTIVATIONS
@click.option(
    "--baseline",
    "baseline_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="the baseline stage's output",
)
@SAE_DIR
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="metrics JSON")
@click.option(
    "--hist",
    default=None,
    type=click.Path(dir_okay=False),
    help="histograms JSON (per-token L0, feature density); default: none written",
)
@click.option(
    "--per-context", default=None, type=click.Path(dir_okay=False),
    help="per-context sums (.npz) for paired comparisons in the summary; default: none written",
)  # fmt: skip
def evaluate(
    params_path: str,
    variant: str,
    hookpoint: str | None,
    tokens: str,
    activations: str,
    baseline_dir: str,
    sae_dir: str,
    out: str,
    hist: str | None,
    per_context: str | None,
) -> None:
    """Reconstruction, sparsity and spliced CE/KL with 95% intervals on the eval contexts."""
    from saelab.evaluate import evaluate_inputs, open_evaluation
    from saelab.tracking import mlflow_run, tracking_uri, write_json_atomic, write_npz_atomic

    base = load_params(params_path)
    cfg = at_hookpoint(base, hookpoint)
    _check_variant(sae_dir, variant)
    inputs = open_evaluation(
        cfg, Path(sae_dir), Path(tokens), Path(activations), Path(baseline_dir)
    )
    metadata = inputs.sae.metadata
    uri = tracking_uri(cfg.tracking.tracking_uri)
    run_id = metadata.get("mlflow_run_id")
    name, tags = _run_name_and_tags(base, cfg, uri, variant)  # if run_id is not stored
    with mlflow_run(cfg.tracking.experiment, uri, name, tags, run_id) as tracker:
        metrics, histograms, sums = evaluate_inputs(cfg, inputs)
        metrics.update({f"train_{k}": v for k, v in metadata.get("train_summary", {}).items()})
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        if hist is not None:
            write_json_atomic(hist, {"variant": variant, "k": cfg.k, **histograms})
        if per_context is not None:
            write_npz_atomic(per_context, sums)
        lm = {"model_dtype": inputs.model.dtype}  # the LM precision that produced the metrics
        write_json_atomic(out, {"variant": variant, "k": cfg.k, **lm, **metrics})
    log.info("%s: %s", variant, json.dumps(metrics, indent=1))


@cli.command()
@PARAMS
@click.option(
    "--metrics",
    "metrics_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="directory of the evaluate stage's <variant>.json",
)
@click.option(
    "--hist",
    "hist_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="directory of the evaluate stage's <variant>.json histograms",
)
@click.option(
    "--per-context",
    "per_context_dir",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="directory of the evaluate stage's <variant>.npz per-context sums: paired comparisons",
)
@click.option(
    "--structure", "structure_dir", default=None, type=click.Path(exists=True, file_okay=False),
    help="directory of the structure stage's <variant>.json: merged into the summary rows",
)  # fmt: skip
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="summary JSON")
@click.option(
    "--plots",
    "plots_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="directory for the plot data (pareto, l0_hist, density_hist) and png/",
)
def summarize(
    params_path: str,
    metrics_dir: str,
    hist_dir: str,
    per_context_dir: str | None,
    structure_dir: str | None,
    out: str,
    plots_dir: str,
) -> None:
    """Compare the variants of params' ``variants``: summary JSON, DVC plot data, PNG plots;
    all logged to the pipeline's MLflow parent run, which this finishes."""
    from saelab.store import atomic_dir
    from saelab.summarize import PLOT_FILES, comparison, paired_differences, render_pngs
    from saelab.tracking import (
        flatten,
        mlflow_run,
        params_hash,
        pipeline_run_id,
        tracking_uri,
        write_json_atomic,
    )

    cfg = load_params(params_path)
    metrics = _per_variant(metrics_dir, cfg.variants)
    if structure_dir is not None:
        structure = _per_variant(structure_dir, cfg.variants)
        metrics = [{**s, **m} for m, s in zip(metrics, structure, strict=True)]
    data = comparison(metrics, _per_variant(hist_dir, cfg.variants))
    for name in PLOT_FILES:
        write_json_atomic(Path(plots_dir) / name, data[name])
    with atomic_dir(Path(plots_dir) / "png") as tmp:
        render_pngs(data, tmp)
    if per_context_dir is not None:
        sums = {v: _npz(Path(per_context_dir) / f"{v}.npz") for v in cfg.variants}
        data["summary"]["paired"] = paired_differences(
            sums, cfg.evaluate.n_bootstrap, cfg.evaluate.bootstrap_seed
        )
    write_json_atomic(out, data["summary"])
    uri = tracking_uri(cfg.tracking.tracking_uri)
    digest = params_hash(cfg.model_dump())
    parent = pipeline_run_id(cfg.tracking.experiment, uri, digest)
    with mlflow_run(cfg.tracking.experiment, uri, "pipeline", {}, parent) as tracker:
        tracker.log_params(flatten(cfg.model_dump()))
        tracker.log_metrics(
            {f"{v}/{k}": x for v, row in data["summary"].items() for k, x in _flat(row)}
        )
        tracker.log_artifacts(Path(plots_dir) / "png", "plots")
        tracker.log_artifacts(metrics_dir, "metrics")  # per-variant metrics JSON
        tracker.log_artifact(out)  # the summary (at the repo root: not its whole directory)
    log.info("summary of %s written to %s", ", ".join(cfg.variants), out)


def _npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def _flat(row: dict, prefix: str = ""):
    """(key, number) pairs of a summary row; nested rows (``paired``) as ``<pair>/<key>``."""
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _per_variant(directory: str, variants: tuple[str, ...]) -> list[dict]:
    """The JSON files ``<directory>/<variant>.json`` of ``variants``, in that order."""
    return [json.loads((Path(directory) / f"{v}.json").read_text()) for v in variants]


@cli.command("export")
@SAE_DIR
@click.option("--out", required=True, type=click.Path(file_okay=False), help="export directory")
@click.option(
    "--format", "fmt", default="saelens", show_default=True,
    type=click.Choice(("saelens", "sparsify")),
    help="saelens: cfg.json + sae_weights.safetensors; sparsify: <out>/<hookpoint>/ (topk only)",
)  # fmt: skip
@click.option(
    "--params", "params_path", default=None, type=click.Path(exists=True, dir_okay=False),
    help="params.yaml whose export.hub_id names the model; given, its model and hookpoint must "
    "be the SAE's (default: ./params.yaml if present, used only if its model is the SAE's)",
)  # fmt: skip
@click.option(
    "--model-name", default=None,
    help="hub id for the export's metadata.model_name (default: see saelab.export.model_ref)",
)  # fmt: skip
def export_cmd(
    sae_dir: str, out: str, fmt: str, params_path: str | None, model_name: str | None
) -> None:
    """Write the SAE of --sae in SAELens's (or sparsify's) format, with everything needed to
    reproduce saelab's numbers in its metadata (model hub id, GGUF file, dtype, sink rule)."""
    from saelab.export import ExportError, export_dir
    from saelab.store import atomic_dir

    explicit = params_path is not None  # an explicit --params must describe the SAE
    if params_path is None and Path("params.yaml").is_file():
        params_path = "params.yaml"
    cfg = load_params(params_path) if params_path is not None else None
    try:
        with atomic_dir(out) as tmp:
            export_dir(sae_dir, tmp, cfg, model_name, fmt, check_params=explicit)
    except ExportError as e:
        raise click.ClickException(str(e)) from e


@cli.command("probe-data")
@PARAMS
@click.option("--out", required=True, type=click.Path(file_okay=False), help="probe zarr group")
def probe_data(params_path: str, out: str) -> None:
    """Probe contexts, first-letter prompts and their raw-activation probes (saelab.probes)."""
    from saelab.probes import build_probe_data

    build_probe_data(load_params(params_path), Path(out))


@cli.command()
@PARAMS
@VARIANT
@click.option("--probes", required=True, type=click.Path(exists=True, file_okay=False))
@ACTIVATIONS
@SAE_DIR
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="metrics JSON")
def structure(
    params_path: str, variant: str, probes: str, activations: str, sae_dir: str, out: str
) -> None:
    """Sparse probing, feature absorption and feature sharing of one SAE (saelab.structure)."""
    from saelab.structure import run_structure
    from saelab.tracking import write_json_atomic

    cfg = load_params(params_path)
    _check_variant(sae_dir, variant)
    metrics = run_structure(cfg, Path(sae_dir), Path(probes), Path(activations))
    write_json_atomic(out, {"variant": variant, "k": cfg.k, **metrics})
    log.info("%s structure: %s", variant, json.dumps(metrics, indent=1))


def _check_variant(sae_dir: str, variant: str) -> None:
    """ConfigError unless the SAE in ``sae_dir`` is a ``variant`` SAE (its cfg.json readable)."""
    from saelab.sae import read_sae_config

    held = read_sae_config(sae_dir).get("variant")
    if held != variant:
        raise ConfigError(f"--sae {sae_dir} holds a {held} SAE, not {variant}")


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    # SystemExit unwinds the stack, so temp outputs (atomic_dir, ActivationWriter) are removed.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point: a ConfigError ends the command with one line naming the key (exit 2);
    SIGTERM (a killed ``dvc repro``) unwinds like Ctrl-C, so no half-written output remains."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        cli.main(args=argv, standalone_mode=False)
    except ConfigError as e:
        click.echo(f"saelab: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


# --- studies (issue 12): saelab study plan|collect, saelab report ------------------------------

STUDY = click.option(
    "--study", "study_dir", required=True, type=click.Path(file_okay=False),
    help="study directory holding study.yaml (e.g. reports/main)",
)  # fmt: skip


@cli.group()
def study() -> None:
    """A grid of dvc exp runs (reports/<study>/study.yaml) and its runs table (runs.csv)."""


@study.command("plan")
@STUDY
@click.option("--group", default=None, help="only the runs of this group")
@click.option(
    "--submit", is_flag=True, help="queue them (dvc exp run --queue); then dvc queue start"
)
@click.option(
    "--targets/--all-stages", default=True, show_default=True,
    help="queue dvc exp run evaluate@<variant>: the run's train and evaluate stages only; "
    "--all-stages: the whole pipeline of its one variant (probe_data, structure, features, "
    "summarize too: minutes more per run; study structure measures structure afterwards)",
)  # fmt: skip
def study_plan(study_dir: str, group: str | None, submit: bool, targets: bool) -> None:
    """Print the dvc exp run --queue line of every run not yet in the runs table."""
    from saelab.study import load_study, pending, plan_lines, queue_runs, read_table

    spec = load_study(study_dir)
    runs = pending(spec, (r["run"] for r in read_table(spec.runs_path)), group)
    if submit:
        queue_runs(runs, targets=targets)
    else:
        for line in plan_lines(runs, targets):
            click.echo(line)
    log.info("%d runs pending in study %s", len(runs), spec.name)


@study.command("collect")
@STUDY
@click.option(
    "--from-metrics", "metrics_dir", default=None, type=click.Path(exists=True, file_okay=False),
    help="read <dir>/<variant>.json of the workspace (with --params) instead of dvc exp show",
)  # fmt: skip
@PARAMS
@click.option(
    "--exp-json", default=None, type=click.Path(exists=True, dir_okay=False),
    help="a saved `dvc exp show --json` output instead of running it",
)  # fmt: skip
@click.option("--replace", is_flag=True, help="replace rows of runs already in the table")
@click.option(
    "--no-curves", is_flag=True,
    help="do not read the runs' learning curves from MLflow (params' tracking) into curves.csv",
)  # fmt: skip
@click.option(
    "--cpu-capability", default=None,
    help="the torch CPU capability of the machine that ran the runs, when collecting on "
    "another one (default: this machine's, torch.backends.cpu.get_cpu_capability())",
)  # fmt: skip
def study_collect(
    study_dir: str,
    metrics_dir: str | None,
    params_path: str,
    exp_json: str | None,
    replace: bool,
    no_curves: bool,
    cpu_capability: str | None,
) -> None:
    """Append the study's finished runs to its runs table (one row per run, no duplicates)."""
    import yaml

    from saelab.study import (
        collect,
        exp_show,
        finished_experiments,
        load_study,
        rows_from_experiments,
        rows_from_metrics,
    )

    spec = load_study(study_dir)
    if metrics_dir is not None:
        load_params(params_path)  # a bad params file is an error before any row is read
        params = yaml.safe_load(Path(params_path).read_text())
        rows = rows_from_metrics(spec, metrics_dir, params)
    else:
        shown = json.loads(Path(exp_json).read_text()) if exp_json else exp_show()
        rows = rows_from_experiments(spec, finished_experiments(shown))
    if cpu_capability is not None:
        rows = [{**r, "cpu_capability": cpu_capability} for r in rows]
    added = collect(spec, rows, replace)
    log.info("%d of %d runs found added to %s", added, len(rows), spec.runs_path)
    if metrics_dir is None and not no_curves:
        _collect_curves(spec, rows, params_path)


@study.command("structure")
@STUDY
@PARAMS
@click.option(
    "--probes", default="data/probes", show_default=True,
    type=click.Path(exists=True, file_okay=False), help="the probe_data stage's output",
)  # fmt: skip
@click.option(
    "--activations", default="data/activations", show_default=True,
    type=click.Path(exists=True, file_okay=False), help="the cache stage's output (its eval store)",
)  # fmt: skip
@click.option("--replace", is_flag=True, help="re-measure runs that already have structure columns")
def study_structure(
    study_dir: str, params_path: str, probes: str, activations: str, replace: bool
) -> None:
    """Sparse probing, absorption and feature sharing of the study's runs selected by its
    ``structure:`` filters, from each experiment's SAE, into runs.csv (saelab.study_structure)."""
    import yaml

    from saelab.report import select
    from saelab.structure import run_structure
    from saelab.study import collect, load_study, read_table
    from saelab.study_structure import probes_hash, selection, structure_rows

    spec = load_study(study_dir)
    load_params(params_path)
    workspace = yaml.safe_load(Path(params_path).read_text())
    table = read_table(spec.runs_path)
    chosen = {r["run"]: r for w in selection(spec.raw) for r in select(table, w)}
    todo = [r for r in chosen.values() if replace or not r.get("sp_source_k1")]
    log.info("%d runs selected, %d to measure", len(chosen), len(todo))

    def measure(cfg, sae_dir):
        return run_structure(cfg, sae_dir, Path(probes), Path(activations))

    rows = structure_rows(todo, measure, workspace, probes_hash())
    added = collect(spec, [r for r in rows if "structure_probes" in r], replace=True)
    log.info("%d rows of %s gained structure metrics", added, spec.runs_path)


def _collect_curves(spec: object, rows: list[dict], params_path: str) -> None:
    """The learning curves of ``rows`` from the MLflow store of params (``tracking``) into the
    study's curves.csv."""
    from saelab.study import collect_curves, curves_from_mlflow
    from saelab.tracking import tracking_uri

    cfg = load_params(params_path)
    uri = tracking_uri(cfg.tracking.tracking_uri)
    curves = curves_from_mlflow(uri, cfg.tracking.experiment, rows, cfg.train.batch_size)
    added = collect_curves(spec, curves)
    log.info("learning curves of %d runs added to %s", added, spec.curves_path)


@cli.command("report")
@STUDY
@PARAMS
def report_cmd(study_dir: str, params_path: str) -> None:
    """runs.csv + study.yaml -> report.md and png/ in the study directory."""
    import yaml

    from saelab.report import write_report
    from saelab.study import load_study

    load_params(params_path)  # a bad params file is an error before anything is written
    path = write_report(load_study(study_dir), yaml.safe_load(Path(params_path).read_text()))
    log.info("wrote %s", path)


@cli.command()
@PARAMS
@VARIANT
@TOKENS
@ACTIVATIONS
@SAE_DIR
@click.option("--out", required=True, type=click.Path(file_okay=False), help="pages directory")
def features(
    params_path: str, variant: str, tokens: str, activations: str, sae_dir: str, out: str
) -> None:
    """Feature pages of one SAE: top contexts, random firings, histograms, logit lens and
    decoder neighbours of every latent, from the eval activations (static HTML + JSON)."""
    from saelab.browse.pages import build_features
    from saelab.store import atomic_dir

    cfg = load_params(params_path)
    with atomic_dir(out) as tmp:
        build_features(cfg, variant, Path(sae_dir), Path(tokens), Path(activations), tmp)


@cli.command("features-index")
@PARAMS
@click.option(
    "--models", required=True, type=click.Path(exists=True, file_okay=False),
    help="directory of the SAEs, models/<variant>",
)  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="pages directory")
def features_index(params_path: str, models: str, out: str) -> None:
    """Cross-variant page: each latent's nearest latent of every other variant by decoder
    cosine (next to the variants' feature pages)."""
    from saelab.browse.pages import build_compare
    from saelab.store import atomic_dir

    cfg = load_params(params_path)
    with atomic_dir(out) as tmp:
        summary = build_compare(cfg, Path(models), tmp)
    log.info("decoder matches: %s", json.dumps(summary))


@cli.command()
@click.option(
    "--dir", "directory", default="features", show_default=True,
    type=click.Path(file_okay=False), help="the feature pages (features/<variant>, compare)",
)  # fmt: skip
@click.option("--port", default=8008, show_default=True, help="0: any free port")
def browse(directory: str, port: int) -> None:
    """Serve the feature pages on http://127.0.0.1:<port> until Ctrl-C."""
    from saelab.browse.serve import make_server

    try:
        server = make_server(directory, port)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from e
    host, bound = server.server_address[:2]
    click.echo(f"feature pages of {directory} on http://{host}:{bound}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
