"""probes.py / structure.py: known answers on synthetic data (planted features, a planted
absorption, a random SAE), the document split, the pooling and the sharing figures."""

import math

import numpy as np
import pytest
import torch

from saelab.config import StructureConfig
from saelab.data import Document
from saelab.probes import (
    LETTERS,
    ProbeData,
    ProbeTask,
    context_windows,
    make_task,
    mean_pool,
    pooling_mask,
)
from saelab.sae import SparseAutoencoder, build_sae, make_activation
from saelab.structure import (
    absorption_metrics,
    probe_tasks,
    sharing_metrics,
    top_k_mean_diff,
    word_absorption,
)

P = StructureConfig(
    contexts_per_source=8, min_docs_per_class=3, min_docs_per_decade=3, n_folds=3,
    ks=(1, 2), random_draws=3, n_words=200, words_per_prefix=1, icl_examples=2, max_k=3,
    f1_jump_threshold=0.03,
    l1_decay=0.01, min_probe_f1=0.6, n_bootstrap=200, seed=0,
)  # fmt: skip


def _task(n_docs_per_class: int, n_classes: int = 2, n_folds: int = 3) -> ProbeTask:
    label = np.repeat(np.arange(n_classes), n_docs_per_class)
    fold = np.tile(np.arange(n_docs_per_class) % n_folds, n_classes)
    return ProbeTask("source", tuple(f"c{i}" for i in range(n_classes)), label, fold, n_folds)


def test_planted_feature_k1_probe_is_perfect_and_random_latents_are_chance() -> None:
    """Feature 7 = 5 * class + N(0, 0.1), 199 others N(0, 1) independent of the class: the
    k = 1 probe picks feature 7 on every fold and classifies every held-out document's
    contexts correctly (accuracy exactly 1, interval [1, 1]); k random latents of 200 almost
    never include it: balanced accuracy near 0.5."""
    rng = np.random.default_rng(0)
    task = _task(12)
    ctx_doc = np.repeat(np.arange(24), 6)  # 6 contexts per document
    y = task.label[ctx_doc]
    feats = rng.normal(size=(len(ctx_doc), 200))
    feats[:, 7] = 5.0 * y + rng.normal(scale=0.1, size=len(ctx_doc))
    out = probe_tasks(feats, ctx_doc, [task], (1,), P)
    assert out["sp_source_k1"] == 1.0
    assert (out["sp_source_k1_ci_low"], out["sp_source_k1_ci_high"]) == (1.0, 1.0)
    assert abs(out["sp_source_random_k1"] - 0.5) < 0.15
    assert out["sp_source_random_k1_ci_low"] < 0.5 < out["sp_source_random_k1_ci_high"] + 0.1


def test_top_k_mean_diff_ranks_by_absolute_difference() -> None:
    """Class means differ by +3 on feature 2, -5 on feature 0, 0 elsewhere: order 0, 2."""
    x = np.zeros((4, 4))
    x[:2, 2], x[:2, 0] = 3.0, -5.0
    assert top_k_mean_diff(x, np.array([True, True, False, False]), 2).tolist() == [0, 2]


def test_folds_split_by_document_and_stratify() -> None:
    """Every document is in one fold; each class's 3 documents fill the 3 folds; a label the
    task does not cover is -1."""
    docs = [Document("gutenberg", f"{a}-{i}.txt", "x", "utf-8") for a in "abc" for i in range(3)]
    docs.append(Document("gutenberg", "solo-1.txt", "x", "utf-8"))
    task = make_task(docs, "author", min_docs=3, n_folds=5, seed=0)
    assert task.classes == ("a", "b", "c") and task.n_folds == 3
    assert task.label[-1] == -1 and task.fold[-1] == -1
    for c in range(3):
        assert sorted(task.fold[task.label == c]) == [0, 1, 2]
    usable = [True] * len(docs)
    usable[0] = False  # a document that gave no context: unlabelled, and class a drops to 2
    task = make_task(docs, "author", min_docs=2, n_folds=5, seed=0, usable=usable)
    assert task.label[0] == -1 and task.fold[0] == -1 and task.n_folds == 2


def test_context_windows_and_pooling() -> None:
    """Windows are disjoint, inside the document and evenly spread; the pooled mean skips
    position 0 and the token above 10 x the median norm."""
    assert context_windows(1000, 3, 100) == [0, 450, 900]
    assert context_windows(150, 3, 100) == [0]
    assert context_windows(50, 3, 100) == []
    acts = np.ones((1, 4, 2), np.float32)
    acts[0, 0] = 1000.0  # sink at position 0
    acts[0, 3] = [100.0, 100.0]  # massive activation later
    acts[0, 2] = [3.0, 3.0]
    keep = pooling_mask(acts, 10.0, first=True)
    assert keep.tolist() == [[False, True, True, False]]
    assert mean_pool(acts, keep).tolist() == [[2.0, 2.0]]


# --------------------------------------------------------------------------- absorption

D_IN, N_TRAIN_S, N_TRAIN_O, N_TEST_S, N_TEST_O = 64, 20, 20, 4, 4


def _letter_data() -> tuple[ProbeData, int]:
    """Words as residuals ``x = e_0 + e_w`` (starts with S) or ``e_w`` (other letters), each
    word its own direction e_w; the S probe is ``e_0 . x - 0.5``. The last test S word is the
    absorbed one. Returns the data and the absorbed word's index."""
    n = N_TRAIN_S + N_TRAIN_O + N_TEST_S + N_TEST_O
    x = np.zeros((n, D_IN), np.float32)
    x[np.arange(n), 1 + np.arange(n)] = 1.0
    s = LETTERS.index("s")
    letter = np.full(n, LETTERS.index("t"))
    starts_s = np.r_[np.arange(N_TRAIN_S), N_TRAIN_S + N_TRAIN_O + np.arange(N_TEST_S)]
    letter[starts_s] = s
    x[starts_s, 0] = 1.0
    W, b = np.zeros((26, D_IN), np.float32), np.full(26, -0.5, np.float32)
    W[s, 0] = 1.0
    f1 = np.full(26, np.nan)
    f1[s] = 1.0  # only the S probe is good enough to be scored
    test = np.arange(n) >= N_TRAIN_S + N_TRAIN_O
    data = ProbeData(
        ctx_acts=np.zeros((0, 1, D_IN)), ctx_keep=np.zeros((0, 1), bool), ctx_doc=np.zeros(0),
        tasks=[], word_acts=x, word_letter=letter, word_test=test, letter_W=W, letter_b=b,
        letter_f1=f1, attrs={},
    )  # fmt: skip
    return data, N_TRAIN_S + N_TRAIN_O + N_TEST_S - 1


def _absorbing_sae(absorbed: int, n_words: int) -> SparseAutoencoder:
    """ReLU SAE: latent 0 'starts with S' (encoder e_0 - 10 e_absorbed, decoder e_0), latent
    1 + w the word w's own (encoder e_w; the absorbed word's decoder (e_0 + e_w)/sqrt 2, so it
    carries the S direction; the others' e_w)."""
    sae = SparseAutoencoder(D_IN, 1 + n_words, make_activation("relu", 1, l1_coef=0.0,
                                                                init_b_enc="zero"))  # fmt: skip
    W_enc = torch.zeros(D_IN, 1 + n_words)
    W_dec = torch.zeros(1 + n_words, D_IN)
    W_enc[0, 0], W_enc[1 + absorbed, 0], W_dec[0, 0] = 1.0, -10.0, 1.0
    for w in range(n_words):
        W_enc[1 + w, 1 + w] = 1.0
        W_dec[1 + w, 1 + w] = 1.0
    W_dec[1 + absorbed, 0] = 1.0
    W_dec[1 + absorbed] /= math.sqrt(2)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
    return sae.eval()


def test_planted_absorption_is_scored_absorbed() -> None:
    """The S latent does not fire on the absorbed word, whose own latent carries the S
    direction (cos 0.71, projection 0.71 of x . p = 1): absorption fraction 1 and full
    absorption for that word, 0 for the other S words; so the letter's rates are 1/4 (4 test
    S words, all probe true positives) and the main latent is the S latent alone."""
    data, absorbed = _letter_data()
    sae = _absorbing_sae(absorbed, len(data.word_acts))
    codes = sae.encode(torch.from_numpy(data.word_acts)).detach().numpy()
    direction = np.eye(D_IN)[0]
    dec = sae.W_dec.detach().numpy()
    dec_proj = dec @ direction
    cos = dec_proj / np.linalg.norm(dec, axis=1)
    assert word_absorption(codes[absorbed], 1.0, dec_proj, cos, [0]) == (1.0, True)
    assert word_absorption(codes[absorbed - 1], 1.0, dec_proj, cos, [0]) == (0.0, False)
    assert word_absorption(codes[absorbed], -1.0, dec_proj, cos, [0]) == (0.0, False)  # x.p < 0
    m = absorption_metrics(sae, data, P)
    assert m["absorption_letters"] == 1 and m["absorption_main_latents"] == 1
    assert m["absorption_fraction"] == pytest.approx(0.25)
    assert m["full_absorption_rate"] == pytest.approx(0.25)
    assert m["absorption_fraction_ci_low"] <= 0.25 <= m["absorption_fraction_ci_high"]


def test_random_sae_shows_no_absorption() -> None:
    """A random TopK SAE's decoder rows are nearly orthogonal to the S direction (|cos| ~ 1/8
    in 64 dims) and its codes small: no latent carries 0.4 of the probe projection, so both
    rates are 0 on the same words."""
    data, _ = _letter_data()
    sae = build_sae("topk", D_IN, 49, 4, {}, generator=torch.Generator().manual_seed(0)).eval()
    m = absorption_metrics(sae, data, P)
    assert m["absorption_fraction"] == 0.0
    assert m["full_absorption_rate"] == 0.0


# --------------------------------------------------------------------------- feature sharing


def test_sharing_known_answer() -> None:
    """Identity ReLU SAE on one-hot rows. Batch 1: e0, e0, e1; batch 2: e2, e3. Distinct latents
    2 and 2; pool of 1 latent: mass shares 2/3 and 1/2; usage counts (2, 1, 1, 1) -> entropy
    -(0.4 ln 0.4 + 3 * 0.2 ln 0.2)."""
    sae = SparseAutoencoder(4, 4, make_activation("relu", 1, l1_coef=0.0, init_b_enc="zero"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    eye = torch.eye(4)
    batches = [(eye[[0, 0, 1]], torch.tensor([0, 0, 1])), (eye[[2, 3]], torch.tensor([2, 2]))]
    m = sharing_metrics(sae, batches, n_ctx=3, pool=1, p=P)
    entropy = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))
    for mode in ("train", "eval"):
        assert m[f"sharing_{mode}_distinct_latents"] == 2.0
        assert m[f"sharing_{mode}_pool_mass_share"] == pytest.approx((2 / 3 + 1 / 2) / 2)
        assert m[f"sharing_{mode}_usage_entropy"] == pytest.approx(entropy)
        assert m[f"sharing_{mode}_usage_entropy_norm"] == pytest.approx(entropy / math.log(4))


def test_sharing_batchtopk_train_mode_uses_the_batch_rule() -> None:
    """BatchTopK (k = 1) with θ = 0 at inference: in eval mode every positive latent fires (4
    distinct on a batch of 2 rows with all-positive codes), in train mode only the batch's
    k * batch = 2 largest entries (at most 2 distinct)."""
    sae = SparseAutoencoder(4, 4, make_activation("batchtopk", 1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 5.0]])
    m = sharing_metrics(sae.eval(), [(x, torch.tensor([0, 0]))], n_ctx=1, pool=4, p=P)
    assert m["sharing_eval_distinct_latents"] == 4.0
    assert m["sharing_train_distinct_latents"] == 2.0
    assert not sae.training


# --------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def structure_run(
    tmp_path_factory, tiny_llama_dir, tiny_corpus_module, make_tiny_params, one_thread_module
):
    """prepare -> cache -> train (topk, sampled) -> probe-data -> structure on the tiny Llama."""
    import yaml

    from saelab.cli import main

    root = tmp_path_factory.mktemp("structure")
    tiny = make_tiny_params(tiny_llama_dir, tiny_corpus_module, f"sqlite:///{root / 'mlflow.db'}")
    tiny["structure"].update(min_probe_f1=0.0)  # a random model's letter probes are poor
    tiny["variant_params"]["sampled"]["l"] = 4
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = lambda *a: main([str(x) for x in a])  # noqa: E731
        run("prepare", "--params", params, "--out", "data/tokens")
        run("cache", "--params", params, "--tokens", "data/tokens", "--out", "data/activations")
        run("probe-data", "--params", params, "--out", "data/probes")
        for v in ("topk", "sampled"):
            run("train", "--params", params, "--variant", v, "--activations", "data/activations",
                "--out", f"models/{v}")  # fmt: skip
            run("structure", "--params", params, "--variant", v, "--probes", "data/probes",
                "--activations", "data/activations", "--sae", f"models/{v}",
                "--out", f"metrics/structure/{v}.json")  # fmt: skip
    return root


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["topk", "sampled"])
def test_structure_stage_writes_every_metric(structure_run, variant) -> None:
    """The tiny corpus (speeches + wikitext) supports the source task only; every metric is
    written, accuracies and rates in [0, 1] with lo <= value <= hi; Sampled in train mode puts
    all its mass in its pool of k*l latents."""
    import json

    m = json.loads((structure_run / f"metrics/structure/{variant}.json").read_text())
    for key in ("sp_source_raw", "sp_source_k1", "sp_source_k2", "sp_source_random_k1"):
        assert 0.0 <= m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"] <= 1.0
    assert "sp_author_k1" not in m and "sp_decade_k1" not in m
    for mode in ("train", "eval"):
        assert 0 < m[f"sharing_{mode}_distinct_latents"] <= 128
        assert 0 < m[f"sharing_{mode}_usage_entropy"] <= math.log(128)
    if variant == "sampled":
        assert m["sharing_train_pool_mass_share"] == pytest.approx(1.0)
        assert m["sharing_train_distinct_latents"] <= m["sharing_pool_size"] == 8 * 4
    assert m["absorption_letters"] >= 1
    assert 0.0 <= m["absorption_fraction"] <= 1.0


@pytest.mark.slow
def test_probe_data_stage_records_icl_groups_and_letter_counts(structure_run) -> None:
    """probe_data writes each word's ICL group (runs of words_per_prefix = 4 words), the per-letter
    word counts of the draw (summing to n_words = 120), the LM dtype and the CPU seconds."""
    import zarr

    from saelab.probes import read_probe_data

    data = read_probe_data(structure_run / "data/probes")
    prefix = np.asarray(zarr.open_group(str(structure_run / "data/probes"))["word_prefix"][:])
    assert np.bincount(prefix).max() == 4 and (np.diff(prefix) >= 0).all()
    counts = data.attrs["letter_counts"]
    assert sum(counts.values()) == len(data.word_letter) == 120
    assert [counts[c] for c in "abcdefghijklmnopqrstuvwxyz"] == np.bincount(
        data.word_letter, minlength=26
    ).tolist()
    assert data.attrs["model_dtype"] == "float32"
    phases = {"load", "contexts", "prompts_forward", "letter_probes"}
    assert phases <= set(data.attrs["cpu_seconds"])
