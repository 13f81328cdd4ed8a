"""A study: a grid of ``dvc exp`` runs defined in ``reports/<study>/study.yaml``, and its runs
table ``reports/<study>/runs.csv``, the committed record of every finished run's params and
metrics (``mlflow.db`` and ``dvc exp`` refs stay on the machine that ran them; the table travels
with the repository, and :mod:`saelab.report` is regenerated from it).

``study.yaml`` (every key required unless marked optional)::

    name: main
    seeds: [0, 1, 2]                  # each run is repeated once per seed
    seed_params:                      # the params set to the seed: "*" for every variant,
      "*": [train.seed]               # and per variant (optional)
      sampled: [variant_params.sampled.seed]
    base: {k: 32, sae.d_sae: 4608, train.n_tokens: 917504}     # every run (dotted params keys)
    variant_base: {switch: {variant_params.switch.n_experts: 8}}   # optional, per variant
    pinned: {model.dtype: float32}    # optional: set in every run but left out of its name
    groups:
      - name: k_sweep
        variants: [topk, batchtopk]
        base: {}                      # optional
        axes: {k: [16, 32, 64]}       # optional: the product of every axis' values
        points: [{...}, {...}]        # optional: settings of several keys at once, crossed
                                      # with the axes (e.g. Switch FLOP-matched: E and d_sae)
    claims: [...]                     # read by saelab.report

A run's overrides are, later ones winning: ``base``, ``variant_base[variant]``, the group's
``base``, a point, the axes' values, the seed params, and ``variants=[<variant>]`` (each run
trains and evaluates one SAE). Its name is derived from the overrides alone
(:func:`run_name`), so the same run reached from two groups is one run, listed in both groups.
``pinned`` params come first of all and stay out of the name while a run keeps their value: a
default of params.yaml that changed after runs were committed is pinned to the old value, so
new runs stay comparable and the committed runs keep their names (and are not planned again).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from saelab.config import ConfigError, variant_names

log = logging.getLogger(__name__)

STUDY_FILE = "study.yaml"
RUNS_FILE = "runs.csv"
CURVES_FILE = "curves.csv"
# Short names of the usual keys in run names; other keys appear with dots as "_".
ALIASES = {
    "k": "k",
    "sae.d_sae": "d",
    "train.n_tokens": "t",
    "evaluate.n_ctx": "c",
    "train.seed": "s",
    "variant_params.switch.n_experts": "E",
    "variant_params.sampled.l": "l",
    "variant_params.sampled.score": "",
}
# Columns of the runs table before the overrides and the metrics (in this order).
ID_COLUMNS = (
    "run", "groups", "variant", "seed", "k", "d_sae", "n_experts", "l", "score",
    "train.n_tokens", "source", "saelab_commit", "cpu_capability", "cpu_model",
)  # fmt: skip
# Where each identity column's value comes from in the resolved params.
ID_PARAMS = {
    "k": "k",
    "d_sae": "sae.d_sae",
    "train.n_tokens": "train.n_tokens",
    "seed": "train.seed",
}
VARIANT_ID_PARAMS = {
    "switch": {"n_experts": "variant_params.switch.n_experts"},
    "sampled": {"l": "variant_params.sampled.l", "score": "variant_params.sampled.score"},
}


@dataclass(frozen=True)
class Group:
    """One block of the grid: ``variants`` x product of ``axes`` x ``points``."""

    name: str
    variants: tuple[str, ...]
    base: Mapping[str, Any]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    points: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Study:
    """The parsed ``study.yaml`` (module docstring); ``path`` is its directory."""

    path: Path
    name: str
    seeds: tuple[int, ...]
    seed_params: Mapping[str, tuple[str, ...]]
    base: Mapping[str, Any]
    variant_base: Mapping[str, Mapping[str, Any]]
    groups: tuple[Group, ...]
    claims: tuple[Mapping[str, Any], ...]
    raw: Mapping[str, Any] = field(repr=False)
    pinned: Mapping[str, Any] = field(default_factory=dict)

    @property
    def runs_path(self) -> Path:
        return self.path / RUNS_FILE

    @property
    def curves_path(self) -> Path:
        return self.path / CURVES_FILE


@dataclass(frozen=True)
class Run:
    """One training + evaluation of one variant: ``dvc exp run --name name -S overrides``."""

    name: str
    groups: tuple[str, ...]
    variant: str
    seed: int
    overrides: Mapping[str, Any]


def _fail(key: str, allowed: str) -> ConfigError:
    return ConfigError(f"study: {key} must be {allowed}")


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise _fail(key, "a mapping of dotted params keys to values")
    return dict(raw)


def _variants(raw: Any, key: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw or any(v not in variant_names() for v in raw):
        raise _fail(key, f"a non-empty list of {', '.join(variant_names())}")
    return tuple(raw)


def _group(raw: Any, i: int) -> Group:
    key = f"groups[{i}]"
    if not isinstance(raw, Mapping):
        raise _fail(key, "a mapping with name, variants and optional base, axes, points")
    unknown = set(raw) - {"name", "variants", "base", "axes", "points"}
    if unknown:
        raise _fail(
            f"{key}.{sorted(unknown)[0]}", "absent (allowed: name, variants, base, axes, points)"
        )
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise _fail(f"{key}.name", "a non-empty string")
    axes = _mapping(raw.get("axes"), f"{key}.axes")
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise _fail(f"{key}.axes.{axis}", "a non-empty list of values")
    points = raw.get("points") or []
    if not isinstance(points, list):
        raise _fail(f"{key}.points", "a list of mappings")
    return Group(
        name=raw["name"],
        variants=_variants(raw.get("variants"), f"{key}.variants"),
        base=_mapping(raw.get("base"), f"{key}.base"),
        axes=tuple((a, tuple(v)) for a, v in axes.items()),
        points=tuple(_mapping(p, f"{key}.points[{j}]") for j, p in enumerate(points)),
    )


def parse_study(raw: Any, path: Path) -> Study:
    """A :class:`Study` from the parsed ``study.yaml`` of directory ``path``.

    Raises:
        ConfigError: a missing or malformed key (``study: <key> must be <allowed>``), or two
            different runs with the same name.
    """
    if not isinstance(raw, Mapping):
        raise _fail("the file", "a mapping")
    for key in ("name", "seeds", "seed_params", "base", "groups"):
        if key not in raw:
            raise ConfigError(f"study: missing key {key}")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise _fail("seeds", "a non-empty list of integers")
    seed_params = _mapping(raw["seed_params"], "seed_params")
    if "*" not in seed_params:
        raise _fail("seed_params", 'a mapping with a "*" entry (e.g. [train.seed])')
    for v, keys in seed_params.items():
        if (v != "*" and v not in variant_names()) or not isinstance(keys, list):
            raise _fail(f"seed_params.{v}", 'a list of params keys, under "*" or a variant name')
    variant_base = _mapping(raw.get("variant_base"), "variant_base")
    for v, b in variant_base.items():
        if v not in variant_names():
            raise _fail(f"variant_base.{v}", f"under a variant name ({', '.join(variant_names())})")
        _mapping(b, f"variant_base.{v}")
    if not isinstance(raw["groups"], list) or not raw["groups"]:
        raise _fail("groups", "a non-empty list")
    claims = raw.get("claims") or []
    if not isinstance(claims, list) or not all(isinstance(c, Mapping) for c in claims):
        raise _fail("claims", "a list of mappings")
    study = Study(
        path=Path(path),
        name=str(raw["name"]),
        seeds=tuple(seeds),
        seed_params={v: tuple(k) for v, k in seed_params.items()},
        base=_mapping(raw["base"], "base"),
        variant_base={v: dict(b or {}) for v, b in variant_base.items()},
        groups=tuple(_group(g, i) for i, g in enumerate(raw["groups"])),
        claims=tuple(claims),
        raw=raw,
        pinned=_mapping(raw.get("pinned"), "pinned"),
    )
    expand(study)  # name clashes are errors of the file
    return study


def load_study(directory: str | Path) -> Study:
    """Read ``<directory>/study.yaml`` (see :func:`parse_study`).

    Raises:
        ConfigError: the file is missing or malformed.
    """
    path = Path(directory) / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"study: file {path} not found")
    return parse_study(yaml.safe_load(path.read_text()), Path(directory))


def _name_part(key: str, value: Any) -> str:
    alias = ALIASES.get(key, key.replace(".", "_"))
    text = str(value).lower() if isinstance(value, bool) or value is None else str(value)
    text = re.sub(r"[^A-Za-z0-9_]", "p", text.replace(".", "p"))
    return f"{alias}{text}"


def run_name(variant: str, overrides: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """``<variant>-<alias><value>-...`` over the sorted overrides but ``variants`` and ``skip``
    (:data:`ALIASES`; dots in values as ``p``): a valid git ref and DVC experiment name that
    depends on the overrides only. E.g. ``topk-d4608-k32-s0-t917504``."""
    skip = {"variants", *skip}
    parts = [_name_part(k, overrides[k]) for k in sorted(overrides) if k not in skip]
    return "-".join([variant, *parts])


def _seeded(study: Study, variant: str, seed: int) -> dict[str, int]:
    keys = (*study.seed_params["*"], *study.seed_params.get(variant, ()))
    return dict.fromkeys(keys, seed)


def _group_runs(study: Study, group: Group) -> Iterable[Run]:
    axis_keys = [a for a, _ in group.axes]
    for variant in group.variants:
        for point in group.points or ({},):
            for values in itertools.product(*(v for _, v in group.axes)):
                for seed in study.seeds:
                    overrides = {
                        **study.pinned, **study.base, **study.variant_base.get(variant, {}),
                        **group.base, **point, **dict(zip(axis_keys, values, strict=True)),
                        **_seeded(study, variant, seed), "variants": [variant],
                    }  # fmt: skip
                    # every seed key but the first is a copy of it, and a pinned key at its
                    # pinned value is every committed run's: left out of the name
                    skip = [*study.seed_params["*"][1:], *study.seed_params.get(variant, ())]
                    skip += [k for k, v in study.pinned.items() if overrides[k] == v]
                    name = run_name(variant, overrides, skip)
                    yield Run(name, (group.name,), variant, seed, dict(sorted(overrides.items())))


def expand(study: Study) -> list[Run]:
    """Every run of the study, in ``groups`` order; a run reached from several groups appears
    once, with every group's name in ``groups``.

    Raises:
        ConfigError: two runs with different overrides get the same name.
    """
    runs: dict[str, Run] = {}
    for group in study.groups:
        for run in _group_runs(study, group):
            seen = runs.get(run.name)
            if seen is None:
                runs[run.name] = run
            elif dict(seen.overrides) != dict(run.overrides):
                raise _fail(
                    f"groups.{group.name}", f"runs with distinct names; {run.name} is ambiguous"
                )
            elif group.name not in seen.groups:
                runs[run.name] = Run(
                    seen.name, (*seen.groups, group.name), seen.variant, seen.seed, seen.overrides
                )
    return list(runs.values())


def _override_value(value: Any) -> str:
    """A value as DVC's ``-S key=value`` (Hydra's override grammar) reads it back."""
    if isinstance(value, list):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def exp_run_args(run: Run, targets: bool = False) -> list[str]:
    """``dvc exp run --queue --name <name> [evaluate@<variant>] -S key=value ...`` for ``run``
    (``targets``: only that variant's train and evaluate stages, not ``summarize``)."""
    args = ["dvc", "exp", "run", "--queue", "--name", run.name]
    if targets:
        args.append(f"evaluate@{run.variant}")
    for key, value in run.overrides.items():
        args += ["-S", f"{key}={_override_value(value)}"]
    return args


def pending(study: Study, done: Iterable[str], group: str | None = None) -> list[Run]:
    """The study's runs not in ``done`` (run names), optionally of one group only.

    Raises:
        ConfigError: ``group`` is not a group of the study.
    """
    if group is not None and group not in {g.name for g in study.groups}:
        names = ", ".join(g.name for g in study.groups)
        raise ConfigError(f"study: --group must be one of {names}")
    done = set(done)
    return [r for r in expand(study) if r.name not in done and (group is None or group in r.groups)]


def plan_lines(runs: Sequence[Run], targets: bool = False) -> list[str]:
    """One shell line per run (:func:`exp_run_args`, quoted)."""
    return [shlex.join(exp_run_args(r, targets)) for r in runs]


def queue_runs(runs: Sequence[Run], cwd: str | Path = ".", targets: bool = False) -> None:
    """Queue every run with ``dvc exp run --queue`` (start the workers with ``dvc queue start``).

    Raises:
        subprocess.CalledProcessError: dvc refused a run (the runs before it stay queued).
    """
    for run in runs:
        subprocess.run(exp_run_args(run, targets), cwd=cwd, check=True)
        log.info("queued %s", run.name)


# ---------------------------------------------------------------------------------------------
# runs table


def read_table(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV table as dicts of strings (``[]`` when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _columns(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> list[str]:
    rest = sorted({c for r in rows for c in r} - set(first))
    params = [c for c in rest if c.startswith("param:")]
    return [*first, *params, *(c for c in rest if not c.startswith("param:"))]


def write_table(path: str | Path, rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> None:
    """Write ``rows`` as CSV, columns ``first`` then the ``param:`` columns then the rest, each
    sorted; missing cells empty. Atomic: a temp file renamed over ``path``."""
    path = Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows, first), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    tmp.replace(path)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    return a == b


def matches(run: Run, params: Mapping[str, Any]) -> bool:
    """Whether ``params`` (the full nested params mapping) has every override of ``run`` and
    its variant in ``variants``."""
    if run.variant not in (params.get("variants") or ()):
        return False
    return all(_same(_get(params, k), v) for k, v in run.overrides.items() if k != "variants")


def match_run(study: Study, variant: str, params: Mapping[str, Any]) -> Run | None:
    """The study's run of ``variant`` that ``params`` :func:`matches`, the one with the most
    overrides when several do (a run whose overrides extend another's); None if none does."""
    found = [r for r in expand(study) if r.variant == variant and matches(r, params)]
    return max(found, key=lambda r: len(r.overrides), default=None)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics' numbers and strings (arrays, mappings and non-finite numbers dropped)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
        elif isinstance(value, str):
            out[key] = value
    return out


def run_row(
    run: Run, params: Mapping[str, Any], metrics: Mapping[str, Any], provenance: Mapping[str, str]
) -> dict[str, Any]:
    """One row of the runs table: identity columns (:data:`ID_COLUMNS`), ``param:<key>`` for
    every override, then every scalar metric (keys of ``metrics/<variant>.json`` as they are)."""
    row: dict[str, Any] = {"run": run.name, "groups": ";".join(run.groups), "variant": run.variant}
    ids = {**ID_PARAMS, **VARIANT_ID_PARAMS.get(run.variant, {})}
    row.update({col: _get(params, key) for col, key in ids.items()})
    row.update(provenance)
    row.update({f"param:{k}": v for k, v in run.overrides.items() if k != "variants"})
    metric_cols = {k: v for k, v in scalar_metrics(metrics).items() if k not in row}
    return {**row, **metric_cols}


def merge_rows(
    existing: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], replace: bool = False
) -> tuple[list[Mapping[str, Any]], int]:
    """``existing`` with the ``new`` rows whose ``run`` is not already there appended (or, with
    ``replace``, put in place of the old row); the merged rows and how many were added or
    replaced."""
    rows = {r["run"]: r for r in existing}
    changed = 0
    for row in new:
        if row["run"] in rows and not replace:
            continue
        changed += rows.get(row["run"]) != row
        rows[row["run"]] = row
    return list(rows.values()), changed


# ---------------------------------------------------------------------------------------------
# collecting finished runs


def provenance(commit: str | None, source: str) -> dict[str, str]:
    """``source``, ``saelab_commit``, and the CPU that ran this process:
    ``torch.backends.cpu.get_cpu_capability()`` and the model name of ``/proc/cpuinfo``. Collect
    where the runs ran: the table records this machine."""
    import torch

    return {
        "source": source,
        "saelab_commit": commit or "",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
    }


def cpu_model() -> str:
    """The ``model name`` of ``/proc/cpuinfo`` ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _git(args: Sequence[str], cwd: str | Path) -> str | None:
    """``git args`` in ``cwd``: its stripped stdout, or None when it fails (or cwd is missing)."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_commit(path: str | Path | None = None) -> str | None:
    """The saelab commit a file's contents come from: the last commit that changed ``path``,
    or HEAD with ``+dirty`` when ``path`` has uncommitted changes (or is untracked); HEAD when
    ``path`` is None; None outside a git repository."""
    cwd = Path(path).parent if path is not None else Path(".")
    head = _git(["rev-parse", "HEAD"], cwd)
    if path is None or head is None:
        return head
    name = Path(path).name
    if _git(["status", "--porcelain", "--", name], cwd):
        return f"{head}+dirty"
    return _git(["log", "-1", "--format=%H", "--", name], cwd) or f"{head}+dirty"


@dataclass(frozen=True)
class Finished:
    """A finished experiment read from ``dvc exp show --json``: its name, the commit it ran
    on (its baseline), the full params and the metrics of every metrics file."""

    name: str
    baseline: str | None
    params: Mapping[str, Any]
    metrics: Mapping[str, Mapping[str, Any]]


def _data(node: Any) -> Mapping[str, Any]:
    """``{file: {"data": {...}}}`` -> ``{file: {...}}`` (entries without data dropped)."""
    out = {}
    for file, entry in (node or {}).items():
        if isinstance(entry, Mapping) and isinstance(entry.get("data"), Mapping):
            out[file] = entry["data"]
    return out


def _exp_entries(shown: Any) -> Iterable[tuple[Mapping[str, Any], str | None, str | None]]:
    """(rev entry, baseline commit, executor state) for every experiment of ``dvc exp show
    --json`` (DVC 3: a list of baselines, each with ``experiments: [{revs: [...], executor:
    {state: queued|running|success|failed, ...} or null, name}]``)."""
    for baseline in shown if isinstance(shown, list) else []:
        if not isinstance(baseline, Mapping):
            continue
        for exp in baseline.get("experiments") or []:
            if not isinstance(exp, Mapping):
                continue
            state = (exp.get("executor") or {}).get("state")
            for rev in exp.get("revs") or []:
                if isinstance(rev, Mapping):
                    yield rev, baseline.get("rev"), state


def finished_experiments(shown: Any) -> list[Finished]:
    """The successful, named experiments of ``dvc exp show --json`` output (parsed JSON);
    queued, running and failed ones (executor state, or an ``error`` entry), and entries
    without params, are skipped."""
    found = []
    for rev, baseline, state in _exp_entries(shown):
        data = rev.get("data") or {}
        params = _data(data.get("params")).get("params.yaml")
        name = rev.get("name")
        if state not in (None, "success") or rev.get("error") or not name or params is None:
            continue
        found.append(Finished(name, baseline, params, _data(data.get("metrics"))))
    return found


def experiment_refs(cwd: str | Path = ".") -> list[tuple[str, str, str, int]]:
    """``(baseline, name, commit, committer time in s)`` of every finished experiment, in ref
    order: DVC 3 keeps one as the git ref ``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``
    (its queue and executor refs, ``refs/exps/celery/...`` and ``refs/exps/exec/...``, are
    skipped); [] when git cannot list them."""
    fmt = "--format=%(refname) %(objectname) %(committerdate:unix)"
    out = _git(["for-each-ref", fmt, "refs/exps"], cwd) or ""
    found = []
    for line in out.splitlines():
        ref, commit, when = line.split(" ")
        parts = ref.split("/")
        if len(parts) == 5 and re.fullmatch(r"[0-9a-f]{2}", parts[2]):
            baseline = parts[2] + parts[3]
            if re.fullmatch(r"[0-9a-f]{40}", baseline):
                found.append((baseline, parts[4], commit, int(when)))
    return found


def experiment_baselines(cwd: str | Path = ".") -> list[str]:
    """The baseline commits of the repository's experiments (:func:`experiment_refs`), once
    each."""
    return list(dict.fromkeys(baseline for baseline, *_ in experiment_refs(cwd)))


def exp_show(cwd: str | Path = ".") -> Any:
    """``dvc exp show --json --rev <b> ...`` over HEAD and every baseline of
    :func:`experiment_baselines`, parsed (``--all-commits`` evaluates every commit of the
    history: minutes on this repository).

    Raises:
        subprocess.CalledProcessError: dvc failed.
    """
    revs = ["HEAD", *experiment_baselines(cwd)]
    args = ["dvc", "exp", "show", "--json", *(a for r in revs for a in ("--rev", r))]
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def rows_from_experiments(study: Study, finished: Sequence[Finished]) -> list[dict[str, Any]]:
    """A runs-table row for each finished experiment named as a run of the study whose params
    agree with the run's overrides (others are logged and skipped)."""
    runs = {r.name: r for r in expand(study)}
    rows = []
    for exp in finished:
        run = runs.get(exp.name)
        if run is None:
            continue
        if not matches(run, exp.params):
            log.warning("experiment %s: params differ from the study's run; skipped", exp.name)
            continue
        metrics = exp.metrics.get(f"metrics/{run.variant}.json")
        if metrics is None:
            log.warning("experiment %s: no metrics/%s.json; skipped", exp.name, run.variant)
            continue
        prov = provenance(exp.baseline, f"dvc-exp:{exp.name}")
        rows.append(run_row(run, exp.params, metrics, prov))
    return rows


def rows_from_metrics(
    study: Study,
    metrics_dir: str | Path,
    params: Mapping[str, Any],
    commit: Callable[[Path], str | None] = git_commit,
) -> list[dict[str, Any]]:
    """A runs-table row for every ``<metrics_dir>/<variant>.json`` (variant of ``params``'
    ``variants``) that is a run of the study under ``params`` (the workspace's params.yaml, as
    a mapping) and whose ``k`` agrees with it; others are logged and skipped. ``commit(path)``
    gives the row's ``saelab_commit`` (default :func:`git_commit`)."""
    rows = []
    for variant in params.get("variants") or ():
        path = Path(metrics_dir) / f"{variant}.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        run = match_run(study, variant, params)
        if run is None or metrics.get("k") != params.get("k"):
            log.warning("%s: not a run of study %s under these params; skipped", path, study.name)
            continue
        rows.append(run_row(run, params, metrics, provenance(commit(path), f"metrics:{path}")))
    return rows


def collect(study: Study, rows: Sequence[Mapping[str, Any]], replace: bool = False) -> int:
    """Merge ``rows`` into the study's runs table (:func:`merge_rows`, written atomically);
    returns how many rows were added or replaced."""
    merged, changed = merge_rows(read_table(study.runs_path), rows, replace)
    if changed:
        write_table(study.runs_path, merged, ID_COLUMNS)
    return changed


# ---------------------------------------------------------------------------------------------
# learning curves (MLflow -> curves.csv)

CURVE_COLUMNS = ("run", "step", "tokens", "train_fvu", "train_l0", "train_dead_fraction")
CURVE_METRICS = {"train/fvu": "train_fvu", "train/l0": "train_l0",
                 "train/dead_fraction": "train_dead_fraction"}  # fmt: skip


def curves_from_mlflow(
    uri: str, experiment: str, rows: Sequence[Mapping[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """The training curves of the runs-table ``rows`` from the MLflow store at ``uri``: each
    row's nested run is the one of ``experiment`` tagged ``dvc_exp_name`` = the run's name and
    ``variant`` (:func:`saelab.tracking.run_tags`), not an extra hookpoint's run
    (:data:`~saelab.tracking.HOOKPOINT_TAG`); one curve row per logged step (``tokens`` =
    step x ``batch_size``) with the window means ``train/fvu``, ``train/l0`` and
    ``train/dead_fraction``. Runs without an MLflow run are left out (a log line says so)."""
    from mlflow.tracking import MlflowClient

    from saelab.tracking import HOOKPOINT_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        log.warning("no MLflow experiment %s at %s: no learning curves", experiment, uri)
        return []
    curves = []
    for row in rows:
        query = f"tags.dvc_exp_name = '{row['run']}' and tags.variant = '{row['variant']}'"
        found = client.search_runs([exp.experiment_id], query, order_by=["start_time DESC"])
        found = [r for r in found if HOOKPOINT_TAG not in r.data.tags]  # model.hookpoint's
        if not found:
            log.info("%s: no MLflow run, no learning curve", row["run"])
            continue
        per_step: dict[int, dict[str, Any]] = {}
        for metric, column in CURVE_METRICS.items():
            for m in client.get_metric_history(found[0].info.run_id, metric):
                point = per_step.setdefault(m.step, {"run": row["run"], "step": m.step})
                point.update(tokens=m.step * batch_size, **{column: m.value})
        curves += [per_step[s] for s in sorted(per_step)]
    return curves


def collect_curves(study: Study, curves: Sequence[Mapping[str, Any]]) -> int:
    """Add the curves of runs not yet in the study's ``curves.csv`` (written atomically);
    returns the number of runs added."""
    existing = read_table(study.curves_path)
    have = {r["run"] for r in existing}
    new = [c for c in curves if c["run"] not in have]
    if new:
        write_table(study.curves_path, [*existing, *new], CURVE_COLUMNS)
    return len({c["run"] for c in new})
