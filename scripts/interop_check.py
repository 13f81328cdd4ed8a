"""Run saelab exports in the real SAELens and sparsify (run by `.venv-interop/bin/python`).

Not part of saelab: it imports sae_lens and sparsify, which live only in the separate virtual
environment made by scripts/setup_interop.sh, and from saelab only saelab.sink_rule (torch
alone), through --saelab-src. tests/test_interop.py runs it and compares the outputs with
saelab's own; by hand:

    .venv-interop/bin/python scripts/interop_check.py --saelens exports/topk ... \
        --inputs x.safetensors --saelab-src src --out result

Inputs (safetensors): ``x`` [n, d_in] float32 tokens, ``resid`` [batch, seq, d_in] float32
activations of whole contexts (for the sink-rule splice). Writes ``<out>/outputs.safetensors``
(``<lib>/<name>/acts`` [n, d_sae], ``<lib>/<name>/recon`` [n, d_in], ``<lib>/<name>/forward``
[n, d_in] = the library's own forward, ``saelens/<name>/spliced`` [batch, seq, d_in]; ``<lib>``
``saelens`` or ``sparsify``, ``<name>`` the export directory's name) and
``<out>/report.json`` (versions; per export: the class loaded, its architecture, and the
metadata as loaded).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _saelens(path: Path, x: torch.Tensor, resid: torch.Tensor, out: dict) -> dict:
    from sae_lens import SAE

    from saelab.sink_rule import saelens_hook

    sae = SAE.load_from_disk(str(path), device="cpu")
    sae.eval()
    with torch.no_grad():
        acts = sae.encode(x)
        out[f"saelens/{path.name}/acts"] = acts
        out[f"saelens/{path.name}/recon"] = sae.decode(acts)
        out[f"saelens/{path.name}/forward"] = sae(x)
        out[f"saelens/{path.name}/spliced"] = saelens_hook(sae)(resid, None)
    return {
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "metadata": sae.cfg.metadata.to_dict(),
    }


def _sparsify(path: Path, x: torch.Tensor, out: dict) -> dict:
    from sparsify import SparseCoder

    (hook_dir,) = [p for p in path.iterdir() if p.is_dir()]
    sae = SparseCoder.load_from_disk(hook_dir, device="cpu")
    with torch.no_grad():
        enc = sae.encode(x)
        dense = torch.zeros(x.shape[0], sae.num_latents).scatter_(
            -1, enc.top_indices, enc.top_acts.float()
        )
        out[f"sparsify/{path.name}/acts"] = dense
        out[f"sparsify/{path.name}/recon"] = sae.decode(enc.top_acts, enc.top_indices)
        out[f"sparsify/{path.name}/forward"] = sae(x).sae_out
    return {"class": type(sae).__name__, "hookpoint": hook_dir.name, "k": sae.cfg.k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saelens", nargs="*", default=[], type=Path, help="SAELens export dirs")
    ap.add_argument("--sparsify", nargs="*", default=[], type=Path, help="sparsify export dirs")
    ap.add_argument("--inputs", required=True, type=Path)
    ap.add_argument("--saelab-src", required=True, type=Path, help="saelab's src/ folder")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(args.saelab_src))
    torch.manual_seed(0)
    inputs = load_file(str(args.inputs))
    out: dict[str, torch.Tensor] = {}
    report = {
        "versions": {p: version(p) for p in ("sae-lens", "eai-sparsify", "torch")},
        "saelens": {p.name: _saelens(p, inputs["x"], inputs["resid"], out) for p in args.saelens},
        "sparsify": {p.name: _sparsify(p, inputs["x"], out) for p in args.sparsify},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.float().contiguous() for k, v in out.items()}, str(args.out / "outputs.safetensors")
    )
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
