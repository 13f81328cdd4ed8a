"""Specifications of the ReLU+L1, JumpReLU and Sampled-SAE sparsity strategies (CPU, seeded,
hand-built inputs with the arithmetic in comments)."""

import json
import math

import pytest
import torch

from saelab import config
from saelab.sae import BatchTopK, JumpReLU, ReLU, Sampled, SparseAutoencoder, make_activation
from saelab.sae.activations import POOLS, SCORES, feature_scores, select_pool

HPARAMS = {
    "relu": {
        "l1_coef": 0.1,
        "init_b_enc": "zero",
        "sparsity_warmup": 0.05,
        "decoder_init_norm": 0.1,
    },
    "jumprelu": {
        "bandwidth": 0.5,
        "l0_coef": 3.0,
        "init_threshold": 0.2,
        "threshold_lr_scale": 2,
        "sparsity_warmup": 0.1,
    },
    "sampled": {"l": 2, "score": "l2", "pool": "sample", "seed": 0},
}


def _jumprelu(theta: list[float], bandwidth: float = 0.5, k: int = 2) -> JumpReLU:
    act = JumpReLU(k, bandwidth=bandwidth, l0_coef=3.0, init_threshold=1.0)
    act.bind(len(theta))
    with torch.no_grad():
        act.log_threshold.copy_(torch.tensor(theta).log())
    return act


def _sae(variant: str, d_in: int = 8, d_sae: int = 32, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, make_activation(variant, k, **HPARAMS[variant]), gen)
    with torch.no_grad():  # non-trivial biases and thresholds
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
        sae.b_dec.normal_(0.0, 1.0, generator=gen)
        if variant == "jumprelu":
            sae.activation.log_threshold.uniform_(-3.0, 0.0, generator=gen)
        if variant == "sampled":
            sae.activation.threshold.fill_(0.25)
    return sae


# --------------------------------------------------------------------------- ReLU + L1


def test_relu_acts_and_norm_weighted_l1_known_answer():
    """acts = relu(pre); loss = l1_coef * mean_t sum_i f_ti ||W_dec,i||.

    Rows (0.6, 0.8) and (0, 2) have norms 1 and 2; acts [[1, 0], [0.5, 2]]: token 0 gives
    1 * 1 = 1, token 1 gives 0.5 * 1 + 2 * 2 = 4.5; mean 2.75; times 0.1 = 0.275.
    """
    act = ReLU(4, l1_coef=0.1, init_b_enc="zero")
    pre = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    acts = act(pre)
    assert torch.equal(acts, torch.tensor([[1.0, 0.0], [0.5, 2.0]]))
    W_dec = torch.tensor([[0.6, 0.8], [0.0, 2.0]])
    assert act.sparsity_loss(pre, acts, W_dec).item() == pytest.approx(0.275)
    assert not act.uses_auxk


def test_relu_quantile_init_starts_every_latent_at_rate_k_over_d_sae():
    """init_b_enc "quantile": b_enc_i -= the ceil(batch (1 - k / d_sae))-th smallest pre-act of
    latent i, so each latent is positive on batch * k / d_sae tokens: L0 = k on the batch.
    Known answer: batch 8, d_sae 4, k 1 -> rank 6; column i holds 0..7 (+ i), so q_i = 5 + i and
    the shifted pre-acts are positive on the 2 tokens with 6 and 7."""
    pre = torch.arange(8.0)[:, None] + torch.arange(4.0)[None, :]  # [8, 4]
    b_enc = torch.zeros(4)
    ReLU(1, l1_coef=0.1, init_b_enc="quantile").init_from_batch_(pre, b_enc)
    assert torch.equal(b_enc, -(5.0 + torch.arange(4.0)))
    assert torch.equal(((pre + b_enc) > 0).sum(dim=0), torch.full((4,), 2))
    unchanged = torch.zeros(4)
    ReLU(1, l1_coef=0.1, init_b_enc="zero").init_from_batch_(pre, unchanged)
    assert torch.equal(unchanged, torch.zeros(4))


# --------------------------------------------------------------------------- JumpReLU

# Two latents with θ = (2, 1), bandwidth ε = 0.5, four tokens (rows).
Z = [[1.8, 1.1], [2.2, 0.9], [2.6, 5.0], [1.0, -1.0]]


def test_jumprelu_forward_known_answer():
    """acts = z * H(z - θ): latent 0 keeps 2.2 and 2.6 (> 2), latent 1 keeps 1.1 and 5 (> 1);
    z equal to θ is dropped (H(0) = 0)."""
    act = _jumprelu([2.0, 1.0])
    expected = torch.tensor([[0.0, 1.1], [2.2, 0.0], [2.6, 5.0], [0.0, 0.0]])
    assert torch.equal(act(torch.tensor(Z)), expected)
    theta = act.threshold.detach()
    assert act(theta[None]).count_nonzero() == 0
    assert torch.equal(act(theta.nextafter(theta + 1)[None]) > 0, torch.tensor([[True, True]]))


def test_jumprelu_ste_gradient_matches_the_rectangle_kernel():
    """d/dθ_i of sum_t w_t f_ti is -(θ_i / ε) sum_t w_t K((z_ti - θ_i) / ε) (Rajamanoharan et al.
    2024, eq. 11); d/dz = w * H(z - θ).

    w = (1, 2, 3, 4). Latent 0 (θ = 2): u = (z - 2) / 0.5 = (-0.4, 0.4, 1.2, -2), K = 1 for tokens
    0 and 1 only: dθ = -(2 / 0.5) * (1 + 2) = -12, so d log θ = θ dθ = -24. Latent 1 (θ = 1):
    u = (0.2, -0.2, 8, -4): dθ = -(1 / 0.5) * (1 + 2) = -6 = d log θ.
    """
    act = _jumprelu([2.0, 1.0])
    z = torch.tensor(Z, requires_grad=True)
    w = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    (w * act(z)).sum().backward()
    torch.testing.assert_close(act.log_threshold.grad, torch.tensor([-24.0, -6.0]))
    expected_dz = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 3.0], [0.0, 0.0]])
    assert torch.equal(z.grad, expected_dz)


def test_jumprelu_l0_loss_known_answer_and_gradient():
    """L0 = mean_t #{i: z_ti > θ_i} = (1 + 1 + 2 + 0) / 4 = 1; with k = 2, λ = 3 the loss is
    3 * (1/2 - 1)^2 = 0.75.

    Gradient (Heaviside STE, eq. 12): dL0/dθ_i = -(1 / ε) (1 / batch) #{t: |z_ti - θ_i| < ε/2}
    = -(1 / 0.5) (1 / 4) * 2 = -1 for both latents; dloss/dL0 = 2 λ (L0 / k - 1) / k = -1.5,
    so dloss/dθ = 1.5 and dloss/dlog θ = θ * 1.5 = (3, 1.5). z gets no gradient from L0.
    """
    act = _jumprelu([2.0, 1.0])
    z = torch.tensor(Z, requires_grad=True)
    loss = act.sparsity_loss(z, act(z), torch.eye(2))
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    torch.testing.assert_close(act.log_threshold.grad, torch.tensor([3.0, 1.5]))
    assert not z.grad.any()


def test_jumprelu_threshold_stays_fp32_under_bf16_inputs():
    """bf16 pre-activations give bf16 acts; θ and its gradient stay float32."""
    act = _jumprelu([2.0, 1.0])
    z = torch.tensor(Z, dtype=torch.bfloat16, requires_grad=True)
    acts = act(z)
    assert acts.dtype == torch.bfloat16
    (acts.sum() + act.sparsity_loss(z, acts, torch.eye(2))).backward()
    assert act.log_threshold.dtype == act.log_threshold.grad.dtype == torch.float32
    assert z.grad.dtype == torch.bfloat16


def test_jumprelu_init_from_first_batch():
    """init_threshold None: every θ_i becomes the (k * batch)-th largest of relu(pre), so the
    batch's L0 starts at k: k * batch = 2 * 4 = 8, and the 8th largest of 5, 4.5, 4, ... is 1.5.
    A fixed init_threshold is kept."""
    pre = torch.arange(5.0, -5.0, -0.5).view(4, 5)  # 5, 4.5, ..., -4.5
    act = JumpReLU(2, bandwidth=0.001, l0_coef=1.0, init_threshold=None)
    act.bind(5)
    act.init_from_batch_(pre)
    torch.testing.assert_close(act.threshold, torch.full((5,), 1.5))
    fixed = JumpReLU(2, bandwidth=0.001, l0_coef=1.0, init_threshold=0.001)
    fixed.bind(5)
    fixed.init_from_batch_(pre)
    torch.testing.assert_close(fixed.threshold, torch.full((5,), 0.001))


def test_jumprelu_without_bind_fails_clearly():
    with pytest.raises(ValueError, match="0 thresholds for 2 latents"):
        JumpReLU(2, bandwidth=0.001, l0_coef=1.0, init_threshold=None)(torch.ones(3, 2))


# --------------------------------------------------------------------------- Sampled-SAE


def test_feature_scores_known_answers():
    """Columns over 4 tokens: (1, 1, 1, 1), (2, 0, 0, 0), (1, 1, 0, 0), (0, 0, 0, 0).

    l2: 2, 2, sqrt 2, 0. squared_l2: 4, 4, 2, 0. entropy (exp H of p = column / sum):
    uniform over 4 tokens -> H = log 4 -> 4; one token -> 1; two tokens -> 2; zero column -> 0.
    """
    relu = torch.tensor([[1.0, 2.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]] + [[1.0, 0.0, 0.0, 0.0]] * 2)
    torch.testing.assert_close(feature_scores(relu, "l2"), torch.tensor([2, 2, math.sqrt(2), 0]))
    assert torch.equal(feature_scores(relu, "squared_l2"), torch.tensor([4.0, 4.0, 2.0, 0.0]))
    torch.testing.assert_close(feature_scores(relu, "entropy"), torch.tensor([4.0, 1.0, 2.0, 0.0]))


def test_select_pool_top_and_sample_known_answers():
    """top: the n best scores. sample: features with score 0 are never drawn, so with at most n
    positive scores the pool is exactly them."""
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 4.0])
    assert sorted(select_pool(scores, 2, "top").tolist()) == [0, 4]
    gen = torch.Generator().manual_seed(0)
    sparse = torch.tensor([0.0, 2.0, 0.0, 1.0])
    assert sorted(select_pool(sparse, 2, "sample", gen).tolist()) == [1, 3]
    assert sorted(select_pool(sparse, 3, "top").tolist()) == [1, 3]  # only 2 positive


def test_select_pool_samples_proportionally_to_the_score():
    """Scores (3, 1, 0), one draw: feature 0 with probability 3/4, feature 2 never; 2000 seeded
    draws land within 4 standard deviations (sqrt(0.75 * 0.25 / 2000) ~ 0.01)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.tensor([3.0, 1.0, 0.0])
    draws = torch.cat([select_pool(scores, 1, "sample", gen) for _ in range(2000)])
    assert (draws == 2).sum() == 0
    assert (draws == 0).float().mean().item() == pytest.approx(0.75, abs=0.04)


# Tokens (rows) x features; column l2 norms 5, 0, sqrt 2, sqrt 13; column exp-entropies
# 1 (all on one token), 0, 2 (1 and 1), exp(-(0.4 log 0.4 + 0.6 log 0.6)) = 1.96 (2 and 3).
PRE = [[5.0, 0.0, 1.0, 2.0], [0.0, -1.0, 1.0, 3.0]]


@pytest.mark.parametrize(
    ("pool_factor", "score", "expected"),
    [
        # pool {0} (best l2): keep k * batch = 2 entries of column 0, 5 and 0.
        (1, "l2", [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        # pool {0, 3}: of 5, 2, 0, 3 keep 5 and 3 (plain BatchTopK keeps the same here).
        (2, "l2", [[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]),
        # pool {2} (best entropy, spread evenly): keep 1 and 1, not the lone 5.
        (1, "entropy", [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]]),
    ],
)
def test_sampled_keeps_batch_topk_within_the_pool(pool_factor, score, expected):
    """k = 1, pool of k * l = l features chosen by the score ("top"), batch 2. The batch's
    threshold estimate is BatchTopK's over all features, whatever the pool: the 2nd largest
    entry of PRE, 3 (the inference rule: a global θ that gives L0 = k without a pool)."""
    act = Sampled(1, l=pool_factor, score=score, pool="top").train()
    assert torch.equal(act(torch.tensor(PRE)), torch.tensor(expected))
    assert act.last_min_kept.item() == 3.0


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("shift", [0.0, -2.0])
def test_sampled_with_a_full_pool_is_exactly_batch_topk(pool: str, shift: float):
    """A pool that holds every feature firing on the batch gives BatchTopK's acts bit for bit
    (and the same smallest kept value), for both pool modes: k * l = 4 * 12 = 48 = d_sae; or
    k * l = 4 * 3 = 12 < d_sae with only features 0..11 able to fire. shift -2 leaves fewer
    positive entries than k * batch, so zeros are kept too."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(64, 48, generator=gen) + shift
    reference = BatchTopK(4).train()
    for pool_factor, pre_l in ((12, pre), (3, pre.masked_fill(torch.arange(48) >= 12, -1.0))):
        sampled = Sampled(4, l=pool_factor, score="squared_l2", pool=pool).train()
        assert torch.equal(sampled(pre_l), reference(pre_l))
        assert torch.equal(sampled.last_min_kept, reference.last_min_kept)


def test_sampled_small_pool_keeps_k_times_batch_inside_it():
    """With 4 * 2 = 8 of 64 features in the pool, exactly k * batch entries are kept, all in at
    most 8 columns; the draw is reproducible from the seed."""
    pre = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).exp()  # all positive
    acts = Sampled(4, l=2, score="l2", pool="sample", seed=3).train()(pre)
    assert (acts > 0).sum() == 4 * 32
    assert (acts > 0).any(dim=0).sum() <= 8
    again = Sampled(4, l=2, score="l2", pool="sample", seed=3).train()(pre)
    assert torch.equal(acts, again)


def test_sampled_eval_is_batch_topk_eval():
    """Eval mode: the global threshold θ of BatchTopK, pre * (pre > θ)."""
    act = Sampled(1, l=1, score="l2", pool="sample").eval()
    act.threshold.fill_(1.5)
    assert torch.equal(act(torch.tensor(PRE)), torch.tensor([[5.0, 0, 0, 2.0], [0, 0, 0, 3.0]]))
    assert act.uses_auxk


def test_config_choices_match_the_activations():
    """config.py (torch-free) repeats the Sampled choices; they must agree."""
    assert config.SAMPLED_SCORES == SCORES and config.SAMPLED_POOLS == POOLS


# --------------------------------------------------------------------------- factory, save/load


def test_make_activation_passes_and_checks_hyperparameters():
    """Hyperparameters reach the class and come back from hparams(); a wrong one is ValueError."""
    for variant, hparams in HPARAMS.items():
        act = make_activation(variant, 4, **hparams)
        assert act.variant == variant and act.k == 4 and act.hparams() == hparams
    with pytest.raises(ValueError, match="relu: bad hyperparameters"):
        make_activation("relu", 4, l1=0.1)
    with pytest.raises(ValueError, match="need l >= 1"):
        make_activation("sampled", 4, **(HPARAMS["sampled"] | {"l": 0}))
    with pytest.raises(ValueError, match="topk: bad hyperparameters"):
        make_activation("topk", 4, l=2)


@pytest.mark.parametrize("variant", sorted(HPARAMS))
def test_save_load_round_trip_new_variants(tmp_path, variant: str):
    """save -> load rebuilds the same activation (hparams in cfg.json) with its thresholds: the
    outputs are identical."""
    sae = _sae(variant).eval()
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["variant"] == variant and cfg["hparams"] == HPARAMS[variant]
    loaded = SparseAutoencoder.load(tmp_path)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(loaded(x).acts, sae(x).acts) and torch.equal(loaded(x).recon, sae(x).recon)
    assert loaded.activation.state_dict().keys() == sae.activation.state_dict().keys()
    for name, tensor in sae.activation.state_dict().items():
        assert torch.equal(loaded.activation.state_dict()[name], tensor), name
    assert 0 < (loaded(x).acts > 0).sum() < loaded(x).acts.numel()  # thresholds matter


def test_fold_input_scale_keeps_jumprelu_acts():
    """θ lives in pre-activation units, which folding leaves unchanged."""
    sae = _sae("jumprelu").eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    scaled = sae(3.7 * x)
    sae.fold_input_scale_(3.7)
    assert torch.equal(sae(x).acts > 0, scaled.acts > 0)
    torch.testing.assert_close(sae(x).recon, scaled.recon / 3.7)
