"""Real-data round trip: the trained SAEs exported and run in the real SAELens and sparsify.

Exports each SAE of ``--models`` (``saelab export``'s code, params' ``export.hub_id``), takes
the first ``--n-ctx`` contexts of the eval activations, runs scripts/interop_check.py in
``.venv-interop`` (scripts/setup_interop.sh) on the tokens our metrics use (position 0 and
sinks above ``max_norm`` dropped) and on the whole contexts (the sink-rule splice), and prints,
per variant and library: tokens whose active latents differ (a pre-activation rounding across
its rule's boundary), ``||x̂_lib − x̂_ours|| / ||x̂_ours||`` over all tokens, the largest
per-token relative difference on the other tokens, the same for the splice, and the metadata
fields SAELens kept.

Run: ``python bench/interop.py --models models --activations data/activations/eval
[--n-ctx 256] [--out /tmp/interop]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from saelab.capture import splice_fn
from saelab.config import load_params
from saelab.export import export_dir
from saelab.sae import load_sae
from saelab.store import ActivationStore

REPO = Path(__file__).resolve().parents[1]
SAELENS = ("topk", "batchtopk", "jumprelu", "relu", "sampled")


def _row_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)


def _compare(name: str, acts, recon, want_acts, want_recon) -> dict:
    same = ((acts > 0) == (want_acts > 0)).all(-1)
    rel = _row_rel(recon, want_recon)
    return {
        "export": name,
        "tokens": int(same.numel()),
        "tokens_support_differs": int((~same).sum()),
        "recon_rel_all": float((recon - want_recon).norm() / want_recon.norm()),
        "recon_max_token_rel_same_support": float(rel[same].max()),
        "recon_max_token_rel": float(rel.max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--activations", type=Path, default=REPO / "data/activations/eval")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("/tmp/saelab-interop"))
    args = ap.parse_args()
    cfg = load_params(args.params)
    for v in SAELENS:
        export_dir(args.models / v, args.out / "saelens" / v, cfg)
    export_dir(args.models / "topk", args.out / "sparsify" / "topk", cfg, fmt="sparsify")
    store = ActivationStore(args.activations)
    resid = store.read(0, args.n_ctx * store.ctx_len).reshape(args.n_ctx, store.ctx_len, -1)
    saes = {v: load_sae(args.models / v) for v in SAELENS}
    max_norm = saes["topk"].metadata["max_norm"]
    tail = resid[:, 1:].reshape(-1, resid.shape[-1])
    x = tail[tail.norm(dim=-1) <= max_norm].contiguous()
    save_file({"x": x, "resid": resid.contiguous()}, str(args.out / "inputs.safetensors"))
    cmd = [str(REPO / ".venv-interop/bin/python"), str(REPO / "scripts/interop_check.py"),
           "--saelens", *[str(args.out / "saelens" / v) for v in SAELENS],
           "--sparsify", str(args.out / "sparsify" / "topk"),
           "--inputs", str(args.out / "inputs.safetensors"), "--saelab-src", str(REPO / "src"),
           "--out", str(args.out / "result")]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = load_file(str(args.out / "result/outputs.safetensors"))
    report = json.loads((args.out / "result/report.json").read_text())
    rows = []
    with torch.no_grad():
        for v, sae in saes.items():
            want = sae.infer(x)
            row = _compare(f"saelens/{v}", out[f"saelens/{v}/acts"], out[f"saelens/{v}/recon"],
                           want.acts, want.recon)  # fmt: skip
            recon = lambda t, s=sae: s.infer(t).recon  # noqa: E731
            spliced = splice_fn(recon, True, sae.metadata["max_norm"])(resid)
            row["spliced_rel_all"] = float(
                (out[f"saelens/{v}/spliced"] - spliced).norm() / spliced.norm()
            )
            row["metadata_kept"] = sorted(report["saelens"][v]["metadata"])
            rows.append(row)
        want = saes["topk"](x)
        rows.append(_compare("sparsify/topk", out["sparsify/topk/acts"],
                             out["sparsify/topk/recon"], want.acts, want.recon))  # fmt: skip
    json.dump({"versions": report["versions"], "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
