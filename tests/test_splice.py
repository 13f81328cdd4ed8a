"""splice.py: the suffix after the hookpoint gives the logits of the full spliced forward."""

import pytest
import torch

import saelab.splice
from saelab.capture import decoder_layers, hook_resid, load_model, splice_fn
from saelab.config import ConfigError
from saelab.splice import (
    SuffixRunner,
    clean_forward,
    final_logit_softcap,
    run_calls,
    run_suffix,
)
from tests.model_config import cpu_model_config

HOOKPOINTS = (
    "blocks.0.hook_resid_pre",
    "blocks.2.hook_resid_pre",
    "blocks.1.hook_resid_post",
    "blocks.3.hook_resid_post",  # the last layer's output: only the final norm and lm_head run
)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def tiny_model(request, one_thread_module):
    """(model directory, loaded model) for each tiny architecture."""
    model_dir = request.getfixturevalue(f"tiny_{request.param}_dir")
    cfg = cpu_model_config(model_dir, HOOKPOINTS[0])
    return model_dir, load_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, 49152, (3, 20), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def full_spliced_logits(model, cfg, fn, ids) -> torch.Tensor:
    """The reference: one full forward with ``fn`` replacing the activation via hook_resid."""
    with hook_resid(model, cfg, fn):
        return model(input_ids=ids).logits


@pytest.mark.parametrize("hookpoint", HOOKPOINTS)
def test_suffix_matches_the_full_spliced_forward(tiny_model, ids, hookpoint) -> None:
    """A non-trivial replacement (x/2 + 0.1, position 0 kept) spliced in through the suffix gives
    the logits of the full forward with the hook, to float32 rounding; it really changes them."""
    model_dir, model = tiny_model
    cfg = cpu_model_config(model_dir, hookpoint)
    fn = splice_fn(lambda x: x * 0.5 + 0.1, skip_first_position=True)
    clean, suffix = clean_forward(model, cfg, ids)
    ref = full_spliced_logits(model, cfg, fn, ids)
    torch.testing.assert_close(run_suffix(suffix, fn(suffix.resid)), ref, rtol=1e-5, atol=1e-5)
    assert (ref - clean).abs().max() > 1e-3


@pytest.mark.parametrize("hookpoint", HOOKPOINTS)
def test_clean_pass_and_identity_suffix_give_the_clean_logits(tiny_model, ids, hookpoint) -> None:
    """The recording pass returns the model's own logits, and running the suffix on the
    recorded residual stream reproduces them exactly (same ops on the same inputs)."""
    model_dir, model = tiny_model
    clean, suffix = clean_forward(model, cpu_model_config(model_dir, hookpoint), ids)
    with torch.inference_mode():
        assert torch.equal(clean, model(input_ids=ids).logits)
    assert torch.equal(run_suffix(suffix, suffix.resid), clean)


@pytest.mark.parametrize(("hookpoint", "start"), [(HOOKPOINTS[1], 2), (HOOKPOINTS[2], 2),
                                                  (HOOKPOINTS[3], 4)])  # fmt: skip
def test_suffix_runs_only_the_layers_after_the_hookpoint(tiny_model, ids, hookpoint, start):
    """Counting decoder-layer calls: run_suffix calls layers start..3 once each and none before
    (start = L for resid_pre, L + 1 for resid_post; 4 = no layer for the last resid_post)."""
    model_dir, model = tiny_model
    _, suffix = clean_forward(model, cpu_model_config(model_dir, hookpoint), ids)
    layers = decoder_layers(model)
    counts = [0] * len(layers)
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        run_suffix(suffix, suffix.resid)
    finally:
        for handle in handles:
            handle.remove()
    assert counts == [0] * start + [1] * (len(layers) - start)


def test_a_transformation_between_layers_is_refused(tiny_model, ids) -> None:
    """A model that scales the residual stream between layers 2 and 3 (here a pre-hook on
    layer 3, registered before the recording hooks) cannot be replayed by the suffix alone:
    clean_forward raises instead of returning logits that would skip the scaling."""
    model_dir, model = tiny_model
    handle = decoder_layers(model)[3].register_forward_pre_hook(
        lambda _m, args: (args[0] * 2, *args[1:])
    )
    try:
        with pytest.raises(ValueError, match="did not receive the output"):
            clean_forward(model, cpu_model_config(model_dir, HOOKPOINTS[1]), ids)
    finally:
        handle.remove()


def test_resid_shape_must_match(tiny_model, ids) -> None:
    """A replacement of another shape is an error, not a broadcast."""
    model_dir, model = tiny_model
    _, suffix = clean_forward(model, cpu_model_config(model_dir, HOOKPOINTS[1]), ids)
    with pytest.raises(ValueError, match="shape"):
        run_suffix(suffix, suffix.resid[:, 1:])


def test_a_logit_transform_after_the_head_is_refused(tiny_model, ids) -> None:
    """A model whose returned logits are not its LM head's output (here a forward hook on the
    whole model doubling them, the shape of e.g. Cohere's logit_scale) fails in the clean pass
    with one ConfigError naming the model param, instead of a suffix giving the raw head."""
    model_dir, model = tiny_model

    def double_logits(_module, _args, output):
        output.logits = output.logits * 2
        return output

    handle = model.register_forward_hook(double_logits)
    try:
        with pytest.raises(ConfigError, match=r"^params: model\.name_or_path must be a model "):
            clean_forward(model, cpu_model_config(model_dir, HOOKPOINTS[1]), ids)
    finally:
        handle.remove()


def test_gemma2_softcap_is_replayed_and_changes_the_logits(tiny_gemma2_dir, ids) -> None:
    """Gemma 2's final logit soft-capping (c = 1 in the tiny model) is recorded with the head's
    call: every replay (all calls, or the head alone on the final norm's output) applies
    c·tanh(z/c), giving the model's own logits bit for bit, while the raw head output differs
    from them by far more than rounding (what the suffix returned before it was applied)."""
    cfg = cpu_model_config(tiny_gemma2_dir, HOOKPOINTS[1])
    model = load_model(cfg, torch.device("cpu"))
    assert final_logit_softcap(model) == 1.0
    clean, suffix = clean_forward(model, cfg, ids)
    assert suffix.calls[-1].softcap == 1.0
    assert all(call.softcap is None for call in suffix.calls[:-1])
    assert clean.abs().max() <= 1.0  # capped
    assert torch.equal(run_suffix(suffix, suffix.resid), clean)
    raw = run_calls(suffix.calls[:-1], suffix.resid)
    head = suffix.calls[-1]
    raw_logits = head.module(raw, *head.args, **head.kwargs)
    assert (raw_logits - clean).abs().max() > 0.1
    runner = SuffixRunner(model, cfg)
    runner.prepare(ids)
    final = runner.final_hidden(ids.shape, suffix.resid)
    assert torch.equal(runner.head(ids.shape, final), clean)


def test_gemma2_without_the_softcap_replay_is_refused(tiny_gemma2_dir, ids, monkeypatch) -> None:
    """Were the soft-capping not known (final_logit_softcap returning None), the clean pass
    would see the head's raw output differ from the model's logits and refuse the model."""
    cfg = cpu_model_config(tiny_gemma2_dir, HOOKPOINTS[1])
    model = load_model(cfg, torch.device("cpu"))
    monkeypatch.setattr(saelab.splice, "final_logit_softcap", lambda _model: None)
    with pytest.raises(ConfigError, match="GemmaForCausalLM|Gemma2ForCausalLM"):
        clean_forward(model, cfg, ids)
