"""evaluate.py: metric definitions on hand-built inputs, and spliced CE on a tiny model."""

import pytest
import torch

from saelab.capture import load_model
from saelab.config import ModelConfig
from saelab.evaluate import batch_mode_l0, downstream_metrics, reconstruction_metrics
from saelab.sae import SparseAutoencoder, make_activation


def _identity_sae(d: int, variant: str = "topk", k: int | None = None) -> SparseAutoencoder:
    """W_enc = W_dec = I, biases 0: acts = relu(x) (all d kept), recon = relu(x)."""
    sae = SparseAutoencoder(d, d, make_activation(variant, k or d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae.eval()


def test_reconstruction_metrics_known_answer() -> None:
    """x = [[1,-1,0,0],[3,1,0,0]], recon = relu(x) = [[1,0,0,0],[3,1,0,0]]:
    sq_err = 1; Σ||x||² = 1+1+9+1 = 12 -> nmse = 1/12; x̄ = [2,0,0,0],
    Σ||x-x̄||² = 2+2 = 4 -> fvu = 1/4; mse = 1/(2*4); L0 = (1+2)/2; latents 2,3 never fire."""
    x = torch.tensor([[1.0, -1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    m = reconstruction_metrics(_identity_sae(4), [x[:1], x[1:]])  # two batches: sums carry over
    assert m["nmse"] == pytest.approx(1 / 12)
    assert m["fvu"] == pytest.approx(1 / 4)
    assert m["mse"] == pytest.approx(1 / 8)
    assert m["l0"] == pytest.approx(1.5)
    assert m["dead_fraction"] == pytest.approx(0.5)
    assert m["n_tokens"] == 2


def test_fvu_is_one_for_the_mean_and_zero_for_perfect_recon() -> None:
    """An SAE that outputs the data mean explains no variance (fvu 1); an exact one fvu 0."""
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))  # nonnegative
    assert reconstruction_metrics(_identity_sae(4), [x])["fvu"] == pytest.approx(0.0, abs=1e-12)
    mean_sae = _identity_sae(4)
    with torch.no_grad():
        mean_sae.W_dec.zero_()
        mean_sae.b_dec.copy_(x.mean(0))
        mean_sae.b_enc.copy_(x.mean(0))  # pre_acts = x - b_dec + b_enc = x
    assert reconstruction_metrics(mean_sae, [x])["fvu"] == pytest.approx(1.0)


def test_batch_mode_l0_of_batchtopk_is_k_and_mode_is_restored() -> None:
    """In training mode BatchTopK keeps k*batch entries, so its L0 is exactly k per batch;
    afterwards the activation is back in eval (threshold) mode."""
    sae = _identity_sae(8, "batchtopk", k=2)
    x = torch.rand(32, 8, generator=torch.Generator().manual_seed(1)) + 0.1
    assert batch_mode_l0(sae, [x[:16], x[16:]]) == 2.0
    assert not sae.activation.training


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    cfg = ModelConfig(str(tiny_llama_dir), None, "float32", "blocks.2.hook_resid_pre", "cpu")
    return cfg, load_model(cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    return torch.randint(1, 49152, (6, 24), generator=torch.Generator().manual_seed(2))


def test_identity_replacement_recovers_all_of_the_loss(tiny_llama, contexts) -> None:
    """replace = identity: spliced CE equals clean CE exactly, KL 0, CE loss recovered 1."""
    cfg, model = tiny_llama
    m = downstream_metrics(
        model, cfg, lambda x: x, contexts, batch_size=4, skip_first_position=True
    )
    assert m["ce_spliced"] == m["ce_clean"]
    assert m["delta_ce"] == 0.0
    assert m["kl_div"] == pytest.approx(0.0, abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1.0)
    assert m["ce_n_tokens"] == 6 * 22  # predictions at positions 1..22 of 24


def test_zero_replacement_recovers_none_of_the_loss(tiny_llama, contexts) -> None:
    """replace = zeros is the zero ablation itself: CE loss recovered 0, KL > 0."""
    cfg, model = tiny_llama
    m = downstream_metrics(model, cfg, torch.zeros_like, contexts, 4, skip_first_position=False)
    assert m["ce_spliced"] == pytest.approx(m["ce_zero_ablated"])
    assert m["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert m["kl_div"] > 0
    assert m["ce_n_tokens"] == 6 * 23


def test_expert_load_counts_routed_tokens():
    """A router that sends tokens with x_0 > 0 to expert 1 and the rest to expert 0: with 3 of
    4 tokens positive, loads are 3/4 and 0 (expert 2 unused) -> max 0.75, min 0, 1 unused."""
    from saelab.evaluate import expert_load
    from saelab.sae import SwitchSAE

    sae = SwitchSAE(2, 6, 1, n_experts=3, balance_coef=1.0)
    with torch.no_grad():
        sae.b_router.zero_()
        sae.W_router.copy_(torch.tensor([[-10.0, 10.0, -100.0], [0.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [3.0, -1.0]])
    loads = expert_load(sae, [x[:2], x[2:]])
    assert loads == {"expert_load_max": 0.75, "expert_load_min": 0.0, "experts_unused": 1.0}
