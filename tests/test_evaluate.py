"""evaluate.py: metric definitions on hand-built inputs, and spliced CE on a tiny model."""

import pytest
import torch

from saelab.capture import capture_resid, hook_resid, load_model, splice_fn
from saelab.evaluate import (
    accumulate,
    batch_mode_l0,
    density_histogram,
    downstream_metrics,
    l0_histogram,
    reconstruction_metrics,
)
from saelab.sae import SparseAutoencoder, make_activation
from tests.model_config import cpu_model_config


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


def test_direction_norm_and_sparsity_metrics_known_answer() -> None:
    """Same x as above. cos: token 1 x·x̂ = 1, ||x|| = √2, ||x̂|| = 1 -> 1/√2; token 2 exact -> 1.
    l2_ratio = (1 + √10) / (√2 + √10). γ = Σ||x̂||² / Σ x·x̂ = (1 + 10) / (1 + 10) = 1.
    explained_variance = 1 − fvu = 3/4. Per-token L0 [1, 2]: p10 = 1.1, p50 = 1.5, p90 = 1.9
    (linear interpolation). Latent 0 fires on 2/2 tokens, latent 1 on 1/2: both > 10%, so
    dense_fraction = 2/4."""
    x = torch.tensor([[1.0, -1.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    m = reconstruction_metrics(_identity_sae(4), [x])
    assert m["cosine_sim"] == pytest.approx((2**-0.5 + 1) / 2)
    assert m["l2_ratio"] == pytest.approx((1 + 10**0.5) / (2**0.5 + 10**0.5))
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert m["explained_variance"] == pytest.approx(0.75)
    assert (m["l0_p10"], m["l0_p50"], m["l0_p90"]) == pytest.approx((1.1, 1.5, 1.9))
    assert m["dense_fraction"] == pytest.approx(0.5)


def test_halved_reconstruction_has_bias_and_l2_ratio_one_half() -> None:
    """recon = x/2 (W_dec = I/2, x > 0): cos 1, l2_ratio 1/2, γ = E||x/2||² / E[x·x/2] = 1/2,
    nmse = E||x/2||² / E||x||² = 1/4."""
    x = torch.rand(32, 4, generator=torch.Generator().manual_seed(3)) + 0.1
    sae = _identity_sae(4)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    m = reconstruction_metrics(sae, [x[:10], x[10:]])
    assert m["cosine_sim"] == pytest.approx(1.0)
    assert m["l2_ratio"] == pytest.approx(0.5)
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert m["nmse"] == pytest.approx(0.25)


def test_accumulated_mean_is_the_token_mean() -> None:
    """The mean activation used for mean ablation is the mean over every token of every batch."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(4))
    stats = accumulate(_identity_sae(4), [x[:7], x[7:]])
    torch.testing.assert_close(stats.mean(), x.mean(0))


def test_l0_histogram_bins_and_fractions() -> None:
    """L0 [1, 2, 2, 5]: width-1 bins 0..5 hold fractions [0, 1/4, 1/2, 0, 0, 1/4]; with at most
    2 bins, width ceil(6/2) = 3: [0,3) holds 3/4, [3,6) 1/4."""
    l0 = torch.tensor([1, 2, 2, 5])
    h = l0_histogram(l0)
    assert h["l0_bin_width"] == 1
    assert [r["tokens"] for r in h["l0_hist"]] == [0, 0.25, 0.5, 0, 0, 0.25]
    h2 = l0_histogram(l0, max_bins=2)
    assert h2["l0_bin_width"] == 3
    assert h2["l0_hist"] == [{"l0": 0, "tokens": 0.75}, {"l0": 3, "tokens": 0.25}]


def test_density_histogram_counts_live_latents_per_decade_bin() -> None:
    """Firings [0, 1, 3, 50, 100] of N = 100: bins of 1/4 decade from log10(1/100) = -2 to 0.
    ρ = 0.01 -> bin 0; 0.03 (log -1.52) -> bin 1; 0.5 (log -0.30) -> bin 6; 1.0 (log 0) -> the
    last bin 7; the latent that never fired is a dead latent, in no bin."""
    h = density_histogram(torch.tensor([0, 1, 3, 50, 100]), 100)
    assert h["dead_latents"] == 1
    assert [r["latents"] for r in h["density_hist"]] == [1, 1, 0, 0, 0, 0, 1, 1]
    assert h["density_hist"][0]["log10_density"] == pytest.approx(-1.875)


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
    cfg = cpu_model_config(tiny_llama_dir, "blocks.2.hook_resid_pre")
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


def test_mean_replacement_is_the_mean_ablation(tiny_llama, contexts) -> None:
    """replace = the mean activation is the mean ablation itself: CE loss recovered against it
    is 0; an identity replacement recovers 1 against both ablations."""
    cfg, model = tiny_llama
    mean = torch.randn(64, generator=torch.Generator().manual_seed(5))
    m = downstream_metrics(
        model, cfg, lambda x: mean.expand_as(x), contexts, 4, True, mean_act=mean
    )
    assert m["ce_spliced"] == pytest.approx(m["ce_mean_ablated"])
    assert m["ce_loss_recovered_mean"] == pytest.approx(0.0, abs=1e-9)
    ident = downstream_metrics(model, cfg, lambda x: x, contexts, 4, True, mean_act=mean)
    assert ident["ce_loss_recovered_mean"] == pytest.approx(1.0)
    assert ident["ce_loss_recovered"] == pytest.approx(1.0)


@torch.inference_mode()
def _reference_ce(model, cfg, fn, contexts, start: int) -> tuple[float, float]:
    """The straightforward spliced CE and KL (nats/token): one full forward with ``fn`` hooked in
    through hook_resid per context batch, against one plain clean forward."""
    ce_sum = kl_sum = n = 0.0
    for ids in contexts.split(4):
        logp_clean = torch.log_softmax(model(input_ids=ids).logits[:, start:-1], -1)
        with hook_resid(model, cfg, fn):
            logp = torch.log_softmax(model(input_ids=ids).logits[:, start:-1], -1)
        targets = ids[:, start + 1 :].unsqueeze(-1)
        ce_sum += -logp.gather(-1, targets).sum().item()
        kl_sum += (logp_clean.exp() * (logp_clean - logp)).sum().item()
        n += targets.numel()
    return ce_sum / n, kl_sum / n


@pytest.mark.parametrize("hookpoint", ["blocks.2.hook_resid_pre", "blocks.3.hook_resid_post"])
def test_spliced_ce_and_kl_match_the_full_spliced_forward(tiny_llama, contexts, hookpoint):
    """downstream_metrics (clean pass + suffix only) gives the CE and KL of the full forward with
    the replacement hooked in, with sinks above max_norm kept clean (here the norm median, so
    about half of the tokens keep their activation)."""
    _, model = tiny_llama
    cfg = cpu_model_config(tiny_llama[0].name_or_path, hookpoint)
    resid = torch.cat([capture_resid(model, cfg, ids) for ids in contexts.split(4)])
    max_norm = resid[:, 1:].norm(dim=-1).median().item()

    def replace(x):
        return 0.5 * x + 0.1

    m = downstream_metrics(model, cfg, replace, contexts, 4, True, max_norm)
    ce, kl = _reference_ce(model, cfg, splice_fn(replace, True, max_norm), contexts, 1)
    assert m["ce_spliced"] == pytest.approx(ce, rel=1e-6)
    assert m["kl_div"] == pytest.approx(kl, rel=1e-5, abs=1e-7)
    assert m["kl_div"] > 1e-3  # the replacement matters
