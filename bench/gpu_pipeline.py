"""A short pipeline in bf16: prepare -> cache -> train (topk, batchtopk) -> baseline ->
evaluate, through the ``saelab`` stage commands (not DVC), on the GPU or, for ``--tiny``, on a
random 4-layer Llama (d_model 64) on any device.

The params are ``params.yaml``'s with the model and the SAE's matmuls in bfloat16
(``model.dtype``, ``train.autocast``), ``--device`` for both, one corpus source, and token
counts cut so that it takes about a minute on a GPU (the real SmolLM2-135M from
``../shared/data``; ``--shared`` names another copy). Prints each stage's seconds and each
variant's FVU, L0 and ΔCE; exits non-zero when a stage fails or a metric is not finite.

Run: ``python bench/gpu_pipeline.py --out /tmp/gpu-pipeline [--device cuda] [--tiny]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("topk", "batchtopk")


def _tiny_model(shared: Path, out: Path) -> Path:
    """A random 4-layer Llama with SmolLM2's tokenizer (tests/conftest.py's)."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.conftest import _save_tiny

    out.mkdir(parents=True, exist_ok=True)
    return _save_tiny("llama", out)


def _corpus(shared: Path, out: Path, tiny: bool) -> list[str]:
    """wikitext-2 from ``shared`` (its first 4 files, cut to 20 kB each, for ``tiny``)."""
    source = shared / "data" / "corpus" / "wikitext-2"
    if not tiny:
        return [str(source)]
    target = out / "corpus" / "wikitext-2"
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir())[:4]:
        (target / path.name).write_bytes(path.read_bytes()[:20000])
    return [str(target)]


def params_for(args: argparse.Namespace, out: Path) -> dict:
    """params.yaml, cut to a short bf16 run on ``args.device``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["variants"] = list(VARIANTS)
    params["data"]["corpus_dirs"] = _corpus(args.shared, out, args.tiny)
    params["model"].update(dtype="bfloat16", device=args.device)
    params["train"].update(device=args.device, autocast="bfloat16", checkpoint_every=0)
    params["tracking"]["tracking_uri"] = f"sqlite:///{out / 'mlflow.db'}"
    params["evaluate"].update(n_ctx=16, n_bootstrap=100)
    if args.tiny:
        model = _tiny_model(args.shared, out / "model")
        params["k"] = 8
        params["data"]["ctx_len"] = 32
        params["model"].update(name_or_path=str(model), gguf_file=None,
                               hookpoint="blocks.2.hook_resid_pre")  # fmt: skip
        params["cache"].update(max_train_tokens=4096, max_eval_tokens=1024, chunk_tokens=1024)
        params["sae"]["d_sae"] = 128
        params["train"].update(n_tokens=4096, batch_size=256, scale_tokens=512, dead_tokens=2048,
                               k_aux=32, warmup_steps=2, log_every=4)  # fmt: skip
    else:
        model = args.shared / "data" / "models" / "smollm2-135m-instruct"
        params["model"]["name_or_path"] = str(model)
        params["cache"].update(max_train_tokens=131072, max_eval_tokens=16384)
        params["train"].update(n_tokens=262144)  # 64 steps of 4,096 tokens
    return params


def _stage(name: str, *argv: str) -> float:
    from saelab.cli import main

    start = time.perf_counter()
    main(list(argv))
    seconds = time.perf_counter() - start
    print(f"  {name}: {seconds:.1f} s", flush=True)
    return seconds


def run(args: argparse.Namespace) -> dict[str, dict]:
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    params = out / "params.yaml"
    params.write_text(yaml.safe_dump(params_for(args, out), sort_keys=False))
    os.chdir(out)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        os.environ.pop(var, None)
    p = ("--params", str(params))
    _stage("prepare", "prepare", *p, "--out", "data/tokens")
    _stage("cache", "cache", *p, "--tokens", "data/tokens", "--out", "data/activations")
    for v in VARIANTS:
        _stage(f"train {v}", "train", *p, "--variant", v, "--activations", "data/activations",
               "--out", f"models/{v}")  # fmt: skip
    _stage("baseline", "baseline", *p, "--tokens", "data/tokens", "--activations",
           "data/activations", "--out", "data/baseline")  # fmt: skip
    metrics = {}
    for v in VARIANTS:
        outs = ("--out", f"metrics/{v}.json", "--hist", f"plots/hist/{v}.json",
                "--per-context", f"data/per_context/{v}.npz")  # fmt: skip
        _stage(f"evaluate {v}", "evaluate", *p, "--variant", v, "--tokens", "data/tokens",
               "--activations", "data/activations", "--baseline", "data/baseline",
               "--sae", f"models/{v}", *outs)  # fmt: skip
        metrics[v] = json.loads(Path(f"metrics/{v}.json").read_text())
    return metrics


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = parser.parse_args()
    args.shared = args.shared.resolve()
    metrics = run(args)
    bad = False
    for variant, m in metrics.items():
        flat = _flat(m)
        wanted = {key: flat.get(key) for key in flat if key.split(".")[-1] in
                  ("fvu", "l0", "delta_ce") and "ci" not in key}  # fmt: skip
        print(f"  {variant}: " + ", ".join(f"{k}={v:.4g}" for k, v in wanted.items()
                                           if isinstance(v, float)))  # fmt: skip
        bad |= not wanted or any(isinstance(v, float) and not math.isfinite(v)
                                 for v in wanted.values())  # fmt: skip
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
