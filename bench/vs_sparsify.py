"""Benchmark: saelab's TopK training step against EleutherAI sparsify's, side by side.

sparsify is not a dependency of saelab; this script loads its sources from ``--sparsify-path``
(a directory holding the ``sparsify`` package, e.g. the unpacked ``eai-sparsify`` wheel) and
``--deps-path`` (its pure-Python imports: ``simple_parsing einops natsort docstring-parser
schedulefree``), without running ``sparsify/__init__`` (which imports its trainer's datasets
stack). Getting them, with the project's torch untouched::

    pip download eai-sparsify --no-deps -d /tmp/sp && unzip -q /tmp/sp/*.whl -d /tmp/sp/src
    pip install --no-deps --target /tmp/sp/deps simple_parsing einops natsort \
        docstring-parser schedulefree

sparsify's default step (its trainer, ``loss_fn: fvu``, ``optimizer: signum``, no dead latents
yet): decoder rows to unit norm, ``SparseCoder.forward`` (fused encoder with sparse encoder
gradient, eager ``embedding_bag`` decoder on CPU), FVU backward, gradient parallel to the decoder
rows removed, ``ScheduleFreeWrapper(SignSGD, momentum=0.95)`` step, zero_grad. Ours:
``saelab.train.train_step`` as the trainer runs it (sparse path, SAEAdam, AuxK off with no dead
latents, ``train.autocast: auto``). Both are timed interleaved with one fp32 encoder GEMM of the
same shape, median of ``--repeats``; printed: each step / GEMM and sparsify / saelab.

Run: ``python bench/vs_sparsify.py --sparsify-path /tmp/sp/src --deps-path /tmp/sp/deps``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from train_step import _median_seconds, _step_fn, inputs, start, step_parser

from saelab.train import autocast_dtype


def _import_sparsify(src: Path, deps: Path) -> types.ModuleType:
    """``sparsify.sparse_coder`` from ``src`` without executing ``sparsify/__init__``."""
    sys.path.insert(0, str(deps))
    package = types.ModuleType("sparsify")
    package.__path__ = [str(src / "sparsify")]
    sys.modules["sparsify"] = package
    import sparsify.sparse_coder  # noqa: PLC0415 (after the package stub)

    return sparsify.sparse_coder


def _sparsify_step_fn(sc: types.ModuleType, d_in: int, d_sae: int, k: int, x: torch.Tensor):
    """A closure running sparsify's default training step (module docstring) on ``x``."""
    from schedulefree import ScheduleFreeWrapper  # noqa: PLC0415
    from sparsify.config import SparseCoderConfig  # noqa: PLC0415
    from sparsify.sign_sgd import SignSGD  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = SparseCoderConfig(num_latents=d_sae, k=k)
    sae = sc.SparseCoder(d_in, cfg, device="cpu", dtype=torch.float32)
    lr = 5e-3 / (d_sae / 2**14) ** 0.5  # sparsify's default for signum
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": lr}]),
                                    momentum=0.95)  # fmt: skip
    optimizer.train()

    def step() -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = step_parser(__doc__, repeats=3)
    parser.add_argument("--sparsify-path", type=Path, required=True)
    parser.add_argument("--deps-path", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=["768x16384", "576x4608"])
    args = parser.parse_args()
    start(args)  # sparsify's step gets the allocator setting too
    sc = _import_sparsify(args.sparsify_path, args.deps_path)
    precision = autocast_dtype("auto", torch.device("cpu")) or torch.float32
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, k {args.k}, "
          f"saelab default precision here: {precision}")  # fmt: skip
    print(f"{'d_in':>5} {'d_sae':>6} {'GEMM s':>7} {'sparsify/GEMM':>14} {'saelab/GEMM':>12} "
          f"{'sparsify/saelab':>16}")  # fmt: skip
    for shape in args.shapes:
        d_in, d_sae = (int(v) for v in shape.split("x"))
        x, W = inputs(args.batch, d_in, d_sae)
        t = _median_seconds({
            "gemm": lambda x=x, W=W: x @ W,
            "sparsify": _sparsify_step_fn(sc, d_in, d_sae, args.k, x),
            "saelab": _step_fn("topk", d_in, d_sae, args.k, x, 0.0, True),
        }, args.repeats)  # fmt: skip
        print(f"{d_in:>5} {d_sae:>6} {t['gemm']:>7.3f} {t['sparsify'] / t['gemm']:>14.2f} "
              f"{t['saelab'] / t['gemm']:>12.2f} {t['sparsify'] / t['saelab']:>16.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
