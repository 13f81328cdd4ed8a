"""Specifications of the Switch SAE: real routing equals a dense masked reference, gradients
reach the router, the encoder's cost per token drops by the number of experts, and the
load-balancing loss, input-scale folding and save/load behave (CPU, seeded, hand-built inputs)."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from saelab.sae import SparseAutoencoder, SwitchSAE, TopK, build_sae, load_sae
from saelab.train import fvu

D_IN, D_SAE, K, E = 8, 32, 3, 4  # 4 experts of 8 latents


def _switch(seed: int = 0, balance_coef: float = 3.0, n_experts: int = E) -> SwitchSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = SwitchSAE(D_IN, D_SAE, K, n_experts, balance_coef, generator=gen)
    with torch.no_grad():  # non-trivial biases so that every term of the formulas matters
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
        sae.b_dec.normal_(0.0, 1.0, generator=gen)
        sae.b_router.normal_(0.0, 1.0, generator=gen)
        sae.W_router.mul_(4.0)  # confident routing: every expert gets some tokens below
    return sae


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2.0


def _dense_masked_reference(sae: SwitchSAE, x: torch.Tensor):
    """The paper's reference computation: the full dense encoder, masked to each token's
    expert, TopK over the masked pre-activations, scaled by the router probability, dense
    decoder. Returns (recon [n, d_in], acts [n, d_sae])."""
    probs = torch.softmax((x - sae.b_router) @ sae.W_router, dim=-1)
    expert = probs.argmax(dim=-1)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [n, d_sae], every expert
    owner = torch.arange(sae.d_sae) // sae.d_expert  # [d_sae]: the expert of each latent
    masked = torch.where(owner[None, :] == expert[:, None], pre, float("-inf"))
    acts = TopK(sae.activation.k)(masked) * probs.gather(1, expert[:, None])
    return acts @ sae.W_dec + sae.b_dec, acts


def test_routed_forward_equals_dense_masked_reference():
    """Gather / one matmul per expert / scatter gives the reference's recon and acts."""
    sae, x = _switch(), _x()
    out = sae(x)
    recon_ref, acts_ref = _dense_masked_reference(sae, x)
    assert torch.allclose(out.recon, recon_ref, atol=1e-5)
    assert torch.allclose(out.acts, acts_ref, atol=1e-6)
    _, expert = sae.route(x)
    assert len(set(expert.tolist())) == E  # the test exercised every expert


def test_routed_gradients_equal_dense_masked_reference_and_reach_the_router():
    """Same gradients for every parameter as the reference under loss = fvu + load balancing;
    the router's weights and bias get a nonzero gradient from both terms."""
    x = _x()
    grads = []
    for routed in (True, False):
        sae = _switch()
        recon = sae(x).recon if routed else _dense_masked_reference(sae, x)[0]
        loss = fvu(x, recon) + sae.sparsity_loss(x, sae(x))
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    routed, dense = grads
    assert set(routed) >= {"W_router", "b_router", "W_enc", "W_dec", "b_enc", "b_dec"}
    for name in routed:
        assert torch.allclose(routed[name], dense[name], atol=1e-5), name
    sae = _switch()
    fvu(x, sae(x).recon).backward()  # reconstruction alone: through the router probability
    assert sae.W_router.grad.abs().sum() > 0 and sae.b_router.grad.abs().sum() > 0


def test_acts_live_in_the_routed_expert_only_with_k_per_token_scaled_by_the_router():
    """Each token has exactly k active latents, all in its expert's block, and the largest
    equals the router probability times the largest pre-activation of that block."""
    sae, x = _switch(), _x()
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive TopK
    out = sae(x)
    probs, expert = sae.route(x)
    active = out.acts > 0
    assert torch.equal(active.sum(dim=1), torch.full((len(x),), K))
    owner = torch.arange(D_SAE) // (D_SAE // E)
    assert torch.equal(active & (owner[None, :] != expert[:, None]), torch.zeros_like(active))
    p = probs.gather(1, expert[:, None]).squeeze(1)
    assert torch.isinf(out.pre_acts[owner[None, :] != expert[:, None]]).all()
    best_pre = out.pre_acts.max(dim=1).values
    assert torch.allclose(out.acts.max(dim=1).values, p * best_pre, atol=1e-6)


def test_encoder_flops_per_token_drop_by_the_number_of_experts():
    """Counted matmul FLOPs (not timed) of a Switch SAE with 8 experts are ~1/8 of a dense SAE
    of the same total width, forward and backward: no dense encoder is computed and masked."""
    d_in, d_sae, n = 64, 1024, 512
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(0))
    counts = []
    for sae in (
        SparseAutoencoder(d_in, d_sae, TopK(8)),
        SwitchSAE(d_in, d_sae, 8, n_experts=8, balance_coef=3.0),
    ):
        with FlopCounterMode(display=False) as counter:
            fvu(x, sae(x).recon).backward()
        counts.append(counter.get_total_flops())
    dense, switch = counts
    # Dense: 3 matmuls forward + backward of 2 * n * d_in * d_sae each (encoder: 2 as x needs no
    # grad, decoder: 3); Switch: the same / 8 plus the router's [n, d_in] x [d_in, 8].
    assert dense / switch == pytest.approx(8, rel=0.05)


def test_load_balancing_loss_known_answers():
    """α E Σ f_e P_e: α (its minimum) for a uniform router, α E when all tokens go to one
    expert with probability 1."""
    sae, x = _switch(balance_coef=2.0), _x()
    with torch.no_grad():
        sae.W_router.zero_()  # uniform probabilities 1/E; argmax sends every token to expert 0
    assert sae.sparsity_loss(x, sae(x)).item() == pytest.approx(2.0 * E * (1.0 * 1 / E))
    with torch.no_grad():
        sae.b_router.zero_()
        sae.W_router[0, 2] = 1e4  # logit of expert 2 = 1e4 * x_0, huge when x_0 >= 1
    x_pos = x.clone()
    x_pos[:, 0] = x[:, 0].abs() + 1.0
    probs, expert = sae.route(x_pos)
    assert torch.equal(expert, torch.full((len(x),), 2)) and torch.all(probs[:, 2] == 1.0)
    assert sae.sparsity_loss(x_pos, sae(x_pos)).item() == pytest.approx(2.0 * E, rel=1e-5)


def test_fold_input_scale_keeps_routing_and_acts():
    """After fold_input_scale_(c), the SAE on raw x routes and encodes as before on c x."""
    sae, x, c = _switch(), _x(), 0.37
    scaled = sae(x * c)
    _, expert_scaled = sae.route(x * c)
    sae.fold_input_scale_(c)
    folded = sae(x)
    assert torch.equal(sae.route(x)[1], expert_scaled)
    assert torch.allclose(folded.acts, scaled.acts, atol=1e-5)
    assert torch.allclose(folded.recon, scaled.recon / c, atol=1e-5)


def test_init_b_dec_centres_the_router_too():
    """The trainer's b_dec init (geometric median) also sets b_router."""
    sae, b = _switch(), torch.arange(D_IN, dtype=torch.float32)
    sae.init_b_dec_(b)
    assert torch.equal(sae.b_dec.detach(), b) and torch.equal(sae.b_router.detach(), b)


def test_save_load_round_trip(tmp_path):
    """load_sae rebuilds a SwitchSAE with its router, hparams and identical outputs."""
    sae = _switch().eval()
    sae.save(tmp_path, metadata={"hookpoint": "blocks.15.hook_resid_pre"})
    loaded = load_sae(tmp_path)
    assert isinstance(loaded, SwitchSAE) and loaded.n_experts == E
    x = _x()
    assert torch.equal(loaded(x).recon, sae(x).recon)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["variant"] == "switch"
    assert cfg["hparams"] == {"n_experts": E, "balance_coef": 3.0}


def test_build_sae_switch_and_errors():
    """build_sae makes a SwitchSAE; bad widths and hyperparameters are ValueErrors."""
    sae = build_sae("switch", D_IN, D_SAE, K, {"n_experts": E, "balance_coef": 1.0})
    assert isinstance(sae, SwitchSAE) and sae.d_expert == D_SAE // E
    with pytest.raises(ValueError, match="n_experts"):
        build_sae("switch", D_IN, D_SAE, K, {"n_experts": 5, "balance_coef": 1.0})
    with pytest.raises(ValueError, match="k <= d_sae / n_experts"):
        build_sae("switch", D_IN, D_SAE, 9, {"n_experts": E, "balance_coef": 1.0})
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_sae("switch", D_IN, D_SAE, K, {"n_experts": E})
