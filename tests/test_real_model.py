"""The real thing: SmolLM2-135M-Instruct (GGUF) from ../shared on real eval text.

Loads the model once (~30 s on 2 cores). Runs in CI too (marked slow only for selection).
"""

import pytest
import torch

from saelab.capture import capture_resid, load_model, load_tokenizer
from saelab.data import pack_contexts, read_corpus
from saelab.evaluate import downstream_metrics
from tests.model_config import cpu_model_config

from .conftest import CORPUS_DIR, SMOLLM2_DIR, SMOLLM2_GGUF

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SMOLLM2_DIR / SMOLLM2_GGUF).is_file(), reason="../shared absent"),
]


@pytest.fixture(scope="module")
def smollm2():
    cfg = cpu_model_config(SMOLLM2_DIR, "blocks.15.hook_resid_pre", gguf_file=SMOLLM2_GGUF)
    return cfg, load_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def real_contexts(smollm2) -> torch.Tensor:
    """8 contexts of 128 tokens: 4 from a wikitext-2 article, 4 from a State of the Union."""
    docs = read_corpus([CORPUS_DIR / "wikitext-2", CORPUS_DIR / "us-speeches"])
    tokenizer = load_tokenizer(smollm2[0])
    picked = [next(d for d in docs if d.source == s) for s in ("wikitext-2", "us-speeches")]
    ctx = [torch.from_numpy(pack_contexts([d], tokenizer, 128)[:4]) for d in picked]
    return torch.cat(ctx).long()


def test_clean_ce_is_that_of_a_trained_model_and_identity_splice_reproduces_it(
    smollm2, real_contexts
) -> None:
    """Clean next-token CE lands where ../shared/data/README.md says (3-5 nats/token; a random
    model scores ln 49152 = 10.8), and splicing the activation back in at layer 15 reproduces
    it exactly, with zero KL."""
    cfg, model = smollm2
    m = downstream_metrics(model, cfg, lambda x: x, real_contexts, 4, skip_first_position=True)
    assert 3.0 < m["ce_clean"] < 5.0
    assert m["ce_spliced"] == m["ce_clean"]
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_zero_ablated"] > m["ce_clean"] + 1.0  # layer 15 matters


def test_position_zero_is_an_attention_sink(smollm2, real_contexts) -> None:
    """The residual norm at position 0 is > 50x the median of the other positions at layer 15
    (measured ~24,000 vs ~150): the reason position 0 is excluded by default."""
    cfg, model = smollm2
    norms = capture_resid(model, cfg, real_contexts).norm(dim=-1)  # [8, 128]
    assert (norms[:, 0] > 50 * norms[:, 1:].median()).all()
