"""First-letter prompts (saelab.probes): shared ICL prefixes and their KV-cached forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.capture import load_model, load_tokenizer
from saelab.probes import alpha_vocab, capture_batched, capture_prefixed, letter_prompts
from tests.model_config import cpu_model_config


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return load_tokenizer(cpu_model_config(tiny_llama_dir))


def test_groups_share_examples_from_their_own_split_and_never_themselves(tokenizer) -> None:
    """Every word's prefix holds icl_examples examples of its own split, none of its group; the
    groups are runs of per_prefix words (the last one shorter), words distinct."""
    p = letter_prompts(tokenizer, 230, 3, 0.2, seed=1, per_prefix=7)
    n_train = int(230 * 0.8)
    assert p.test.sum() == 230 - n_train and not p.test[:n_train].any()
    assert len(set(p.words)) == 230
    sizes = np.bincount(p.prefix_of)
    assert sizes.max() == 7 and (np.diff(p.prefix_of) >= 0).all()
    word_tok = p.query_ids[:, -1]
    tok_split = dict(zip(word_tok.tolist(), p.test.tolist(), strict=True))
    example_len = (p.prefix_ids.shape[1]) // 3
    for g in range(len(p.prefix_ids)):
        group = np.flatnonzero(p.prefix_of == g)
        # the example word is the token after each separator (position 0 of each example)
        examples = p.prefix_ids[g, 1::example_len][:3] if example_len else []
        assert len(set(examples.tolist())) == 3
        assert not set(examples.tolist()) & set(word_tok[group].tolist())
        assert {tok_split[t] for t in examples.tolist()} == {bool(p.test[group[0]])}
    full = p.full_ids(np.arange(5))
    assert full.shape == (5, p.prompt_len)
    assert (full[:, p.word_pos] == word_tok[:5]).all()


def test_whole_vocabulary_when_n_words_is_none(tokenizer) -> None:
    p = letter_prompts(tokenizer, None, 2, 0.2, seed=0, per_prefix=512)
    assert len(p.words) == len(alpha_vocab(tokenizer))
    assert np.bincount(p.letter, minlength=26).sum() == len(p.words)


def test_groups_too_big_for_a_split_raise(tokenizer) -> None:
    with pytest.raises(ValueError, match="icl_examples \\+ per_prefix"):
        letter_prompts(tokenizer, 100, 3, 0.2, seed=0, per_prefix=18)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_prefixed_forward_equals_the_full_prompt_forward(arch, request) -> None:
    """The KV-cached path (prefix once, then separator + word per word) gives the activation of
    the straightforward forward of each full SAEBench prompt at the word's token, for query
    chunks that cross group boundaries; Gemma 2's sliding window (8) is shorter than the prompt."""
    cfg = cpu_model_config(request.getfixturevalue(f"tiny_{arch}_dir"))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, torch.device("cpu"))
    prompts = letter_prompts(tok, 90, 3, 0.2, seed=0, per_prefix=5)
    fast = capture_prefixed(model, cfg, prompts, batch=3, query_rows=7)
    slow = capture_batched(model, cfg, prompts.full_ids(), 16, prompts.word_pos)
    assert fast.shape == slow.shape == (90, model.config.get_text_config().hidden_size)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
    other = letter_prompts(tok, 90, 3, 0.2, seed=1, per_prefix=5)  # other examples: differs
    assert not np.allclose(capture_prefixed(model, cfg, other, batch=3), fast, atol=1e-3)
