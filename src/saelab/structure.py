"""Structure metrics of one SAE: sparse probing, feature absorption, feature sharing.

The ``structure@<variant>`` stage's library; its inputs come from the ``probe_data`` stage
(:mod:`saelab.probes`) and the eval activation cache. Every interval is a 95% percentile
bootstrap (``structure.n_bootstrap`` resamples, seeded) over the unit named with it.

**Sparse probing** (Gurnee et al. 2023, sec. 3; SAEBench ``sparse_probing``, ``main.py`` and
``probe_training.py``). A context's features are the mean of its SAE codes over the pooled
tokens (``ProbeData.ctx_keep``). Per task, per class (one-vs-rest), per fold (test documents
unseen in training): the k latents with the largest ``|mean_pos - mean_neg|`` on the training
contexts (``get_top_k_mean_diff_mask``), then scikit-learn's ``LogisticRegression`` (L2, C = 1,
``max_iter`` 1000, SAEBench's ``train_sklearn_probe``) on those k latents only. Reported: the
held-out accuracy, averaged over the task's classes, for k in ``structure.ks``
(``sp_<task>_k<k>``); the same with k latents drawn at random among those that fire on some
training context (``sp_<task>_random_k<k>``, mean of ``structure.random_draws`` draws; not in
SAEBench); and the ceiling, a probe on the mean-pooled raw residual
stream (``sp_<task>_raw``; SAEBench's ``llm_test_accuracy``; features standardised, C = 1).
Departure: SAEBench balances each binary task by subsampling negatives to the positives'
count; here the probe is fitted with ``class_weight='balanced'`` and scored by balanced
accuracy (the accuracy expected on a balanced test set), which uses every context. Intervals:
over test documents, resampled within each class.

**Feature absorption** (Chanin et al. 2024, "A is for Absorption", sec. 3-4; SAEBench
``absorption``: ``k_sparse_probing.py``, ``feature_absorption_calculator.py``, ``main.py``).
On the train words' SAE codes, an L1-regularised logistic regression per letter (SAEBench: one
multi-probe, BCE + ``l1_decay`` x sum|w|; here scikit-learn's liblinear with the same objective,
``C = 1 / (l1_decay * n_train)``, ``class_weight='balanced'`` as SAEBench's ``pos_weight``).
For k = 1..``max_k``, its k largest weights' latents get a ``LogisticRegression(max_iter=500,
class_weight='balanced')``; the letter's **main latents** are those of the largest k reached while
each step raises the test F1 (score > 0) by more than ``f1_jump_threshold``
(``add_feature_splits_to_metrics_df``). Then, for each test word that starts with the letter
and that the letter probe (``probe_data``) scores > 0 (the probe's true positives), with
``a`` the SAE code, ``x`` the residual, ``p`` the unit probe direction and ``proj_j = a_j
(W_dec[j] . p)`` (SAEBench: ``a_j cos(W_dec[j], p)``, equal for unit-norm decoder rows; ours
are not unit-norm after the input scale is folded in, and ``W_dec[j] . p`` is latent j's actual
contribution to the reconstruction along p):

* absorption fraction: 0 if the main latents' ``sum proj`` >= ``x . p``, or if the (at most 3)
  largest positive ``proj_j`` of the other latents with ``cos(W_dec[j], p) >= 0.1`` sum to less
  than 0.4 ``x . p``; else 1 if the main latents' ``sum proj <= 0``; else
  ``A / (A + main)`` with ``A = min(that sum, x . p - main)``;
* full absorption: every main latent has ``a < 1e-8``, the top-projecting latent has cos >= 0.025
  and ``proj >= 0.4 x . p``, and ``x . p >= 0``.

Per letter, ``mean_absorption_fraction`` and ``full_absorption_rate`` are those sums over the
probe's true positives divided by their number; the metrics are their means over the letters
whose probe F1 exceeds ``min_probe_f1`` (SAEBench's ``min_GT_probe_f1`` 0.6;
``absorption_letters`` of them; SAEBench refuses to score with fewer than 20:
``absorption_evaluable``). Intervals: over test words, resampled within each letter. Departure:
SAEBench re-runs the model on fresh ICL prompts for the absorption step; the cached test-word
activations (same template, other random examples) are reused.

**Feature sharing** (the structure Sampled-SAE's ``l`` controls; Oozeer et al. 2025, sec. 3-4).
On the eval activation cache, in batches of ``train.batch_size`` tokens made of whole contexts
(position 0 and tokens above the SAE's ``max_norm`` dropped, as in training), in two modes:
``train`` (the training rule: BatchTopK's and Sampled's batch-level selection, Sampled's pool
of ``k*l``; the other variants have one rule) and ``eval`` (the inference rule, a global θ for
BatchTopK and Sampled: what a user of the SAE sees). Per batch: ``distinct_latents`` (latents
that fire on at least one token) and ``pool_mass_share``, the share of the batch's activation
mass ``sum_t a_tj`` on its ``k*l`` heaviest latents (``l`` of ``variant_params.sampled``, the
same pool size for every variant; 1 by construction for Sampled in train mode). Over the eval
split: the entropy (nats) of latent usage ``p_j = fires_j / sum fires`` (``usage_entropy``),
divided by ``ln d_sae`` (``usage_entropy_norm``), and ``exp`` of it (``effective_latents``).
Intervals: over batches (per-batch figures), over contexts (entropy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelab.config import PipelineConfig, StructureConfig, check_provenance
from saelab.probes import LETTERS, ProbeData, ProbeTask, mean_pool

log = logging.getLogger(__name__)

FULL_ABSORPTION_COS = 0.025  # SAEBench FULL_ABSORPTION_PROBE_COS_THRESHOLD
FRACTION_COS = 0.1  # ABSORPTION_FRACTION_PROBE_COS_THRESHOLD
PROJECTION_SHARE = 0.4  # ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD
MAX_ABSORBING = 3  # ABSORPTION_FRACTION_MAX_ABSORBING_LATENTS
EPS = 1e-8
MIN_LETTERS = 20  # SAEBench min_feats_for_eval


# --------------------------------------------------------------------------- bootstrap


def percentile_interval(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles of ``samples [B]`` (NaNs ignored)."""
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def stratified_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n] float64`` bootstrap multiplicities of ``n`` units: each resample draws, within
    every group of ``groups [n]``, as many units as it has, with replacement."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_boot, len(groups)))
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        draws = rng.integers(0, len(members), (n_boot, len(members)))
        np.add.at(w, (np.arange(n_boot)[:, None], members[draws]), 1.0)
    return w


# --------------------------------------------------------------------------- sparse probing


def top_k_mean_diff(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[k]`` of the features of ``x [n, F]`` with the largest ``|mean(x[y]) -
    mean(x[~y])|`` (SAEBench ``get_top_k_mean_diff_mask``), largest first."""
    diff = np.abs(x[y].mean(0) - x[~y].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def _fit_predict(x_train: np.ndarray, y: np.ndarray, x_test: np.ndarray, scale: bool) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced")
    model = make_pipeline(StandardScaler(), lr) if scale else lr
    return model.fit(x_train, y).predict(x_test).astype(bool)


def task_correct(
    feats: np.ndarray,
    ctx_doc: np.ndarray,
    task: ProbeTask,
    select: Any,
    scale: bool = False,
) -> np.ndarray:
    """Out-of-fold correctness ``[n_classes, n_ctx] float`` (NaN for contexts the task does not
    label) of the one-vs-rest probes of ``task`` on ``feats [n_ctx, F]``.

    select: ``(x_train, y_train, fold, cls) -> feature indices`` or None for all features.
    """
    label = task.label[ctx_doc]
    fold = task.fold[ctx_doc]
    out = np.full((len(task.classes), len(feats)), np.nan)
    for f in range(task.n_folds):
        train, test = (label >= 0) & (fold != f), (label >= 0) & (fold == f)
        for c in range(len(task.classes)):
            y = label[train] == c
            if y.all() or not y.any() or not test.any():
                continue  # a fold without both classes in training (left NaN: not scored)
            cols = slice(None) if select is None else select(feats[train], y, f, c)
            pred = _fit_predict(feats[train][:, cols], y, feats[test][:, cols], scale)
            out[c, test] = pred == (label[test] == c)
    return out


def balanced_accuracy(
    correct: np.ndarray, ctx_doc: np.ndarray, task: ProbeTask, n_boot: int, seed: int
) -> tuple[float, float, float]:
    """Mean over classes of the balanced accuracy ``(TPR + TNR) / 2`` of ``correct [C, n_ctx]``
    (from :func:`task_correct`), and its bootstrap interval over documents (resampled within
    each class). Returns ``(acc, lo, hi)``."""
    labelled = np.flatnonzero(task.label >= 0)
    n_docs = len(task.label)
    weights = np.vstack(
        [np.ones(len(labelled)), stratified_weights(task.label[labelled], n_boot, seed)]
    )
    accs = np.zeros(len(weights))
    for c in range(len(task.classes)):
        pos_doc = task.label == c
        rows = ~np.isnan(correct[c])
        hits = np.bincount(ctx_doc[rows], correct[c, rows], minlength=n_docs)[labelled]
        total = np.bincount(ctx_doc[rows], minlength=n_docs)[labelled].astype(float)
        pos = pos_doc[labelled]
        tpr = (weights[:, pos] @ hits[pos]) / (weights[:, pos] @ total[pos])
        tnr = (weights[:, ~pos] @ hits[~pos]) / (weights[:, ~pos] @ total[~pos])
        accs += (tpr + tnr) / 2
    accs /= len(task.classes)
    lo, hi = percentile_interval(accs[1:])
    return float(accs[0]), lo, hi


def probe_tasks(
    feats: np.ndarray,
    ctx_doc: np.ndarray,
    tasks: Sequence[ProbeTask],
    ks: Sequence[int] | None,
    p: StructureConfig,
    scale: bool = False,
) -> dict[str, float]:
    """Sparse-probing metrics (module docstring) of ``feats [n_ctx, F]`` for every task: with
    ``ks`` None the probe on all features (``sp_<task>_raw``), else ``sp_<task>_k<k>`` and
    ``sp_<task>_random_k<k>``, each with ``_ci_low`` / ``_ci_high``."""
    out: dict[str, float] = {}

    def put(key: str, correct: np.ndarray, task: ProbeTask) -> None:
        acc, lo, hi = balanced_accuracy(correct, ctx_doc, task, p.n_bootstrap, p.seed)
        out.update({key: acc, f"{key}_ci_low": lo, f"{key}_ci_high": hi})

    for task in tasks:
        name = f"sp_{task.name}"
        if ks is None:
            put(f"{name}_raw", task_correct(feats, ctx_doc, task, None, scale), task)
            continue
        for k in ks:
            best = task_correct(
                feats, ctx_doc, task, lambda x, y, f, c, k=k: top_k_mean_diff(x, y, k)
            )
            put(f"{name}_k{k}", best, task)
            rng = np.random.default_rng([p.seed, k])

            def pick(x: np.ndarray, y: np.ndarray, f: int, c: int, k: int = k) -> np.ndarray:
                live = np.flatnonzero(x.max(0) > 0)  # latents that fire on a train context
                return rng.choice(live, min(k, len(live)), replace=False)  # noqa: B023

            draws = [task_correct(feats, ctx_doc, task, pick) for _ in range(p.random_draws)]
            put(f"{name}_random_k{k}", np.mean(draws, axis=0), task)
    return out


@torch.no_grad()
def encode_eval(sae: Any, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """SAE codes of the inference function (``sae.encode``): ``x [..., d_in]`` float32 ->
    ``[..., d_sae]`` float32 (numpy)."""
    flat = torch.from_numpy(x.reshape(-1, x.shape[-1]))
    codes = [sae.encode(flat[i : i + batch]) for i in range(0, len(flat), batch)]
    return torch.cat(codes).numpy().reshape(*x.shape[:-1], -1)


def context_codes(sae: Any, data: ProbeData) -> np.ndarray:
    """``[n_ctx, d_sae]``: each probe context's SAE codes mean-pooled over its kept tokens
    (SAEBench ``get_sae_meaned_activations``)."""
    out = []
    for i in range(0, len(data.ctx_acts), 32):
        codes = encode_eval(sae, data.ctx_acts[i : i + 32])  # [32, ctx_len, d_sae]
        out.append(mean_pool(codes, data.ctx_keep[i : i + 32]))
    return np.concatenate(out)


# --------------------------------------------------------------------------- absorption


def main_latents(
    codes_train: Any,
    y_train: np.ndarray,
    codes_test: Any,
    y_test: np.ndarray,
    p: StructureConfig,
) -> list[int]:
    """The letter's main latents (module docstring; SAEBench ``train_k_sparse_probes`` +
    ``add_feature_splits_to_metrics_df``). codes: ``[n, d_sae]`` float, dense or a scipy CSR
    matrix (converted once per call otherwise); y: ``[n] bool``."""
    from scipy.sparse import csr_matrix, issparse
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    codes_train = codes_train if issparse(codes_train) else csr_matrix(codes_train)
    codes_test = codes_test if issparse(codes_test) else csr_matrix(codes_test)
    l1 = LogisticRegression(
        l1_ratio=1.0, solver="liblinear", C=1.0 / (p.l1_decay * len(y_train)),
        class_weight="balanced", random_state=p.seed,
    ).fit(codes_train, y_train)  # fmt: skip
    order = np.argsort(-l1.coef_[0], kind="stable")
    best, feats = -100.0, []
    for k in range(1, p.max_k + 1):
        ids = order[:k]
        lr = LogisticRegression(max_iter=500, class_weight="balanced")
        lr.fit(codes_train[:, ids].toarray(), y_train)
        score = lr.decision_function(codes_test[:, ids].toarray())
        f1 = f1_score(y_test, score > 0, zero_division=0.0)
        if f1 <= best + p.f1_jump_threshold:
            break
        best, feats = f1, ids.tolist()
    return feats


def word_absorption(
    acts: np.ndarray, x_proj: float, dec_proj: np.ndarray, cos: np.ndarray, main: Sequence[int]
) -> tuple[float, bool]:
    """``(absorption_fraction, is_full_absorption)`` of one word (module docstring; SAEBench
    ``FeatureAbsorptionCalculator.calculate_absorption``).

    acts: ``[d_sae]`` its SAE code; x_proj: ``x . p``; dec_proj: ``[d_sae]`` ``W_dec[j] . p``;
    cos: ``[d_sae]`` ``cos(W_dec[j], p)``; main: the letter's main latents.
    """
    proj = acts * dec_proj
    main = list(main)
    main_proj = float(proj[main].sum())
    others = np.ones(len(acts), bool)
    others[main] = False
    candidates = np.sort(proj[others & (cos >= FRACTION_COS) & (proj > 0)])[::-1][:MAX_ABSORBING]
    absorbing = float(candidates.sum())
    if x_proj <= 0:  # SAEBench's ratios are then negative or undefined: never absorption
        return 0.0, False
    if main_proj >= x_proj or absorbing / x_proj < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(absorbing, x_proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(np.argmax(proj))
    full = (
        all(acts[j] < EPS for j in main)
        and cos[top] >= FULL_ABSORPTION_COS
        and proj[top] / x_proj >= PROJECTION_SHARE
    )
    return fraction, bool(full)


def absorption_metrics(sae: Any, data: ProbeData, p: StructureConfig) -> dict[str, float]:
    """Feature-absorption metrics of ``sae`` on the first-letter words (module docstring)."""
    per_letter = letter_absorption(sae, data, p)
    for c, (frac, full, n_main) in per_letter.items():
        log.info(
            "absorption %s: %d true positives, %d main latents, fraction %.4f, full %.4f",
            LETTERS[c], len(frac), n_main, frac.mean(), full.mean(),
        )  # fmt: skip
    return _aggregate_absorption(per_letter, p)


def letter_absorption(
    sae: Any, data: ProbeData, p: StructureConfig
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """Per scored letter (index into :data:`LETTERS`; probe F1 > ``min_probe_f1`` and at least
    one true positive): ``(fraction [n_tp] float, full [n_tp] float 0/1, n_main_latents)`` over
    the letter probe's true-positive test words (module docstring)."""
    from scipy.sparse import csr_matrix

    codes = csr_matrix(encode_eval(sae, data.word_acts).astype(np.float64))  # [n_words, d_sae]
    test, letter = data.word_test, data.word_letter
    codes_train, codes_test = codes[np.flatnonzero(~test)], codes[np.flatnonzero(test)]
    W_dec = sae.W_dec.detach().double().numpy()  # [d_sae, d_in]
    dec_norm = np.linalg.norm(W_dec, axis=1).clip(1e-12)
    scores = data.word_acts @ data.letter_W.T + data.letter_b  # [n_words, 26]
    per_letter: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    for c in range(len(LETTERS)):
        if not data.letter_f1[c] > p.min_probe_f1:
            continue
        tp = np.flatnonzero(test & (letter == c) & (scores[:, c] > 0))
        if len(tp) == 0:
            continue
        main = main_latents(codes_train, letter[~test] == c, codes_test, letter[test] == c, p)
        direction = data.letter_W[c] / np.linalg.norm(data.letter_W[c])
        dec_proj = W_dec @ direction
        cos = dec_proj / dec_norm
        tp_codes = codes[tp].toarray()
        rows = [
            word_absorption(a, float(data.word_acts[i] @ direction), dec_proj, cos, main)
            for a, i in zip(tp_codes, tp, strict=True)
        ]
        frac, full = (np.array(v, float) for v in zip(*rows, strict=True))
        per_letter[c] = (frac, full, len(main))
    return per_letter


def _aggregate_absorption(
    per_letter: dict[int, tuple[np.ndarray, np.ndarray, int]], p: StructureConfig
) -> dict[str, float]:
    """Means over letters of the per-letter rates, with bootstrap intervals over words."""
    n = len(per_letter)
    out: dict[str, float] = {
        "absorption_letters": n,
        "absorption_evaluable": float(n >= MIN_LETTERS),
    }
    if n == 0:
        return out
    rng = np.random.default_rng(p.seed)
    for key, idx in (("absorption_fraction", 0), ("full_absorption_rate", 1)):
        point = np.mean([v[idx].mean() for v in per_letter.values()])
        boot = np.zeros(p.n_bootstrap)
        for v in per_letter.values():
            draws = rng.integers(0, len(v[idx]), (p.n_bootstrap, len(v[idx])))
            boot += v[idx][draws].mean(1)
        lo, hi = percentile_interval(boot / n)
        out.update({key: float(point), f"{key}_ci_low": lo, f"{key}_ci_high": hi})
        out[f"{key}_std_letters"] = (
            float(np.std([v[idx].mean() for v in per_letter.values()], ddof=1)) if n > 1 else 0.0
        )
    out["absorption_main_latents"] = float(np.mean([v[2] for v in per_letter.values()]))
    out["absorption_words"] = float(sum(len(v[0]) for v in per_letter.values()))
    return out


# --------------------------------------------------------------------------- feature sharing


def context_batches(store: Any, batch_tokens: int, max_norm: float | None, exclude_first: bool):
    """Yield ``(x [n, d_in] float32, ctx [n] int64)``: whole contexts of the eval store,
    ``batch_tokens // ctx_len`` per batch, position 0 (when ``exclude_first``) and tokens with
    norm above ``max_norm`` dropped; ``ctx`` is each row's context index."""
    per = max(1, batch_tokens // store.ctx_len)
    n_ctx = store.n_tokens // store.ctx_len
    for c0 in range(0, n_ctx, per):
        c1 = min(n_ctx, c0 + per)
        x = store.read(c0 * store.ctx_len, c1 * store.ctx_len)
        pos = torch.arange(len(x)) % store.ctx_len
        keep = (pos != 0) if exclude_first else torch.ones(len(x), dtype=torch.bool)
        if max_norm is not None:
            keep &= x.norm(dim=-1) <= max_norm
        ctx = c0 + torch.arange(len(x)) // store.ctx_len
        yield x[keep], ctx[keep]


def _entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each row of ``counts [B, d_sae]`` normalised to a distribution."""
    prob = counts / counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(prob > 0, prob * np.log(prob), 0.0), axis=-1)


@torch.no_grad()
def sharing_metrics(
    sae: Any, batches: list[tuple[Tensor, Tensor]], n_ctx: int, pool: int, p: StructureConfig
) -> dict[str, float]:
    """Feature-sharing metrics (module docstring) of ``sae`` on ``batches`` (from
    :func:`context_batches`), of the training function (``train``: ``sae.forward_train``) and
    of the inference function (``eval``: ``sae.encode``); ``pool``: the k*l latents of the
    share."""
    out: dict[str, float] = {
        "sharing_pool_size": float(pool),
        "sharing_batches": float(len(batches)),
    }
    d_sae = sae.W_dec.shape[0]
    for mode in ("train", "eval"):
        encode = (lambda x: sae.forward_train(x).acts) if mode == "train" else sae.encode
        distinct, share = [], []
        counts = torch.zeros(n_ctx, d_sae, dtype=torch.float64)
        for x, ctx in batches:
            acts = encode(x)  # [batch, d_sae]
            fired = acts > 0
            distinct.append(float(fired.any(0).sum()))
            mass = acts.sum(0).double()
            share.append(
                float(mass.topk(min(pool, d_sae)).values.sum() / mass.sum().clamp_min(1e-30))
            )
            counts.index_add_(0, ctx, fired.double())
        for key, vals in (("distinct_latents", distinct), ("pool_mass_share", share)):
            vals = np.asarray(vals)
            w = stratified_weights(np.zeros(len(vals)), p.n_bootstrap, p.seed)
            lo, hi = percentile_interval((w @ vals) / len(vals))
            out.update(
                {
                    f"sharing_{mode}_{key}": float(vals.mean()),
                    f"sharing_{mode}_{key}_ci_low": lo,
                    f"sharing_{mode}_{key}_ci_high": hi,
                }
            )
        c = counts.numpy()
        w = stratified_weights(np.zeros(n_ctx), p.n_bootstrap, p.seed)
        ent = _entropy(np.vstack([c.sum(0, keepdims=True), w @ c]))
        lo, hi = percentile_interval(ent[1:])
        prefix = f"sharing_{mode}_usage_entropy"
        out.update({prefix: float(ent[0]), f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})
        out[f"sharing_{mode}_usage_entropy_norm"] = float(ent[0] / np.log(d_sae))
        out[f"sharing_{mode}_effective_latents"] = float(np.exp(ent[0]))
    return out


# --------------------------------------------------------------------------- the stage


def run_structure(
    cfg: PipelineConfig, sae_dir: Path, probes: Path, activations: Path
) -> dict[str, float]:
    """The ``structure@<variant>`` stage's metrics for the SAE in ``sae_dir`` (module docstring);
    ``probes``: the ``probe_data`` group; ``activations``: the cache (its ``eval`` store).
    Includes the SAE-independent ceiling (``sp_<task>_raw``) and ``seconds_*`` timings."""
    from saelab.probes import read_probe_data
    from saelab.sae import load_sae
    from saelab.store import ActivationStore

    p = cfg.structure
    t0 = time.perf_counter()
    sae = load_sae(sae_dir)
    store = ActivationStore(activations / "eval")
    check_provenance(cfg.model, store=store, sae=sae, sae_dir=sae_dir)
    data = read_probe_data(probes)
    metrics: dict[str, float] = dict(data.attrs["raw_probe"])
    t1 = time.perf_counter()
    metrics.update(probe_tasks(context_codes(sae, data), data.ctx_doc, data.tasks, p.ks, p))
    t2 = time.perf_counter()
    metrics.update(absorption_metrics(sae, data, p))
    t3 = time.perf_counter()
    batches = list(
        context_batches(
            store,
            cfg.train.batch_size,
            sae.metadata.get("max_norm"),
            cfg.sae.exclude_first_position,
        )
    )
    pool = cfg.k * cfg.variant_params.sampled.l
    metrics.update(sharing_metrics(sae, batches, store.n_tokens // store.ctx_len, pool, p))
    t4 = time.perf_counter()
    metrics.update(
        seconds_load=t1 - t0, seconds_sparse_probing=t2 - t1,
        seconds_absorption=t3 - t2, seconds_sharing=t4 - t3,
    )  # fmt: skip
    return metrics
