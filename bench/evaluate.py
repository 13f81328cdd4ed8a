"""Benchmark: spliced evaluation, cost per SAE as a ratio to one full forward of the model.

Spliced CE/KL replaces the activation at the hookpoint and needs the logits after it. The old way
(``hook_resid``) runs a full forward per replacement; the new way (``saelab.splice``) records the
suffix during the clean pass and runs only the layers after the hookpoint, the final norm and the
LM head (issue 5). This script loads the real model of params.yaml, packs real corpus text into
one context batch, and times side by side in one process, interleaved (median of ``--repeats``):
one full forward, the old per-SAE cost (a full forward with the SAE hooked in), the new per-SAE
cost (the suffix on the spliced residual stream) and the clean pass that records the suffix; then
the whole ``downstream_metrics`` of one batch (clean + spliced + zero + mean ablation), old loop
vs new. The SAE is a freshly initialised TopK of params.yaml's size: its cost is the same either
way. Ratios are given for wall time and for the process's CPU time (``time.process_time``, all
threads; OpenMP threads wait passively so that idle spinning is not counted): on a shared machine
a job is starved for seconds at a time, which moves wall-time ratios far more than CPU-time ones.
Run: ``python bench/evaluate.py [--threads 2]``. The ``cached`` row is the
evaluate stage's per-SAE work since the baseline stage (issue 12): target ≤ 1 full forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # downstream_metrics' progress bar
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads OpenMP

import torch  # noqa: E402

from saelab.baseline import clean_kl_terms, kl_from_terms, linear_head, token_ce  # noqa: E402
from saelab.capture import decoder_layers, hook_resid, load_model, load_tokenizer, splice_fn  # noqa: E402
from saelab.config import load_params, replace  # noqa: E402
from saelab.data import pack_contexts, read_corpus  # noqa: E402
from saelab.evaluate import _token_losses, downstream_metrics  # noqa: E402
from saelab.sae import build_sae  # noqa: E402
from saelab.splice import SuffixRunner, clean_forward, run_suffix  # noqa: E402


@torch.inference_mode()
def old_downstream(model, model_cfg, replace, ids, mean_act) -> dict[str, float]:
    """The previous ``downstream_metrics`` loop for one batch: a clean forward, then one full
    forward per replacement with ``hook_resid``. Returns the per-token CE means and KL."""
    replacements = {
        "ce_spliced": replace,
        "ce_zero_ablated": torch.zeros_like,
        "ce_mean_ablated": lambda x: mean_act.to(x).expand_as(x),
    }
    ce_clean, logp_clean = _token_losses(model(input_ids=ids).logits, ids, 1)
    out = {"ce_clean": ce_clean.mean().item()}
    for key, fn in replacements.items():
        with hook_resid(model, model_cfg, splice_fn(fn, True)):
            ce, logp = _token_losses(model(input_ids=ids).logits, ids, 1)
        out[key] = ce.mean().item()
        if key == "ce_spliced":
            out["kl_div"] = (logp_clean.exp() * (logp_clean - logp)).sum().item() / ce.numel()
    return out


LABELS = {
    "full": "full forward",
    "clean": "clean pass recording the suffix",
    "old": "per-SAE spliced, old (full + hook)",
    "new": "per-SAE spliced, new (suffix)",
    "old_whole": "downstream_metrics batch, old",
    "new_whole": "downstream_metrics batch, new",
    "cached_head": "per-SAE, baseline + clean LM head",
    "cached": "per-SAE, baseline KL terms (stage)",
}


def _seconds(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call of ``fn``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hookpoint", default="blocks.15.hook_resid_pre")
    parser.add_argument("--corpus", default="../shared/data/corpus/wikitext-2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    model_cfg = replace(cfg.model, hookpoint=args.hookpoint, device="cpu")
    model = load_model(model_cfg, torch.device("cpu"))
    docs = read_corpus([Path(args.corpus)])[:40]
    contexts = pack_contexts(docs, load_tokenizer(model_cfg), args.ctx_len)[: args.batch]
    ids = torch.from_numpy(contexts.astype("int64"))  # [batch, ctx_len]
    d_in = model.config.get_text_config().hidden_size
    gen = torch.Generator().manual_seed(0)
    sae = build_sae("topk", d_in, cfg.sae.d_sae, cfg.k, {}, gen).eval()
    splice = splice_fn(lambda x: sae.infer(x).recon, True)
    _, suffix = clean_forward(model, model_cfg, ids)
    mean_act = suffix.resid[:, 1:].float().mean((0, 1))  # [d_in]

    def full() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    def old_per_sae() -> None:
        with torch.inference_mode(), hook_resid(model, model_cfg, splice):
            model(input_ids=ids)

    def new_per_sae() -> None:
        run_suffix(suffix, splice(suffix.resid))

    def new_whole() -> dict[str, float]:
        return downstream_metrics(model, model_cfg, lambda x: sae.infer(x).recon, ids, args.batch,
                                  True, mean_act=mean_act)  # fmt: skip

    runner = SuffixRunner(model, model_cfg)
    runner.prepare(ids)
    final = runner.final_hidden(ids.shape, suffix.resid)

    def cached_head_per_sae() -> torch.Tensor:
        """The evaluate stage's work per batch before KL terms (issue 12): the SAE, the suffix
        on the spliced stream, the LM head on the baseline's cached final hidden state, CE and
        KL from both log-softmaxes."""
        with torch.inference_mode():
            ce, logp = _token_losses(runner.logits(ids.shape, splice(suffix.resid)), ids, 1)
            logp_clean = _token_losses(runner.head(ids.shape, final), ids, 1)[1]
            return (logp_clean.exp() * (logp_clean - logp)).sum(-1)

    with torch.inference_mode():
        u, kl_const = clean_kl_terms(
            _token_losses(runner.head(ids.shape, final), ids, 1)[1], linear_head(model)
        )

    def cached_per_sae() -> torch.Tensor:
        """The evaluate stage's work per batch (saelab.evaluate.spliced_pass): the SAE, the
        suffix on the spliced stream with its LM head, CE, and KL from the baseline's clean
        terms (saelab.baseline.clean_kl_terms): no clean logits."""
        with torch.inference_mode():
            spliced_final = runner.final_hidden(ids.shape, splice(suffix.resid))
            ce, lse = token_ce(runner.head(ids.shape, spliced_final), ids, 1)
            return kl_from_terms(u, kl_const, spliced_final[:, 1:-1], lse)

    def old_whole() -> dict[str, float]:
        return old_downstream(model, model_cfg, lambda x: sae.infer(x).recon, ids, mean_act)

    cases = {"full": full, "old": old_per_sae, "new": new_per_sae,
             "clean": lambda: clean_forward(model, model_cfg, ids),
             "old_whole": old_whole, "new_whole": new_whole, "cached_head": cached_head_per_sae,
             "cached": cached_per_sae}  # fmt: skip
    warm = {key: fn() for key, fn in cases.items()}  # warm-up; keeps the metrics
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in cases}
    for _ in range(args.repeats):  # interleaved, so drift hits all alike
        for key, fn in cases.items():
            times[key].append(_seconds(fn))
    wall = {key: statistics.median(w for w, _ in v) for key, v in times.items()}
    cpu = {key: statistics.median(c for _, c in v) for key, v in times.items()}
    old_m, new_m = warm["old_whole"], warm["new_whole"]
    n_layers = len(decoder_layers(model))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, model dtype "
          f"{model_cfg.dtype}")  # fmt: skip
    print(f"torch {torch.__version__}, {args.threads} threads, {args.batch} x {args.ctx_len} "
          f"real tokens ({args.corpus}), {args.hookpoint} of {n_layers} layers, "
          f"TopK SAE d_sae {cfg.sae.d_sae}, median of {args.repeats}")  # fmt: skip
    print(f"{'':34} {'wall s':>7} {'/ full':>7} {'CPU s':>7} {'/ full':>7}")
    for key, label in LABELS.items():
        print(f"{label:<34} {wall[key]:7.2f} {wall[key] / wall['full']:7.2f} "
              f"{cpu[key]:7.2f} {cpu[key] / cpu['full']:7.2f}")  # fmt: skip
    print(f"downstream_metrics old / new: wall {wall['old_whole'] / wall['new_whole']:.2f}, "
          f"CPU {cpu['old_whole'] / cpu['new_whole']:.2f}")  # fmt: skip
    print(f"per SAE, in full forwards: old {wall['old_whole'] / wall['full']:.2f} (clean + 3 "
          f"replacements per SAE), cached {wall['cached'] / wall['full']:.2f} wall, "
          f"{cpu['cached'] / cpu['full']:.2f} CPU (with the clean head: "
          f"{cpu['cached_head'] / cpu['full']:.2f} CPU)")  # fmt: skip
    diff = max(abs(old_m[key] - new_m[key]) for key in old_m)
    print(f"max |old - new| over CE clean/spliced/zero/mean and KL: {diff:.2e} nats/token")
    kl_diff = (warm["cached"] - warm["cached_head"]).abs().max().item()
    print(
        f"KL per prediction, KL terms vs clean head: max |diff| {kl_diff:.2e} nats "
        f"(mean KL {warm['cached_head'].mean().item():.4f})"
    )


if __name__ == "__main__":
    main()
