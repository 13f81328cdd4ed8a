"""Benchmark and check: the LM in bf16 against the LM in float32 (issue 17, ``model.dtype: auto``).

On the real model of params.yaml, the first eval contexts of a token group, and a trained SAE:
(0) the bf16 truncated forward at batch 16 against 2 × 8 (how far another GEMM blocking moves
bf16 activations: the baseline's cache check must allow it); (1) the activations at the
hookpoint of the bf16 LM against the fp32 LM's (relative L2 error per token, tokens the pipeline
reconstructs and spared ones apart), and the SAE's FVU on each; (2) the clean CE per context of
the full forward, bf16 - fp32, with a paired bootstrap interval over contexts; (3) the SAE's
spliced ΔCE (spliced CE - clean CE, each precision from its own activations, as a pipeline in
that precision computes it), bf16 - fp32 paired, and the ΔCE of a mixed pipeline (bf16 spliced
CE - fp32 clean CE), which ``check_provenance`` refuses. Speed: tokens/s of the truncated
forward, the full forward and the suffix, fp32 and bf16 interleaved batch by batch, as wall
and process-CPU ratios (on a shared machine a job is starved for seconds at a time).
The bf16 LM is the fp32-loaded one cast to bf16 (what loading in bf16 gives: both round the
dequantised weights to nearest). Results are written after every batch to ``--out`` (JSON), so
an interrupted run keeps what it measured.
Run: ``python bench/lm_dtype.py --tokens data/tokens --store data/activations/eval
--sae models/topk [--n-act 64 --n-ce 128]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from saelab.baseline import read_contexts, spared_mask, token_losses  # noqa: E402
from saelab.capture import capture_resid, load_model  # noqa: E402
from saelab.config import load_params  # noqa: E402
from saelab.data import read_tokens  # noqa: E402
from saelab.evaluate import reconstruction_metrics  # noqa: E402
from saelab.sae import load_sae  # noqa: E402
from saelab.splice import clean_forward, run_suffix  # noqa: E402
from saelab.store import ActivationStore  # noqa: E402

DTYPES = ("float32", "bfloat16")


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||a - ref|| / ||ref|| per token: [..., d_in] -> [...]."""
    return (a - ref).norm(dim=-1) / ref.norm(dim=-1)


def paired(diff: np.ndarray, rng: np.random.Generator) -> dict:
    """Mean of per-context differences with a 95% bootstrap interval over contexts."""
    boot = diff[rng.integers(0, len(diff), (10000, len(diff)))].mean(1)
    return {"n": len(diff), "mean": float(diff.mean()),
            "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
            "max_abs": float(np.abs(diff).max())}  # fmt: skip


class Timer:
    """Wall and process-CPU seconds per key."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(DTYPES, 0.0)
        self.cpu = dict.fromkeys(DTYPES, 0.0)

    def run(self, key: str, fn, *args):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        self.wall[key] += time.perf_counter() - w
        self.cpu[key] += time.process_time() - c
        return out

    def rates(self, n_tokens: int) -> dict:
        return {"wall_tok_s": {k: n_tokens / v for k, v in self.wall.items()},
                "bf16_over_fp32_wall": self.wall["float32"] / self.wall["bfloat16"],
                "bf16_over_fp32_cpu": self.cpu["float32"] / self.cpu["bfloat16"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--store", required=True, help="the float32 eval store made by the fp32 LM")
    ap.add_argument("--sae", required=True)
    ap.add_argument("--n-act", type=int, default=64)
    ap.add_argument("--n-ce", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="lm_dtype.json")
    args = ap.parse_args()
    cfg = load_params(args.params)
    fp32 = load_model(cfg.model.model_copy(update={"dtype": "float32"}), torch.device("cpu"))
    models = {"float32": fp32, "bfloat16": copy.deepcopy(fp32).to(torch.bfloat16)}
    n_max = max(args.n_act, args.n_ce, 16)
    ids_all = torch.from_numpy(read_tokens(args.tokens, "eval")[:n_max].astype(np.int64))
    sae = load_sae(args.sae).eval()
    start = 1 if cfg.sae.exclude_first_position else 0
    res: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
                 "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    out = Path(args.out)

    def dump() -> None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
        print(json.dumps(res), flush=True)

    with torch.inference_mode():
        batch_invariance(models, cfg, ids_all[:16], res)
        dump()
        activations(models, cfg, ids_all[: args.n_act], args.batch, sae, args.store, res, dump)
        losses(models, cfg, ids_all[: args.n_ce], args.batch, sae, start, res, dump)


def batch_invariance(models: dict, cfg, ids: torch.Tensor, res: dict) -> None:
    for d, m in models.items():
        a16 = capture_resid(m, cfg.model, ids).float()
        a8 = torch.cat([capture_resid(m, cfg.model, ids[i : i + 8]).float() for i in (0, 8)])
        res.setdefault("batch16_vs_8_rel_l2_max", {})[d] = rel_l2(a16, a8).max().item()


def activations(models, cfg, ids_all, batch, sae, store_path, res, dump) -> None:
    max_norm, excl = sae.metadata["max_norm"], cfg.sae.exclude_first_position
    acts: dict = {d: [] for d in models}
    timer = Timer()
    store = ActivationStore(store_path)
    for i in range(0, len(ids_all), batch):
        ids = ids_all[i : i + batch]
        for d, m in models.items():
            acts[d].append(timer.run(d, capture_resid, m, cfg.model, ids).float())
        fp, bf = torch.cat(acts["float32"]), torch.cat(acts["bfloat16"])
        spared = spared_mask(fp, excl, max_norm)
        rel = rel_l2(bf, fp)
        kept = rel[~spared]
        res["activations"] = {
            "n_ctx": len(fp), "kept_tokens": int(kept.numel()), "mean": kept.mean().item(),
            "median": kept.median().item(), "p99": kept.quantile(0.99).item(),
            "max": kept.max().item(), "spared_mean": rel[spared].mean().item(),
            "spared_max": rel[spared].max().item(),
            "fp32_vs_store_max": rel_l2(read_contexts(store, 0, len(fp)), fp).max().item(),
            "bf16_rounding_of_fp32_mean": rel_l2(fp.bfloat16().float(), fp)[~spared].mean().item(),
            "sae_fvu": {d: reconstruction_metrics(sae, [a[~spared]])["fvu"]
                        for d, a in (("float32", fp), ("bfloat16", bf))},
        }  # fmt: skip
        res["truncated_forward"] = timer.rates(fp.shape[0] * fp.shape[1])
        dump()


def losses(models, cfg, ids_all, batch, sae, start, res, dump) -> None:
    max_norm, excl = sae.metadata["max_norm"], cfg.sae.exclude_first_position
    ce: dict = {f"{k}_{d}": [] for k in ("clean", "spliced") for d in models}
    full, suffix_timer, rng = Timer(), Timer(), np.random.default_rng(0)
    for i in range(0, len(ids_all), batch):
        ids = ids_all[i : i + batch]
        for d, m in models.items():
            logits, suffix = full.run(d, clean_forward, m, cfg.model, ids)
            ce[f"clean_{d}"].append(token_losses(logits, ids, start)[0].mean(-1).double())
            x = suffix.resid.float()
            use = ~spared_mask(x, excl, max_norm)
            spliced = x.clone()
            spliced[use] = sae.infer(x[use]).recon
            logits = suffix_timer.run(d, run_suffix, suffix, spliced.to(suffix.resid.dtype))
            ce[f"spliced_{d}"].append(token_losses(logits, ids, start)[0].mean(-1).double())
        c = {k: torch.cat(v).numpy() for k, v in ce.items()}
        dce = {d: c[f"spliced_{d}"] - c[f"clean_{d}"] for d in models}
        n_tokens = len(c["clean_float32"]) * ids.shape[1]
        res["ce"] = {
            "n_ctx": len(c["clean_float32"]),
            "clean": {d: float(c[f"clean_{d}"].mean()) for d in models},
            "clean_bf16_minus_fp32": paired(c["clean_bfloat16"] - c["clean_float32"], rng),
            "delta_ce": {d: float(v.mean()) for d, v in dce.items()},
            "delta_ce_bf16_minus_fp32": paired(dce["bfloat16"] - dce["float32"], rng),
            "mixed_minus_fp32_delta_ce": paired(
                c["spliced_bfloat16"] - c["clean_float32"] - dce["float32"], rng
            ),
        }
        res["full_forward"] = full.rates(n_tokens)
        res["suffix"] = suffix_timer.rates(n_tokens)
        dump()


if __name__ == "__main__":
    main()
