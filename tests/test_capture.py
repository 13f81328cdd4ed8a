"""capture.py: hooks read the residual stream at the hookpoint, run only the layers up to it, and
replace it exactly when splicing."""

import pytest
import torch

from saelab.capture import (
    capture_resid,
    decoder_layers,
    hook_resid,
    load_model,
    splice_fn,
)
from saelab.config import ConfigError
from tests.model_config import cpu_model_config


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tiny_llama_dir, tiny_gpt2_dir):
    model_dir = tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir
    cfg = cpu_model_config(model_dir, "blocks.2.hook_resid_pre")
    return cfg, load_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(1, 49152, (3, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("site", "offset"), [("resid_pre", 0), ("resid_post", 1)])
def test_capture_matches_hidden_states(tiny, ids, site: str, offset: int) -> None:
    """resid_pre of layer L is hidden_states[L] (the input of layer L), resid_post is
    hidden_states[L + 1], as transformers reports them from a full forward."""
    cfg, model = tiny
    cfg = cfg.model_copy(update={"hookpoint": f"blocks.1.hook_{site}"})
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(capture_resid(model, cfg, ids), hidden[1 + offset])


def test_capture_runs_no_layer_after_the_hook(tiny, ids) -> None:
    """Layers after the hookpoint and the output head never run during capture."""
    cfg, model = tiny
    layers = decoder_layers(model)
    called = []
    handles = [layers[i].register_forward_hook(lambda *_, i=i: called.append(i)) for i in range(4)]
    handles.append(
        model.get_output_embeddings().register_forward_hook(lambda *_: called.append(-1))
    )
    try:
        capture_resid(model, cfg, ids)  # blocks.2.hook_resid_pre: layers 0 and 1 only
    finally:
        for h in handles:
            h.remove()
    assert called == [0, 1]


def test_identity_splice_gives_exactly_the_clean_loss(tiny, ids) -> None:
    """Replacing the activation by itself (cast to float32 and back) changes no logit."""
    cfg, model = tiny
    with torch.no_grad():
        clean = model(input_ids=ids, labels=ids).loss
        with hook_resid(model, cfg, splice_fn(lambda x: x, skip_first_position=True)):
            spliced = model(input_ids=ids, labels=ids).loss
    assert spliced.item() == clean.item()


def test_splice_leaves_position_zero_and_sinks_untouched(tiny, ids) -> None:
    """With skip_first_position, position 0 keeps its activation; with max_norm, tokens above it
    keep theirs too; every other position gets the replacement."""
    cfg, model = tiny
    resid = capture_resid(model, cfg, ids).clone()
    resid[1, 5] *= 1000.0  # a massive-activation token
    max_norm = resid[:, 1:].norm(dim=-1).median().item() * 10
    out = splice_fn(torch.zeros_like, True, max_norm)(resid)
    torch.testing.assert_close(out[:, 0], resid[:, 0])
    torch.testing.assert_close(out[1, 5], resid[1, 5])
    keep = torch.ones(3, 16, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 5] = False
    assert (out[keep] == 0).all()


def test_hooks_are_removed_after_an_error(tiny, ids) -> None:
    """An exception inside the hooked block leaves no hook behind."""
    cfg, model = tiny
    layer = decoder_layers(model)[2]
    before = len(layer._forward_pre_hooks)
    with pytest.raises(RuntimeError), hook_resid(model, cfg, lambda x: None):
        raise RuntimeError("boom")
    assert len(layer._forward_pre_hooks) == before


def test_layer_out_of_range_is_a_config_error(tiny_llama_dir) -> None:
    """blocks.4 of a 4-layer model: ConfigError listing L in [0, 3]."""
    with pytest.raises(ConfigError, match=r"L in \[0, 3\]"):
        cfg = cpu_model_config(tiny_llama_dir, "blocks.4.hook_resid_post")
        load_model(cfg, torch.device("cpu"))
