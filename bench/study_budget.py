"""Budget of a study (issue 12): one training step of every distinct SAE shape of its grid,
timed here, times the steps of each run, plus a per-run overhead; the total wall-clock of the
whole grid on this CPU.

Each distinct (variant, k, d_sae, hyperparameters) of ``saelab.study.expand`` (hyperparameters:
params.yaml's ``variant_params.<variant>`` with the run's overrides) gets one fresh SAE and
``--repeats`` steps of ``saelab.train.train_step`` as the trainer runs it (sparse path, SAEAdam,
``train.autocast: auto``; ``train_step.py``'s settings), median seconds. A run's training time
is ``train.n_tokens // batch`` steps of its shape; ``--overhead-seconds`` (per run: loading,
input scaling, the evaluate stage) is added as given, not measured here.

On a shared machine the absolute step times drift with the load; their ratios hold better.
``--tok-s topk=13941 ...`` (train tokens/s of each variant's default-shape run, measured by a
pipeline run: ``metrics/<variant>.json``'s ``train_tokens_per_s``) also prints the total with
each run's step time = that variant's measured step time x (this bench's step time of the run's
shape / of the variant's default shape).

Run: ``python bench/study_budget.py --study reports/main [--params params.yaml]
[--overhead-seconds 120] [--repeats 3] [--tokens 917504 1835008]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping

import torch
import yaml
from train_step import _median_seconds, inputs, start, step_parser

from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.study import Run, expand, load_study
from saelab.train import autocast_dtype, param_groups, train_step


def shape_of(run: Run, params: Mapping) -> tuple[str, int, int, str]:
    """(variant, k, d_sae, hparams as sorted JSON) of a run: params.yaml with its overrides."""
    hparams = dict(params["variant_params"][run.variant] or {})
    prefix = f"variant_params.{run.variant}."
    hparams.update({k[len(prefix) :]: v for k, v in run.overrides.items() if k.startswith(prefix)})
    if "seed" in hparams:  # a seed changes no step's cost: one shape for every seed
        hparams["seed"] = 0
    k = run.overrides.get("k", params["k"])
    d_sae = run.overrides.get("sae.d_sae", params["sae"]["d_sae"])
    return run.variant, int(k), int(d_sae), json.dumps(hparams, sort_keys=True)


def step_fn(shape: tuple[str, int, int, str], x: torch.Tensor) -> Callable[[], object]:
    """One trainer step of a fresh SAE of ``shape`` on ``x`` [batch, d_in] (as train_step.py)."""
    variant, k, d_sae, hparams = shape
    d_in = x.shape[1]
    sae = build_sae(variant, d_in, d_sae, k, json.loads(hparams), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.activation.init_from_batch_(sae.encode_pre(x), sae.b_enc)
    optimizer = SAEAdam(param_groups(sae), lr=1e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    kwargs = {"k_aux": d_in // 2, "aux_coef": 1 / 32, "grad_clip": 1.0, "sparse": True,
              "autocast": autocast_dtype("auto", x.device)}  # fmt: skip
    return lambda: train_step(sae, optimizer, x, dead, **kwargs)


def grid_hours(runs: list[Run], params: Mapping, step_seconds: Callable[[Run], float],
               batch: int, overhead: float, n_tokens: int | None = None) -> float:  # fmt: skip
    """Hours of the whole grid: per run, its steps x ``step_seconds(run)`` + ``overhead``."""
    total = 0.0
    for r in runs:
        n = n_tokens or int(r.overrides.get("train.n_tokens", params["train"]["n_tokens"]))
        total += (n // batch) * step_seconds(r) + overhead
    return total / 3600


def calibrated(runs: list[Run], params: Mapping, seconds: Mapping, tok_s: Mapping[str, float],
               batch: int) -> Callable[[Run], float]:  # fmt: skip
    """Step seconds of a run: ``batch / tok_s[variant]`` x bench(run's shape) / bench(the
    variant's default shape, params.yaml's k, d_sae and variant_params)."""
    default = {v: shape_of(Run("", (), v, 0, {}), params) for v in tok_s}

    def step(r: Run) -> float:
        shape = shape_of(r, params)
        return batch / tok_s[r.variant] * seconds[shape] / seconds[default[r.variant]]

    return step


def main() -> None:
    parser = step_parser(__doc__, repeats=3, k=False)
    parser.add_argument("--study", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--overhead-seconds", type=float, default=120.0)
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="*",
        default=[],
        help="also the total at these train.n_tokens per SAE",
    )
    parser.add_argument("--tok-s", nargs="*", default=[], metavar="VARIANT=TOK_PER_S",
                        help="train tokens/s per variant at the default shape")  # fmt: skip
    args = parser.parse_args()
    start(args)
    params = yaml.safe_load(open(args.params))
    runs = expand(load_study(args.study))
    shapes = sorted({shape_of(r, params) for r in runs})
    x, _ = inputs(args.batch, args.d_in, 8)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads, batch {args.batch}, d_in {args.d_in}; "
          f"{len(runs)} runs, {len(shapes)} distinct shapes")  # fmt: skip
    began = time.perf_counter()
    seconds = {}
    for shape in shapes:
        seconds[shape] = _median_seconds({"step": step_fn(shape, x)}, args.repeats)["step"]
        print(f"{shape[0]:<10} k {shape[1]:>3} d_sae {shape[2]:>6} {shape[3]:<45} "
              f"{seconds[shape]:.3f} s/step")  # fmt: skip
    step_fns = {"this bench's step times": lambda r: seconds[shape_of(r, params)]}
    if args.tok_s:
        tok_s = {v: float(t) for v, t in (a.split("=") for a in args.tok_s)}
        step_fns["step times calibrated by --tok-s"] = calibrated(
            runs, params, seconds, tok_s, args.batch
        )
    for label, fn in step_fns.items():
        for n_tokens in [None, *args.tokens]:
            hours = grid_hours(runs, params, fn, args.batch, args.overhead_seconds, n_tokens)
            at = "the study's train.n_tokens" if n_tokens is None else f"{n_tokens:,} tokens/SAE"
            print(f"grid total ({label}) at {at}: {hours:.2f} h ({len(runs)} runs, "
                  f"{args.overhead_seconds:.0f} s overhead each)")  # fmt: skip
    print(f"bench wall: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
