"""The ``probe_data`` stage: labelled inputs for the structure metrics, shared by every variant.

Two datasets, both residual-stream activations at the SAE's hookpoint of the real model, computed
once per corpus and model (SAEBench caches them per model the same way, then runs each SAE on
the cached activations):

* **Sparse-probing contexts** (SAEBench ``sparse_probing``; Gurnee et al. 2023). SAEBench's
  tasks are hub datasets (bias-in-bios, Amazon reviews, AG news, ...), which cannot be fetched
  here; the labels this corpus carries offline take their place:

  - ``source``: gutenberg / us-speeches / wikitext-2 (the corpus directory);
  - ``author``: the Gutenberg book's author (the file name's prefix, ``austen-emma.txt``), kept
    for authors with at least ``min_docs_per_class`` books, so a test book is always unseen;
  - ``decade``: a speech's decade (the file name's year, ``1961-Kennedy.txt``,
    ``inaugural-1789-Washington.txt``), decades with at least ``min_docs_per_decade`` speeches
    (1940s-2000s, 8-15 each: earlier decades hold 1-3 inaugurals).

  Each document gives up to ``contexts_per_source / n_docs_of_its_source`` windows of
  ``ctx_len`` tokens (no BOS, as the rest of the pipeline), spread evenly over the document.
  Split **by document**: every labelled document of a task is assigned to one of
  ``min(n_folds, smallest class's documents)`` folds, stratified by class; a fold's test
  contexts all come from documents no training context comes from. SAEBench instead draws
  4,000 train and 1,000 test examples from the datasets' own splits.

  Pooling mask (``ctx_keep``): positions >= 1 (position 0 is an attention sink) whose residual
  norm is at most ``sae.exclude_norm_factor`` x the median norm of these contexts' tokens, the
  rule the SAEs were trained with (``sae.exclude_*``, README "Attention sinks"); SAEBench masks
  BOS, pad and EOS tokens and mean-pools the rest.

* **First-letter prompts** (SAEBench ``absorption``; Chanin et al. 2024, sec. 3). The vocabulary
  is every token whose text, one leading space allowed, is ASCII letters only (SAEBench's
  ``get_alpha_tokens``; 47,078 tokens for SmolLM2's tokenizer), all of them (``n_words`` null,
  as SAEBench) or ``n_words`` drawn (seeded), shuffled and split 80/20 into train and test words
  (``create_dataset_probe_training``: ``train_test_fraction`` 0.8). One ICL prompt per word with
  ``icl_examples`` (SAEBench: 10) examples drawn from the same split's words, the word itself
  excluded, in SAEBench's template ``"{word} has the first letter:"`` with the answer ``" X"``
  (capitalised first letter) and ``"\\n"`` before every example
  (``prepend_separator_to_first_example``); the activation is read at the query word's token,
  6th from the end. Departure: the prompt is built from token ids, the word's own token
  concatenated with the tokenized pieces, so the word is always that one token at a known
  position and every prompt has the same length (SAEBench tokenizes the string and assumes both).
  Our model has no BOS; the prompt's first token (``"\\n"``) is the sink.

  Departure (cost): SAEBench draws the examples independently for every word; here every
  ``words_per_prefix`` consecutive words of a split (the shuffled order) share one draw, made
  from the split's words outside the group, so each word's prompt is still a uniform draw of
  examples that excludes it, but words of a group are correlated. The shared prefix runs once,
  filling a KV cache of the layers below the hookpoint; each word then runs only its two query
  tokens (separator, word) on it (:func:`capture_prefixed`). The tokens after the word
  (``" has the first letter:"``) cannot change a causal LM's activation at the word and are not
  run. The activations equal the full prompts' forward (tested); per word this is
  ``prefix_len / words_per_prefix + 2`` tokens of forward instead of the prompt's 87, which is
  what makes the whole vocabulary affordable. Measured effect of the sharing on the letter probes
  and the absorption metrics: ``docs/performance.md`` ("First-letter prompts").

  The letter probes: one logistic regression per letter (one-vs-rest, ``class_weight=
  'balanced'``), scikit-learn's, on the train words' activations divided by their RMS norm
  (one scalar: the direction is unchanged). SAEBench fits the 26 outputs jointly by Adam on
  BCE with ``pos_weight = n_neg / n_pos`` (the same weighting) and weight decay 1e-4; the
  probes' test F1 (score > 0) decides which letters are evaluated (``min_probe_f1``; SAEBench
  ``min_GT_probe_f1`` 0.6).

The raw-activation ceiling of the sparse-probing tasks (a probe on the mean-pooled residual
stream, SAEBench's ``llm_test_accuracy``) needs no SAE and is computed here too.
"""

from __future__ import annotations

import logging
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from saelab.config import ModelConfig, PipelineConfig
from saelab.data import Document

log = logging.getLogger(__name__)

LETTERS = string.ascii_lowercase
PROMPT_TEMPLATE = "{word} has the first letter:"
EXAMPLE_SEPARATOR = "\n"
TASKS = ("source", "author", "decade")
_ALPHA = set(string.ascii_letters)


# --------------------------------------------------------------------------- labelled contexts


@dataclass(frozen=True)
class ProbeTask:
    """One labelled task over documents.

    classes: class names, sorted. label: ``[n_docs] int`` class index of each document of the
    probe set, -1 where the task does not label it. fold: ``[n_docs] int`` test fold of each
    labelled document (-1 elsewhere); ``n_folds`` folds.
    """

    name: str
    classes: tuple[str, ...]
    label: np.ndarray
    fold: np.ndarray
    n_folds: int

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "label": self.label.tolist(),
            "fold": self.fold.tolist(),
            "n_folds": self.n_folds,
        }

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> ProbeTask:
        return cls(
            name, tuple(d["classes"]), np.asarray(d["label"]), np.asarray(d["fold"]), d["n_folds"]
        )


def document_label(doc: Document, task: str) -> str | None:
    """The class of ``doc`` in ``task`` (:data:`TASKS`), None when the task does not cover it.

    source: ``doc.source``; author: the Gutenberg file name's part before ``-``; decade: the
    year in a speech's file name (``1961-Kennedy.txt``, ``inaugural-1789-Washington.txt``)
    rounded down to the decade (``"1960s"``).
    """
    if task == "source":
        return doc.source
    if task == "author":
        return doc.name.split("-")[0] if doc.source == "gutenberg" else None
    if task == "decade":
        year = re.search(r"(1[789]|20)\d\d", doc.name) if doc.source == "us-speeches" else None
        return None if year is None else f"{int(year.group()) // 10 * 10}s"
    raise ValueError(f"document_label: unknown task {task!r}; allowed: {', '.join(TASKS)}")


def make_task(
    docs: Sequence[Document],
    task: str,
    min_docs: int,
    n_folds: int,
    seed: int,
    usable: Sequence[bool] | None = None,
) -> ProbeTask:
    """Label ``docs`` for ``task``, keep classes with >= ``min_docs`` documents, and assign each
    labelled document a fold: per class, a seeded permutation of its documents dealt round-robin
    over ``min(n_folds, smallest class size)`` folds (stratified, by document). ``usable [n]``
    (default all): documents to label; the others (no context drawn from them) get -1.

    Raises:
        ValueError: fewer than two classes remain.
    """
    names = [document_label(d, task) for d in docs]
    if usable is not None:  # documents that gave no context (shorter than ctx_len) are unlabelled
        names = [n if ok else None for n, ok in zip(names, usable, strict=True)]
    counts: dict[str, int] = {}
    for n in names:
        if n is not None:
            counts[n] = counts.get(n, 0) + 1
    classes = tuple(sorted(c for c, n in counts.items() if n >= min_docs))
    if len(classes) < 2:
        raise ValueError(f"probe task {task!r}: fewer than 2 classes with >= {min_docs} documents")
    label = np.array([classes.index(n) if n in classes else -1 for n in names])
    folds = min(n_folds, min(counts[c] for c in classes))
    fold = np.full(len(docs), -1)
    rng = np.random.default_rng([seed, TASKS.index(task)])
    for c in range(len(classes)):
        members = np.flatnonzero(label == c)
        fold[members[rng.permutation(len(members))]] = np.arange(len(members)) % folds
    return ProbeTask(task, classes, label, fold, folds)


def _tasks(docs: Sequence[Document], p: Any, usable: Sequence[bool]) -> list[ProbeTask]:
    """The tasks of :data:`TASKS` the corpus supports (>= 2 classes; the others are logged and
    skipped, e.g. ``author`` without a ``gutenberg`` source).

    Raises:
        ValueError: no task is supported.
    """
    tasks = []
    for t in TASKS:
        min_docs = p.min_docs_per_decade if t == "decade" else p.min_docs_per_class
        try:
            tasks.append(make_task(docs, t, min_docs, p.n_folds, p.seed, usable))
        except ValueError as e:
            log.warning("skipping %s", e)
    if not tasks:
        raise ValueError("probe data: the corpus supports none of the tasks " + ", ".join(TASKS))
    return tasks


def context_windows(n_tokens: int, n_windows: int, ctx_len: int) -> list[int]:
    """Start offsets of up to ``n_windows`` disjoint ``ctx_len`` windows spread evenly over a
    document of ``n_tokens`` tokens (fewer when it is too short; none below ``ctx_len``)."""
    n = min(n_windows, n_tokens // ctx_len)
    if n <= 0:
        return []
    stride = (n_tokens - ctx_len) // max(n - 1, 1)
    return [i * stride for i in range(n)]


def sample_contexts(
    docs: Sequence[Document], token_ids: Sequence[np.ndarray], per_source: int, ctx_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Windows of every document: ``per_source`` contexts per source shared evenly among its
    documents (the first ``per_source % n`` get one more).

    Returns:
        (contexts ``[n_ctx, ctx_len] int32``, doc ``[n_ctx] int32`` index into ``docs``).
    """
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)
    rows, owner = [], []
    for members in by_source.values():
        base, extra = divmod(per_source, len(members))
        for j, i in enumerate(members):
            for start in context_windows(len(token_ids[i]), base + (j < extra), ctx_len):
                rows.append(token_ids[i][start : start + ctx_len])
                owner.append(i)
    return np.stack(rows).astype(np.int32), np.asarray(owner, dtype=np.int32)


# --------------------------------------------------------------------------- first-letter prompts


def alpha_vocab(tokenizer: Any) -> list[tuple[int, str]]:
    """``(token id, word)`` of every token whose decoded text, after at most one leading space,
    is ASCII letters only (SAEBench ``vocab.get_alpha_tokens``), sorted by id."""
    out = []
    for token, tid in tokenizer.get_vocab().items():
        word = tokenizer.convert_tokens_to_string([token])
        body = word[1:] if word.startswith(" ") else word
        if body and set(body) <= _ALPHA:
            out.append((int(tid), word))
    return sorted(out)


@dataclass(frozen=True)
class LetterPrompts:
    """First-letter ICL prompts, words sharing an ICL prefix grouped (module docstring).

    prefix_ids: ``[n_prefix, prefix_len] int64`` the ICL examples of each group; prefix_of:
    ``[n] int64`` each word's prefix (non-decreasing: a group is a run of words); query_ids:
    ``[n, q] int64`` the separator then the word's own token (last); suffix_ids: ``[s] int64`` the
    template's rest (``" has the first letter:"``); words; letter ``[n] int64`` (index into
    :data:`LETTERS`); test ``[n] bool``. Word i's SAEBench prompt is ``prefix_ids[prefix_of[i]]
    + query_ids[i] + suffix_ids`` (:meth:`full_ids`), its activation read at :attr:`word_pos`.
    """

    prefix_ids: np.ndarray
    prefix_of: np.ndarray
    query_ids: np.ndarray
    suffix_ids: np.ndarray
    words: list[str]
    letter: np.ndarray
    test: np.ndarray

    @property
    def word_pos(self) -> int:
        """Index of the query word's token in the full prompt."""
        return self.prefix_ids.shape[1] + self.query_ids.shape[1] - 1

    @property
    def prompt_len(self) -> int:
        """Tokens of a full prompt."""
        return self.word_pos + 1 + len(self.suffix_ids)

    def full_ids(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """``[len(rows), prompt_len] int64``: the full prompts of ``rows``."""
        prefix = self.prefix_ids[self.prefix_of[rows]]
        suffix = np.broadcast_to(self.suffix_ids, (len(prefix), len(self.suffix_ids)))
        return np.concatenate([prefix, self.query_ids[rows], suffix], axis=1)


def first_letter(word: str) -> str:
    """The answer SAEBench's ``first_letter_formatter`` gives: ``" " + first letter, upper``."""
    return " " + word.strip()[0].upper()


def _icl_groups(
    lo: int, hi: int, per_prefix: int, icl_examples: int, rng: np.random.Generator
) -> list[tuple[range, np.ndarray]]:
    """Words ``lo..hi`` (one split, in the draw's order) in runs of ``per_prefix``, each run with
    ``icl_examples`` example indices drawn uniformly without replacement from the split's other
    words (a draw of ``icl_examples + run`` indices, the run's own dropped, the first kept)."""
    out = []
    for g0 in range(lo, hi, per_prefix):
        group = range(g0, min(g0 + per_prefix, hi))
        draw = lo + rng.choice(hi - lo, min(hi - lo, icl_examples + len(group)), replace=False)
        out.append((group, draw[(draw < group.start) | (draw >= group.stop)][:icl_examples]))
    return out


def letter_prompts(
    tokenizer: Any,
    n_words: int | None,
    icl_examples: int,
    test_fraction: float,
    seed: int,
    per_prefix: int = 1,
) -> LetterPrompts:
    """``n_words`` single-token words (seeded draw from :func:`alpha_vocab`; None: all of them,
    shuffled), the last ``test_fraction`` of the draw as test words, one ICL prompt each, every
    ``per_prefix`` consecutive words of a split sharing their ``icl_examples`` examples (module
    docstring; 1: SAEBench's independent draw per word).

    Raises:
        ValueError: fewer than ``n_words`` alphabetic tokens, or a split too small for
            ``icl_examples`` examples besides a group.
    """
    vocab = alpha_vocab(tokenizer)
    n_words = len(vocab) if n_words is None else n_words
    if len(vocab) < n_words:
        raise ValueError(f"letter_prompts: only {len(vocab)} alphabetic tokens, {n_words} asked")
    rng = np.random.default_rng(seed)
    chosen = [vocab[i] for i in rng.choice(len(vocab), n_words, replace=False)]
    n_train = int(n_words * (1 - test_fraction))
    if min(n_train, n_words - n_train) < icl_examples + per_prefix:
        raise ValueError("letter_prompts: each split needs icl_examples + per_prefix words")

    def ids_of(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    sep, suffix = ids_of(EXAMPLE_SEPARATOR), ids_of(PROMPT_TEMPLATE.format(word=""))
    answer = {c: ids_of(" " + c.upper()) for c in LETTERS}
    prefixes, prefix_of = [], np.zeros(n_words, np.int64)
    for lo, hi in ((0, n_train), (n_train, n_words)):
        for group, examples in _icl_groups(lo, hi, per_prefix, icl_examples, rng):
            prompt: list[int] = []
            for j in examples:
                ex_tid, ex_word = chosen[j]
                prompt += sep + [ex_tid] + suffix + answer[first_letter(ex_word).strip().lower()]
            prefix_of[group.start : group.stop] = len(prefixes)
            prefixes.append(prompt)
    letter = np.array([LETTERS.index(first_letter(w).strip().lower()) for _, w in chosen])
    return LetterPrompts(
        prefix_ids=np.asarray(prefixes, dtype=np.int64),
        prefix_of=prefix_of,
        query_ids=np.asarray([sep + [tid] for tid, _ in chosen], dtype=np.int64),
        suffix_ids=np.asarray(suffix, dtype=np.int64),
        words=[w for _, w in chosen],
        letter=letter,
        test=np.arange(n_words) >= n_train,
    )


# --------------------------------------------------------------------------- probes (sklearn)


def fit_letter_probes(
    x_train: np.ndarray, letter: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest logistic regression per letter (scikit-learn, ``class_weight='balanced'``,
    C = 1) on ``x_train [n, d_in]`` float32 divided by its RMS row norm.

    Returns:
        (W ``[26, d_in] float32``, b ``[26] float32``): scores ``x @ W.T + b`` on raw activations
        (the scale folded in); a letter absent from the train words gets W = 0, b = -1.
    """
    from sklearn.linear_model import LogisticRegression

    scale = float(np.sqrt((x_train.astype(np.float64) ** 2).sum(1).mean()))
    xs = x_train / scale
    W = np.zeros((len(LETTERS), x_train.shape[1]), np.float32)
    b = np.full(len(LETTERS), -1.0, np.float32)
    for c in range(len(LETTERS)):
        y = letter == c
        if y.sum() == 0:
            continue
        lr = LogisticRegression(class_weight="balanced", max_iter=1000, random_state=seed)
        lr.fit(xs, y)
        W[c], b[c] = lr.coef_[0] / scale, lr.intercept_[0]
    return W, b


def f1_scores(scores: np.ndarray, letter: np.ndarray) -> np.ndarray:
    """Per-letter F1 of ``scores [n, 26] > 0`` against ``letter [n]`` (NaN: no positives)."""
    from sklearn.metrics import f1_score

    out = np.full(len(LETTERS), np.nan)
    for c in range(len(LETTERS)):
        if (letter == c).any():
            out[c] = f1_score(letter == c, scores[:, c] > 0, zero_division=0.0)
    return out


# --------------------------------------------------------------------------- model forward


@torch.inference_mode()
def capture_batched(
    model: nn.Module, cfg: ModelConfig, ids: np.ndarray, batch: int, pos: int | None = None
) -> np.ndarray:
    """Residual stream at the hookpoint for ``ids [n, seq]``: ``[n, seq, d_in]`` float32, or
    ``[n, d_in]`` at position ``pos`` only. Truncated forward (:func:`capture_resid`)."""
    from saelab.capture import capture_resid

    device = next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch):
        x = torch.from_numpy(ids[i : i + batch].astype(np.int64)).to(device)
        resid = capture_resid(model, cfg, x).float()
        out.append((resid if pos is None else resid[:, pos]).cpu().numpy())
    return np.concatenate(out)


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def capture_prefixed(
    model: nn.Module, cfg: ModelConfig, prompts: LetterPrompts, batch: int, query_rows: int = 256
) -> np.ndarray:
    """``[n_words, d_in]`` float32: the residual stream at the hookpoint at each word's token of
    its full prompt, computed once per shared prefix. Each batch of ``batch`` prefixes runs to the
    hookpoint filling a KV cache of the layers below it (a transformers ``DynamicCache``, sliding
    windows included); then ``query_rows`` words at a time run only their query tokens
    (separator + word) on a copy of the cache, its rows selected to their prefixes. Exact (up to
    float rounding) against :func:`capture_batched` on :meth:`LetterPrompts.full_ids` at
    ``word_pos``: a causal LM's activation at a position depends on that position and the ones
    before it only, and these are the same tokens at the same positions.
    """
    import copy

    from transformers import DynamicCache

    from saelab.capture import capture_resid

    device = next(model.parameters()).device
    key = _cache_kwarg(model)
    n_prefix = len(prompts.prefix_ids)
    starts = np.searchsorted(prompts.prefix_of, np.arange(n_prefix + 1))  # rows of each prefix
    out = []
    for p0 in range(0, n_prefix, batch):
        p1 = min(p0 + batch, n_prefix)
        cache = DynamicCache(config=model.config)
        ids = torch.from_numpy(prompts.prefix_ids[p0:p1]).to(device)
        capture_resid(model, cfg, ids, **{key: cache, "use_cache": True})
        for r0 in range(starts[p0], starts[p1], query_rows):
            r1 = min(r0 + query_rows, starts[p1])
            sub = copy.deepcopy(cache)  # the query's forward appends to it
            sub.batch_select_indices(torch.from_numpy(prompts.prefix_of[r0:r1] - p0).to(device))
            q = torch.from_numpy(prompts.query_ids[r0:r1]).to(device)
            resid = capture_resid(model, cfg, q, **{key: sub, "use_cache": True})
            out.append(resid[:, -1].float().cpu().numpy())
    return np.concatenate(out)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """``x`` float32 rounded to bfloat16 and back: the precision stored (as the activation cache
    stores its activations), so the ceiling probe sees what the SAE stages read back."""
    return torch.from_numpy(x).to(torch.bfloat16).float().numpy()


def pooling_mask(acts: np.ndarray, norm_factor: float | None, first: bool) -> np.ndarray:
    """``[n_ctx, ctx_len] bool``: tokens pooled into a context's features; position 0 dropped
    when ``first``, and tokens whose norm exceeds ``norm_factor`` x the median norm of the
    remaining tokens (None: no norm filter). acts: ``[n_ctx, ctx_len, d_in]``."""
    keep = np.ones(acts.shape[:2], bool)
    if first:
        keep[:, 0] = False
    if norm_factor is not None:
        norms = np.linalg.norm(acts, axis=-1)
        keep &= norms <= norm_factor * np.median(norms[keep])
    return keep


def mean_pool(acts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``[n_ctx, ctx_len, F]`` -> ``[n_ctx, F]``: mean over the kept tokens (SAEBench
    ``create_meaned_model_activations``/``get_sae_meaned_activations``)."""
    w = keep.astype(acts.dtype)
    return np.einsum("nt,ntf->nf", w, acts) / np.maximum(w.sum(1, keepdims=True), 1)


# --------------------------------------------------------------------------- the stage


def letter_probe_data(
    model: nn.Module, tokenizer: Any, cfg: PipelineConfig
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The first-letter half of ``probe_data``: the prompts (:func:`letter_prompts`), the word
    activations (:func:`capture_prefixed`), the letter probes and their test F1.

    Returns:
        (arrays: ``word_acts [n, d_in] float32``, ``word_letter [n]``, ``word_test [n] bool``,
        ``word_prefix [n]`` (each word's ICL group), ``letter_W [26, d_in]``, ``letter_b [26]``;
        attributes: words, positions, per-letter counts and probe F1, wall and CPU seconds).
    """
    p = cfg.structure
    wall, cpu = time.perf_counter(), time.process_time()
    prompts = letter_prompts(tokenizer, p.n_words, p.icl_examples, 0.2, p.seed, p.words_per_prefix)
    word_acts = capture_prefixed(model, cfg.model, prompts, cfg.cache.batch_size)
    t_fwd, c_fwd = time.perf_counter(), time.process_time()
    train, test = ~prompts.test, prompts.test
    W, b = fit_letter_probes(word_acts[train], prompts.letter[train], p.seed)
    f1 = f1_scores(word_acts[test] @ W.T + b, prompts.letter[test])
    arrays = {
        "word_acts": word_acts.astype(np.float32), "word_letter": prompts.letter,
        "word_test": prompts.test, "word_prefix": prompts.prefix_of,
        "letter_W": W, "letter_b": b,
    }  # fmt: skip
    attrs = {
        "words": prompts.words,
        "word_pos": prompts.word_pos,
        "prompt_len": prompts.prompt_len,
        "words_per_prefix": p.words_per_prefix,
        "letter_counts": {c: int((prompts.letter == i).sum()) for i, c in enumerate(LETTERS)},
        "letter_test_counts": {
            c: int((prompts.letter[test] == i).sum()) for i, c in enumerate(LETTERS)
        },
        "letter_probe_f1": [None if np.isnan(v) else float(v) for v in f1],
        "n_prompt_tokens": int(prompts.prefix_ids.size + prompts.query_ids.size),
        "seconds": {"prompts_forward": t_fwd - wall, "letter_probes": time.perf_counter() - t_fwd},
        "cpu_seconds": {
            "prompts_forward": c_fwd - cpu,
            "letter_probes": time.process_time() - c_fwd,
        },
    }
    return arrays, attrs


def write_probe_data(out: Path, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a ``probe_data`` group to ``out`` atomically: ``attrs`` as its attributes, each of
    ``arrays`` as an array; ``ctx_acts`` (float32) is stored as bfloat16 bits
    (``ctx_acts_bf16``, exact after :func:`bf16_round`)."""
    from saelab.store import atomic_dir

    with atomic_dir(out) as tmp:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
        for name, arr in arrays.items():
            if name == "ctx_acts":
                bits = torch.from_numpy(arr).to(torch.bfloat16).view(torch.uint16).numpy()
                group.create_array("ctx_acts_bf16", data=bits, chunks=(64, *bits.shape[1:]))
            else:
                group.create_array(name, data=arr)


def build_probe_data(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """The ``probe_data`` stage: run the model on the probe contexts and the letter prompts,
    fit the letter probes and the raw-activation ceiling probes, write everything to ``out``
    (a zarr group, atomically). Returns its attributes (also logged)."""
    from saelab.capture import load_model, load_tokenizer, resolve_device
    from saelab.data import _tokenize, read_corpus
    from saelab.structure import probe_tasks

    p = cfg.structure
    start, cpu = time.perf_counter(), time.process_time()
    tok = load_tokenizer(cfg.model)
    docs = read_corpus(cfg.data.corpus_dirs)
    ids = _tokenize([d.text for d in docs], tok)
    contexts, ctx_doc = sample_contexts(docs, ids, p.contexts_per_source, cfg.data.ctx_len)
    tasks = _tasks(docs, p, np.bincount(ctx_doc, minlength=len(docs)) > 0)
    model = load_model(cfg.model, resolve_device(cfg.model.device))
    t_model, c_model = time.perf_counter(), time.process_time()
    ctx_acts = bf16_round(capture_batched(model, cfg.model, contexts, cfg.cache.batch_size))
    keep = pooling_mask(ctx_acts, cfg.sae.exclude_norm_factor, cfg.sae.exclude_first_position)
    ceiling = probe_tasks(mean_pool(ctx_acts, keep), ctx_doc, tasks, None, p, scale=True)
    t_ctx, c_ctx = time.perf_counter(), time.process_time()
    arrays, attrs = letter_probe_data(model, tok, cfg)
    attrs = {
        "documents": [d.key for d in docs],
        "tasks": {t.name: t.to_json() for t in tasks},
        **attrs,
        "raw_probe": ceiling,
        "hookpoint": cfg.model.hookpoint,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": {"load": t_model - start, "contexts": t_ctx - t_model, **attrs["seconds"]},
        "cpu_seconds": {"load": c_model - cpu, "contexts": c_ctx - c_model, **attrs["cpu_seconds"]},
        "n_ctx_tokens": int(contexts.size),
    }
    arrays = {
        "ctx_acts": ctx_acts,
        "ctx_keep": keep,
        "ctx_doc": ctx_doc,
        "ctx_ids": contexts,
        **arrays,
    }
    write_probe_data(out, attrs, arrays)
    log.info("probe data: %s", {k: attrs[k] for k in ("seconds", "cpu_seconds", "raw_probe")})
    return attrs


@dataclass(frozen=True)
class ProbeData:
    """The arrays of a ``probe_data`` group (see :func:`build_probe_data`), read into memory."""

    ctx_acts: np.ndarray  # [n_ctx, ctx_len, d_in] float32
    ctx_keep: np.ndarray  # [n_ctx, ctx_len] bool
    ctx_doc: np.ndarray  # [n_ctx] int32
    tasks: list[ProbeTask]
    word_acts: np.ndarray  # [n_words, d_in] float32
    word_letter: np.ndarray  # [n_words] int
    word_test: np.ndarray  # [n_words] bool
    letter_W: np.ndarray  # [26, d_in] float32
    letter_b: np.ndarray  # [26] float32
    letter_f1: np.ndarray  # [26] float (NaN: no test word)
    attrs: dict[str, Any]


def read_probe_data(path: str | Path) -> ProbeData:
    """Read a group written by :func:`build_probe_data`.

    Raises:
        FileNotFoundError: no zarr group at ``path``.
    """
    g = zarr.open_group(str(path), mode="r")
    attrs = dict(g.attrs)
    bits = torch.from_numpy(np.asarray(g["ctx_acts_bf16"][:]))
    return ProbeData(
        ctx_acts=bits.view(torch.bfloat16).float().numpy(),
        ctx_keep=np.asarray(g["ctx_keep"][:]),
        ctx_doc=np.asarray(g["ctx_doc"][:]),
        tasks=[ProbeTask.from_json(n, d) for n, d in attrs["tasks"].items()],
        word_acts=np.asarray(g["word_acts"][:]),
        word_letter=np.asarray(g["word_letter"][:]),
        word_test=np.asarray(g["word_test"][:]),
        letter_W=np.asarray(g["letter_W"][:]),
        letter_b=np.asarray(g["letter_b"][:]),
        letter_f1=np.array([np.nan if v is None else v for v in attrs["letter_probe_f1"]]),
        attrs=attrs,
    )
