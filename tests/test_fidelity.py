"""Specifications of each variant as its paper defines it (docs/fidelity.md): JumpReLU's
bandwidth in the paper's units, the λ warm-ups, the April 2024 ReLU + L1 recipe's free decoder
norms, Switch's routed dead counter and router-scaled AuxK, Sampled's pool law and threshold
steps, BatchTopK's fp32 θ under bf16 autocast (CPU, seeded, hand-built inputs)."""

import copy
import math

import pytest
import torch

import saelab.train
from saelab.sae import BatchTopK, JumpReLU, Sampled, SparseAutoencoder, SwitchSAE, make_activation
from saelab.sae.activations import select_pool
from saelab.train import sparsity_warmup_factor, train_sae, train_step
from tests.test_train import CPU, RecordingTracker, make_cfg, synthetic_batches


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny models run as fast on one thread."""


# --------------------------------------------------------------------------- JumpReLU units


def test_jumprelu_bandwidth_and_init_threshold_are_in_the_papers_units():
    """d_in = 16: the trainer's inputs (E||x||^2 = 16) are sqrt(16) = 4 times the paper's
    (E||x||^2 = 1), so ε = 0.001 becomes 0.004 and θ init 0.001 becomes 0.004."""
    act = JumpReLU(2, bandwidth=0.001, l0_coef=1.0, init_threshold=0.001)
    SparseAutoencoder(16, 8, act)
    assert act.eps == pytest.approx(0.004)
    torch.testing.assert_close(act.threshold, torch.full((8,), 0.004))


def test_jumprelu_kernel_covers_pre_activations_within_half_the_scaled_bandwidth():
    """θ = 0.004 (as above), ε = 0.004: z = 0.0055 is within ε/2 = 0.002 of θ, so the rectangle
    kernel covers it and θ gets the pseudo-gradient -(θ/ε) K = -1 per unit of upstream gradient
    (eq. 11); z = 0.0065 is outside. With ε = 0.001 in our units (the old reading) neither
    would be covered."""
    act = JumpReLU(1, bandwidth=0.001, l0_coef=1.0, init_threshold=0.001)
    SparseAutoencoder(16, 1, act)
    for z, expected in ((0.0055, -1.0), (0.0065, 0.0)):
        act.log_threshold.grad = None
        act(torch.tensor([[z]])).sum().backward()
        # dθ/dlogθ = θ: the log-parametrised gradient is θ * (-θ / ε) K
        assert act.log_threshold.grad.item() == pytest.approx(expected * 0.004, abs=1e-9), z


# --------------------------------------------------------------------------- λ warm-ups


@pytest.mark.parametrize(
    ("step", "fraction", "expected"),
    [(0, 0.05, 0.2), (2, 0.05, 0.6), (4, 0.05, 1.0), (50, 0.05, 1.0), (0, 0.0, 1.0)],
)
def test_sparsity_warmup_factor_known_values(step: int, fraction: float, expected: float):
    """100 steps, 5%: w = 5 warm-up steps, factor (step + 1) / 5 up to 1; fraction 0: none."""
    assert sparsity_warmup_factor(step, 100, fraction) == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["relu", "jumprelu"])
def test_the_loop_ramps_the_sparsity_loss_over_the_warmup(variant: str, monkeypatch):
    """10 steps with sparsity_warmup 0.4: train_step gets sparsity_scale 0.25, 0.5, 0.75, 1, then
    1 (w = 4); the weighted sparsity loss of a step is the unweighted one times it."""
    scales = []
    real_step = saelab.train.train_step

    def recording_step(*args, **kwargs):
        scales.append(kwargs["sparsity_scale"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(saelab.train, "train_step", recording_step)
    hparams = {
        "relu": {"l1_coef": 0.05, "init_b_enc": "quantile", "decoder_init_norm": 0.1},
        "jumprelu": {"bandwidth": 0.001, "l0_coef": 1.0, "init_threshold": None},
    }[variant]
    sae = SparseAutoencoder(32, 96, make_activation(variant, 4, sparsity_warmup=0.4, **hparams))
    train_sae(sae, synthetic_batches(), make_cfg(n_tokens=256 * 10), RecordingTracker(), CPU)
    assert scales == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)


def test_train_step_scales_the_sparsity_loss():
    """Same SAE, same batch: sparsity_scale 0.3 gives 0.3 times the sparsity loss of 1."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(32, 96, make_activation("relu", 4, l1_coef=0.05, init_b_enc="zero"))
    x = next(synthetic_batches()) * 0.05
    losses = []
    for scale in (1.0, 0.3):
        copy_ = copy.deepcopy(sae)
        optimizer = torch.optim.SGD(copy_.parameters(), lr=0.0)
        dead = torch.zeros(96, dtype=torch.bool)
        m = train_step(copy_, optimizer, x, dead, k_aux=16, aux_coef=0.0, grad_clip=1.0,
                       sparsity_scale=scale).metrics  # fmt: skip
        losses.append(m["sparsity_loss"])
    assert losses[1] == pytest.approx(0.3 * losses[0], rel=1e-6)


# --------------------------------------------------------------------------- ReLU: April 2024


def test_relu_decoder_starts_at_decoder_init_norm_with_the_encoder_its_transpose():
    """Conerly et al. 2024: decoder rows random directions of norm 0.1 here, W_enc = W_dec^T."""
    act = make_activation("relu", 4, l1_coef=0.05, init_b_enc="zero", decoder_init_norm=0.1)
    sae = SparseAutoencoder(8, 24, act, torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((24,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T) and not act.unit_norm_decoder


def test_relu_train_step_leaves_decoder_norms_free_and_weights_l1_by_them():
    """With SGD (lr 0.1, no clipping): the decoder update is exactly -lr times the full autograd
    gradient of fvu + l1_coef * mean_t sum_i f_ti ||W_dec,i|| (no parallel component removed,
    no renormalisation), so the rows' norms move off 0.1; a top-k SAE's stay at 1."""
    torch.manual_seed(0)
    act = make_activation("relu", 4, l1_coef=0.05, init_b_enc="zero", decoder_init_norm=0.1)
    sae = SparseAutoencoder(32, 96, act)
    x = next(synthetic_batches()) * 0.05
    reference = copy.deepcopy(sae)
    pre = reference.encode_pre(x)
    acts = pre.relu()
    recon = acts @ reference.W_dec + reference.b_dec
    norms = reference.W_dec.norm(dim=1)
    loss = saelab.train.fvu(x, recon) + 0.05 * (acts @ norms).mean()
    (grad_W_dec,) = torch.autograd.grad(loss, reference.W_dec)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.1)
    dead = torch.zeros(96, dtype=torch.bool)
    train_step(sae, optimizer, x, dead, k_aux=16, aux_coef=0.0, grad_clip=1e9)
    torch.testing.assert_close(sae.W_dec, reference.W_dec - 0.1 * grad_W_dec)
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.full((96,), 0.1), atol=1e-4)


# --------------------------------------------------------------------------- Switch


def _switch() -> tuple[SwitchSAE, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sae = SwitchSAE(8, 32, 3, 4, 3.0, generator=gen)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
        sae.b_router.normal_(0.0, 1.0, generator=gen)
        sae.W_router.mul_(4.0)
    return sae, torch.randn(64, 8, generator=gen) * 2.0


def test_switch_tokens_seen_counts_the_tokens_routed_to_each_latents_expert():
    """tokens_seen: per latent, the number of the batch's tokens its expert received."""
    sae, x = _switch()
    expert = sae.route(x)[1]
    counts = torch.bincount(expert, minlength=4)
    assert counts.sum() == 64 and (counts > 0).all()
    assert torch.equal(sae.tokens_seen(x), counts.repeat_interleave(8))
    dense = SparseAutoencoder(8, 32, make_activation("topk", 3))
    assert torch.equal(dense.tokens_seen(x), torch.full((32,), 64))


def test_switch_dead_counter_advances_only_by_routed_tokens():
    """After one train step the loop's silent counter of a latent that did not fire equals the
    tokens routed to its expert (not the batch size); a latent that fired is at 0."""
    sae, x = _switch()
    seen = sae.tokens_seen(x)
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    dead = torch.zeros(32, dtype=torch.bool)
    result = train_step(sae, optimizer, x, dead, k_aux=4, aux_coef=1 / 32, grad_clip=1.0)
    state = saelab.train._LoopState(32, dead_tokens=10**6, device=CPU)
    state.record(result, x)
    assert torch.equal(result.seen, seen)
    assert torch.equal(state.silent_tokens, torch.where(result.fired, 0, seen))
    assert (state.silent_tokens < 64).all()  # no expert got the whole batch


def test_switch_auxk_pre_acts_are_router_scaled_like_live_acts():
    """pre_acts_of(x, latents) = p_t,e_t * ((x - b_dec) W_enc + b_enc) on the latents of the
    token's expert, -inf elsewhere: the scale live latents' acts have (p * TopK(pre))."""
    sae, x = _switch()
    latents = torch.tensor([0, 9, 17, 31])
    probs, expert = sae.route(x)
    p = probs.gather(1, expert[:, None])
    dense = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, latents] * p
    owner = latents // 8
    expected = torch.where(owner[None, :] == expert[:, None], dense, float("-inf"))
    torch.testing.assert_close(sae.pre_acts_of(x, latents), expected)
    live = sae(x)  # a live act is p times its pre-activation
    rows, cols = live.acts.nonzero().unbind(1)
    torch.testing.assert_close(live.acts[rows, cols], (live.pre_acts * p)[rows, cols])


# --------------------------------------------------------------------------- Sampled


def test_successive_sampling_inclusion_is_not_proportional_to_the_score():
    """Scores (7, 1, 1, 1), a pool of 2 drawn without replacement, each draw proportional to
    the scores left: feature 0 is in the pool with probability 0.7 + 3 * 0.1 * 7/9 = 0.9333,
    each other with (2 - 0.9333) / 3 = 0.3556: a ratio 2.63, not 7. 3000 seeded draws land
    within 0.03 (> 4 standard deviations)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.tensor([7.0, 1.0, 1.0, 1.0])
    hits = torch.zeros(4)
    for _ in range(3000):
        hits[select_pool(scores, 2, "sample", gen)] += 1
    freq = hits / 3000
    assert freq[0].item() == pytest.approx(0.7 + 0.3 * 7 / 9, abs=0.03)
    for i in (1, 2, 3):
        assert freq[i].item() == pytest.approx((2 - (0.7 + 0.3 * 7 / 9)) / 3, abs=0.03)


def test_sampled_computes_the_unrestricted_threshold_only_while_estimating(monkeypatch):
    """Not estimating: no threshold (last_min_kept None) and no unrestricted selection; in a
    training run the unrestricted selection runs once per step of the threshold window only
    (threshold_fraction 0.2 of 20 steps: the last 4)."""
    act = Sampled(4, l=2, score="l2", pool="sample").train()
    pre = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    act.estimating = False
    act(pre)
    assert act.last_min_kept is None
    calls = []
    real = BatchTopK.batch_threshold

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BatchTopK, "batch_threshold", counting)
    sae = SparseAutoencoder(32, 96, make_activation("sampled", 4, l=2, score="l2", pool="sample"))
    summary = train_sae(
        sae, synthetic_batches(), make_cfg(n_tokens=256 * 20), RecordingTracker(), CPU
    )
    assert len(calls) == 4 and summary["threshold"] > 0


# --------------------------------------------------------------------------- BatchTopK θ fp32


@pytest.mark.parametrize("variant", ["batchtopk", "sampled"])
def test_threshold_estimate_is_fp32_under_bf16_autocast(variant: str):
    """Under bf16 autocast the step's threshold estimate equals batch_threshold on the float32
    pre-activations of the pre-step SAE, exactly (the bf16 ones differ by up to 2^-8
    relative)."""
    torch.manual_seed(0)
    hparams = {"sampled": {"l": 2, "score": "l2", "pool": "top"}}.get(variant, {})
    sae = SparseAutoencoder(32, 96, make_activation(variant, 4, **hparams))
    x = next(synthetic_batches()) * 0.05
    reference = copy.deepcopy(sae)
    expected = reference.activation.batch_threshold(reference.encode_pre(x).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = reference.activation.batch_threshold(reference.encode_pre(x).detach())
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.zeros(96, dtype=torch.bool)
    train_step(sae, optimizer, x, dead, k_aux=16, aux_coef=1 / 32, grad_clip=1.0,
               autocast=torch.bfloat16)  # fmt: skip
    got = sae.activation.last_min_kept
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert not math.isclose(float(bf16), float(expected), rel_tol=1e-7)
