"""Benchmark: peak resident memory of caching and of training as the corpus grows (issue 5).

Each measurement runs in a fresh subprocess (this script with ``--child``), at 1x, 2x, 4x ... the
base size, and reports three numbers read from ``/proc/self/status``:

- ``setup``: peak RSS (VmHWM) while loading (the LM; the SAE and Adam), before any data flows;
- ``work``: peak RSS of the data phase alone (VmHWM reset through ``/proc/self/clear_refs``
  after setup), i.e. what grows, if anything, with the corpus;
- ``process``: the child's whole-life peak, max(setup, work).

The children set host memory as the ``saelab`` CLI does (:func:`saelab.allocator.keep_freed_memory`:
freed memory is kept, not returned), or glibc's defaults with ``--malloc default``.

Cache path: ``read_tokens`` of the whole train split + :func:`saelab.cache.cache_split` over
``scale x --cache-contexts`` contexts with the real model; ``--chunk-tokens`` (default one
forward batch) stands in for ``cache.chunk_tokens`` so that several chunks are written at every
size (at 65,536 the chunk buffer is a constant 65,536 x 576 x 2 B = 75.5 MB more).

Training data path: a store ``scale`` times the real one, made of its chunk files repeated
(symlinks, nothing copied), read as ``saelab train`` does (``median_norm``, ``ShuffledBatches``,
``drop_outliers``) for the same ``--train-batches`` batches at every size, with one
``train_step`` of a TopK SAE (d_sae 4608, k 32) on the first and the last batch. Run::

    python bench/memory.py --tokens /work/main/data/tokens \
        --store /work/main/data/activations/train [--scales 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def child_cache(args: argparse.Namespace) -> dict[str, float]:
    """Cache ``args.scale * args.cache_contexts`` contexts with the real model; peaks in MiB."""
    import torch

    from saelab.allocator import keep_freed_memory
    from saelab.cache import cache_split
    from saelab.capture import load_model
    from saelab.config import load_params
    from saelab.data import read_tokens

    torch.set_num_threads(args.threads)
    keep_freed_memory(args.malloc == "kept")
    cfg = load_params(args.params)
    cfg = cfg.model_copy(
        update={"cache": cfg.cache.model_copy(update={"chunk_tokens": args.chunk_tokens})}
    )
    model = load_model(cfg.model, torch.device("cpu"))
    setup = _status_kib("VmHWM")
    _reset_peak()
    contexts = read_tokens(args.tokens, "train")  # the whole split, as the cache stage reads it
    with tempfile.TemporaryDirectory() as tmp:
        n_ctx = args.scale * args.cache_contexts
        cache_split(model, cfg, contexts[:n_ctx], Path(tmp) / "acts", source="bench")
    return {"tokens": n_ctx * contexts.shape[1], "setup": setup / 1024,
            "work": _status_kib("VmHWM") / 1024}  # fmt: skip


def child_train(args: argparse.Namespace) -> dict[str, float]:
    """Read ``args.train_batches`` training batches from ``args.store`` as ``saelab train`` does,
    with a TopK train_step on the first and the last; peaks in MiB."""
    import torch

    from saelab.allocator import keep_freed_memory
    from saelab.optim import SAEAdam
    from saelab.sae import build_sae
    from saelab.store import ShuffledBatches, drop_outliers, median_norm
    from saelab.train import param_groups, train_step

    torch.set_num_threads(args.threads)
    keep_freed_memory(args.malloc == "kept")
    gen = torch.Generator().manual_seed(0)
    sae = build_sae("topk", 576, 4608, 32, {}, gen)
    optimizer = SAEAdam(param_groups(sae), lr=1e-4)  # the trainer's
    dead = torch.zeros(4608, dtype=torch.bool)
    setup = _status_kib("VmHWM")
    _reset_peak()
    max_norm = 10.0 * median_norm(args.store, 65536, exclude_first_position=True)
    reader = ShuffledBatches(args.store, 4096, exclude_first_position=True,
                             shuffle_chunks=args.shuffle_chunks, seed=0)  # fmt: skip
    for i, x in zip(range(args.train_batches), drop_outliers(reader, max_norm), strict=False):
        if i in (0, args.train_batches - 1):
            train_step(sae, optimizer, x, dead, k_aux=288, aux_coef=1 / 32, grad_clip=1.0)
    return {"tokens": reader.store.n_tokens, "setup": setup / 1024,
            "work": _status_kib("VmHWM") / 1024}  # fmt: skip


def scaled_store(src: Path, scale: int, out: Path) -> Path:
    """A zarr store ``scale`` times as long as ``src``: its metadata with the shape and
    ``n_tokens`` multiplied, and chunk ``i`` a symlink to ``src``'s chunk ``i % n_chunks``."""
    meta = json.loads((src / "zarr.json").read_text())
    n_src = len(list((src / "c").iterdir()))
    n_tokens = meta["shape"][0] * scale
    if meta["shape"][0] % meta["chunk_grid"]["configuration"]["chunk_shape"][0]:
        raise ValueError(f"{src}: the last chunk is partial; cannot repeat it")
    meta["shape"][0] = meta["attributes"]["n_tokens"] = n_tokens
    out.mkdir(parents=True)
    (out / "zarr.json").write_text(json.dumps(meta))
    for i in range(n_src * scale):
        (out / "c" / str(i)).mkdir(parents=True)
        (out / "c" / str(i) / "0").symlink_to((src / "c" / str(i % n_src) / "0").resolve())
    return out


def run_child(argv: list[str]) -> dict[str, float]:
    """Run this script as a child and return its JSON result plus ``process``, the child's
    whole-life peak: max(setup, work) (``ru_maxrss`` cannot serve: ``clear_refs`` resets it)."""
    proc = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    return {**result, "process": max(result["setup"], result["work"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens"))
    parser.add_argument("--store", type=Path, default=Path("data/activations/train"))
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-contexts", type=int, default=32, help="contexts at 1x")
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    parser.add_argument("--train-batches", type=int, default=256)
    parser.add_argument("--shuffle-chunks", type=int, default=8)
    parser.add_argument(
        "--malloc", choices=["kept", "default"], default="kept",
        help="kept: keep_freed_memory(), as the saelab CLI; default: glibc's",
    )  # fmt: skip
    parser.add_argument("--only", choices=["cache", "train"], default=None)
    parser.add_argument("--child", choices=["cache", "train"], default=None)
    parser.add_argument("--scale", type=int, default=1)
    args = parser.parse_args()
    if args.child:
        result = (child_cache if args.child == "cache" else child_train)(args)
        print(json.dumps(result))
        return

    common = ["--params", str(args.params), "--tokens", str(args.tokens),
              "--threads", str(args.threads), "--cache-contexts", str(args.cache_contexts),
              "--chunk-tokens", str(args.chunk_tokens), "--train-batches",
              str(args.train_batches), "--shuffle-chunks", str(args.shuffle_chunks),
              "--malloc", args.malloc]  # fmt: skip
    header = f"{'path':<6} {'scale':>5} {'tokens':>10} {'setup MiB':>10} {'work MiB':>9} " \
             f"{'process MiB':>12}"  # fmt: skip
    print(f"peak RSS per corpus size (work: the data phase alone, after setup); "
          f"cache chunk_tokens {args.chunk_tokens}, train shuffle_chunks {args.shuffle_chunks}, "
          f"{args.train_batches} batches of 4096")  # fmt: skip
    print(header)
    for path in ["cache", "train"] if args.only is None else [args.only]:
        with tempfile.TemporaryDirectory() as tmp:
            for scale in args.scales:
                extra = ["--child", path, "--scale", str(scale)]
                if path == "train":
                    store = scaled_store(args.store, scale, Path(tmp) / f"x{scale}")
                    extra += ["--store", str(store)]
                r = run_child(common + extra)
                print(f"{path:<6} {scale:>5} {r['tokens']:>10,} {r['setup']:>10,.0f} "
                      f"{r['work']:>9,.0f} {r['process']:>12,.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
