"""Specifications of the Matryoshka BatchTopK SAE (saelab.sae.matryoshka): known answers against
BatchTopK and a straightforward loop over the prefixes (CPU, seeded, tiny synthetic data)."""

import pytest
import torch

from saelab.config import ConfigError, parse_params
from saelab.sae import build_sae, load_sae, registry
from saelab.sae.matryoshka import MatryoshkaBatchTopK, MatryoshkaSAE, prefix_widths
from saelab.train import fvu, train_sae, train_step
from tests.test_train import CPU, RecordingTracker, make_cfg, synthetic_batches

FRACTIONS = [0.125, 0.25, 0.5, 1.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models run as fast on one thread, and far faster on a machine shared with others."""


def _sae(fractions=FRACTIONS, seed: int = 0, d_in: int = 32, d_sae: int = 96, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    return build_sae("matryoshka", d_in, d_sae, k, {"prefix_fractions": fractions}, gen)


def _loop_loss(sae: MatryoshkaSAE, x: torch.Tensor) -> torch.Tensor:
    """The straightforward definition: dense acts, one decode of each inner prefix, FVU each."""
    acts = sae(x).acts
    total = x.new_zeros(())
    for w in sae.activation.widths[:-1]:
        total = total + fvu(x, acts[:, :w] @ sae.W_dec[:w] + sae.b_dec)
    return total


def _grads(sae: MatryoshkaSAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters()}


def test_prefix_widths_known_answers_and_errors() -> None:
    assert prefix_widths([0.0625, 0.125, 0.25, 0.5, 1.0], 4608) == (288, 576, 1152, 2304, 4608)
    assert prefix_widths([1.0], 7) == (7,)
    for bad in ([], [0.5], [0.5, 0.25, 1.0], [0.0, 1.0], [0.5, 1.5]):
        with pytest.raises(ValueError, match="prefix_fractions"):
            prefix_widths(bad, 96)
    with pytest.raises(ValueError, match="distinct"):
        prefix_widths([0.5, 0.51, 1.0], 8)  # 4, 4, 8


@pytest.mark.parametrize("sparse", [True, False])
def test_prefix_loss_equals_the_loop_over_prefixes(sparse: bool) -> None:
    """The SAE's penalty (sparse path's per-group decodes, or the dense path's running sums)
    equals the loop over prefixes, value and every parameter's gradient."""
    x = next(synthetic_batches()) * 0.05
    fast, ref = _sae(), _sae()
    out = fast.forward_sparse(x) if sparse else fast(x)
    loss = fast.sparsity_loss(x, out)
    expected = _loop_loss(ref, x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    expected.backward()
    for name, grad in _grads(fast).items():
        torch.testing.assert_close(grad, _grads(ref)[name], rtol=1e-4, atol=1e-6, msg=name)


def test_inner_recons_known_answer_and_empty_groups() -> None:
    """Two latents, widths (1, 2): x̂_1 = b_dec + f_0 W_dec,0; a group with no selected entry
    adds nothing (the sparse path handles empty groups)."""
    sae = _sae(fractions=[0.5, 1.0], d_in=3, d_sae=2, k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_dec.copy_(torch.tensor([0.0, 0.0, 1.0]))
    x = torch.tensor([[3.0, 0.5, 1.0], [0.2, 2.0, 1.0]])  # pre = x[:, :2]; k*batch = 2 kept
    for out in (sae(x), sae.forward_sparse(x)):
        (inner,) = sae.inner_recons(out, 2)
        torch.testing.assert_close(inner, torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    x_none = torch.tensor([[0.0, 2.0, 1.0], [0.0, 3.0, 1.0]])  # nothing kept in latent 0
    (inner,) = sae.inner_recons(sae.forward_sparse(x_none), 2)
    torch.testing.assert_close(inner, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))


def test_one_prefix_is_batchtopk_bit_for_bit() -> None:
    """prefix_fractions [1.0]: no inner prefix, so training is BatchTopK's: the same weights,
    θ and summary after 30 steps from the same seed."""
    cfg = make_cfg(n_tokens=256 * 30)
    torch.manual_seed(0)
    batchtopk = build_sae("batchtopk", 32, 96, 4, {}, torch.Generator().manual_seed(0))
    a = train_sae(batchtopk, synthetic_batches(), cfg, RecordingTracker(), CPU)
    torch.manual_seed(0)
    matryoshka = _sae(fractions=[1.0])
    b = train_sae(matryoshka, synthetic_batches(), cfg, RecordingTracker(), CPU)
    for name, tensor in batchtopk.state_dict().items():
        assert torch.equal(tensor, matryoshka.state_dict()[name]), name
    timing = {"seconds", "tokens_per_s"}
    assert {k: v for k, v in a.items() if k not in timing} == {
        k: v for k, v in b.items() if k not in timing
    }
    assert b["sparsity_loss"] == 0.0


def test_train_step_adds_the_inner_prefixes_to_the_loss() -> None:
    """loss = FVU of the full recon + AuxK + the inner prefixes' FVU sum (sparsity_loss)."""
    sae = _sae()
    x = next(synthetic_batches()) * 0.05
    expected = _loop_loss(_sae(), x).item()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    dead = torch.zeros(96, dtype=torch.bool)
    m = train_step(sae, optimizer, x, dead, k_aux=16, aux_coef=1 / 32, grad_clip=1.0).metrics
    assert m["sparsity_loss"] == pytest.approx(expected, rel=1e-5)
    assert m["loss"] == pytest.approx(m["fvu"] + m["aux_loss"] + m["sparsity_loss"], rel=1e-5)


def _prefix_fvu(sae, x: torch.Tensor, widths) -> list[float]:
    """FVU of the eval-mode (θ) SAE's reconstruction by its first w latents, on raw x."""
    with torch.no_grad():
        acts = sae(x).acts
        return [fvu(x, acts[:, :w] @ sae.W_dec[:w] + sae.b_dec).item() for w in widths]


def test_training_learns_and_its_prefixes_reconstruct_on_their_own() -> None:
    """200 steps on synthetic sparse data (64 true features): the full FVU falls below 0.3
    and θ is set; each prefix reconstructs, the smaller ones worse; and the first 12 latents
    alone reconstruct far better than BatchTopK's first 12 trained the same way (the point of
    the nested loss: the early latents carry the most variance)."""
    x = next(synthetic_batches())
    torch.manual_seed(0)
    sae = _sae()
    tracker = RecordingTracker()
    summary = train_sae(sae, synthetic_batches(), make_cfg(), tracker, CPU)
    assert tracker.logged[0][1]["train/fvu"] > 0.5 and summary["fvu"] < 0.3
    assert summary["threshold"] == sae.activation.threshold.item() > 0
    nested = _prefix_fvu(sae, x, sae.activation.widths)
    assert nested == sorted(nested, reverse=True) and nested[-1] < 0.3 and nested[0] < 1.0
    torch.manual_seed(0)
    plain = build_sae("batchtopk", 32, 96, 4, {}, torch.Generator().manual_seed(0))
    train_sae(plain, synthetic_batches(), make_cfg(), RecordingTracker(), CPU)
    (plain_first,) = _prefix_fvu(plain, x, [12])
    assert nested[0] < plain_first - 0.1, (nested, plain_first)


def test_registry_entry_config_and_round_trip(tmp_path) -> None:
    """Registered with its params section; bad fractions are one ConfigError naming the key;
    save/load keeps the variant, fractions and θ; exported as jumprelu."""
    from saelab.export import ARCHITECTURES
    from tests.test_registry import _with

    assert registry.get("matryoshka").saelens == "jumprelu" == ARCHITECTURES["matryoshka"]
    key = "variant_params.matryoshka.prefix_fractions"
    with pytest.raises(ConfigError, match=rf"params: {key} must be a strictly increasing list"):
        parse_params(_with(key, [0.5, 0.25, 1.0]))
    raw = _with(key, [0.0001, 1.0])  # 0 latents at d_sae 4608
    with pytest.raises(ConfigError, match=rf"params: {key} must be fractions whose widths"):
        parse_params(raw)
    sae = _sae()
    with torch.no_grad():
        sae.activation.threshold.fill_(0.25)
    sae.save(tmp_path / "m")
    back = load_sae(tmp_path / "m")
    assert isinstance(back, MatryoshkaSAE) and isinstance(back.activation, MatryoshkaBatchTopK)
    assert back.hparams() == {"prefix_fractions": FRACTIONS}
    assert back.activation.widths == (12, 24, 48, 96)
    assert back.activation.threshold.item() == 0.25


def test_exports_to_saelens_as_jumprelu_with_identical_outputs(tmp_path) -> None:
    """export -> load_saelens: the SAELens jumprelu SAE (θ broadcast) computes the same codes
    and reconstruction as the eval-mode Matryoshka SAE."""
    from saelab.export import ModelRef, export_saelens, load_saelens

    sae = _sae(d_in=16, d_sae=64)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(64, generator=torch.Generator().manual_seed(2)))
        sae.activation.threshold.fill_(0.2)
    sae.metadata = {"model": "smollm2", "hookpoint": "blocks.15.hook_resid_pre"}
    sae.eval()
    export_saelens(sae, tmp_path / "out", ModelRef("HuggingFaceTB/SmolLM2-135M", None, None))
    back = load_saelens(tmp_path / "out")
    x = 4 * torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = sae(x), back(x)
    assert (want.acts > 0).any()
    torch.testing.assert_close(got.acts, want.acts, rtol=0, atol=0)
    torch.testing.assert_close(got.recon, want.recon, rtol=0, atol=0)
