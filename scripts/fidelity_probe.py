"""Probe trained SAEs for docs/fidelity.md: train summary, eval-split FVU / L0 / never-fired
fraction, Switch expert load, decoder row norms (in the scaled training units).

Usage: ``python scripts/fidelity_probe.py EVAL_STORE SAE_DIR...`` (one JSON line per SAE). The
eval tokens get the training sink filter (position 0 dropped, norm above ``metadata.max_norm``
dropped). Read-only on the store.
"""

import json
import sys

import torch

from saelab.sae import load_sae
from saelab.store import drop_outliers, iter_batches


def probe(eval_store: str, sae_dir: str) -> dict:
    """One SAE's row of numbers (see the module docstring)."""
    sae = load_sae(sae_dir)
    with open(f"{sae_dir}/cfg.json") as f:
        meta = json.load(f)["metadata"]
    summary = meta.get("train_summary", {})
    batches = iter_batches(eval_store, 4096, exclude_first_position=True)
    err = total = active = 0.0
    n = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    load = torch.zeros(getattr(sae, "n_experts", 1))
    with torch.no_grad():
        for x in drop_outliers(batches, meta.get("max_norm")):
            out = sae.infer(x)
            err += float((x - out.recon).pow(2).sum())
            total += float((x - x.mean(0)).pow(2).sum())
            active += float((out.acts > 0).sum())
            n += len(x)
            fired |= (out.acts > 0).any(0)
            if hasattr(sae, "route"):
                load += torch.bincount(sae.route(x)[1], minlength=sae.n_experts)
    keys = ("fvu", "l0", "dead_fraction", "inference_fvu_train", "inference_l0_train")
    row = {"sae": sae_dir, **{f"train_{k}": summary.get(k) for k in keys}}
    row |= {"tokens_per_s": summary.get("tokens_per_s"), "threshold": summary.get("threshold")}
    row |= {"eval_fvu": err / total, "eval_l0": active / n}
    row["eval_never_fired"] = 1.0 - float(fired.float().mean())
    norms = sae.W_dec.norm(dim=1) * summary.get("input_scale", 1.0)  # undo the folding
    row["decoder_norm_mean_min_max"] = [
        round(float(v), 4) for v in (norms.mean(), norms.min(), norms.max())
    ]
    if hasattr(sae, "route"):
        share = load / load.sum()
        row["expert_load"] = [round(v, 4) for v in share.tolist()]
        row["expert_load_max_min"] = [round(float(share.max()), 4), round(float(share.min()), 4)]
    return row


if __name__ == "__main__":
    torch.set_num_threads(1)
    for directory in sys.argv[2:]:
        sys.stdout.write(json.dumps(probe(sys.argv[1], directory)) + "\n")
