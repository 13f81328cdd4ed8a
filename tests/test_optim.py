"""SAEAdam: torch's Adam run on contiguous aliases of column-major parameters gives the same
updates as torch's Adam on the parameters themselves."""

from __future__ import annotations

import pytest
import torch

from saelab.optim import SAEAdam
from saelab.sae import build_sae
from saelab.train import param_groups, train_step

HPARAMS = {
    "topk": {},
    "switch": {"n_experts": 4, "balance_coef": 3.0},
    "jumprelu": {"bandwidth": 0.001, "l0_coef": 1.0, "init_threshold": 0.1,
                 "threshold_lr_scale": 30.0},
}  # fmt: skip


def _sae_and_batch(variant: str):
    gen = torch.Generator().manual_seed(0)
    sae = build_sae(variant, 16, 256, 4, HPARAMS[variant], gen)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::5] = True  # AuxK has work
    return sae, torch.randn(32, 16, generator=gen), dead


def _steps(sae, optimizer, x, dead, n: int) -> None:
    for _ in range(n):
        train_step(sae, optimizer, x, dead, k_aux=8, aux_coef=1 / 32, grad_clip=1.0)


@pytest.mark.parametrize("variant", list(HPARAMS))
@pytest.mark.parametrize("fused", [True, False])
def test_same_parameters_as_torch_adam(variant: str, fused: bool):
    params = {}
    for cls in (torch.optim.Adam, SAEAdam):
        sae, x, dead = _sae_and_batch(variant)
        optimizer = cls(param_groups(sae), lr=1e-2, fused=fused)
        _steps(sae, optimizer, x, dead, 4)
        params[cls] = dict(sae.named_parameters())
    assert not params[SAEAdam]["W_enc"].is_contiguous()  # column-major: why aliases exist
    assert [p for p, _ in optimizer._aliases] == [params[SAEAdam]["W_enc"]]
    for name, p in params[torch.optim.Adam].items():
        assert torch.equal(params[SAEAdam][name], p), name
        assert params[SAEAdam][name].stride() == p.stride(), name  # updated in place


@pytest.mark.parametrize("first", [SAEAdam, torch.optim.Adam])
def test_resuming_from_a_state_dict_continues_the_run_exactly(first):
    """A state dict of SAEAdam, or of plain Adam (W_enc's state in W_enc's own shape), loaded
    into a new SAEAdam continues as the uninterrupted run, whatever the memory layout the state
    tensors come back in (here: made contiguous, as a store that drops strides would)."""
    reference, x, dead = _sae_and_batch("topk")
    _steps(reference, SAEAdam(param_groups(reference), lr=1e-2), x, dead, 6)
    sae, x, dead = _sae_and_batch("topk")
    optimizer = first(param_groups(sae), lr=1e-2, fused=True)
    _steps(sae, optimizer, x, dead, 3)
    resumed = SAEAdam(param_groups(sae), lr=1e-2)
    saved = optimizer.state_dict()
    for state in saved["state"].values():
        state.update({name: value.contiguous() for name, value in state.items()})
    resumed.load_state_dict(saved)
    _steps(sae, resumed, x, dead, 3)
    for name, p in reference.named_parameters():
        assert torch.equal(getattr(sae, name), p), name


def test_zero_grad_clears_the_original_parameters_gradients():
    sae, x, dead = _sae_and_batch("topk")
    optimizer = SAEAdam(param_groups(sae), lr=1e-2)
    _steps(sae, optimizer, x, dead, 1)
    alias = optimizer._aliases[0][1]
    assert sae.W_enc.grad is not None and sae.W_enc.grad.any()
    optimizer.zero_grad(set_to_none=False)
    assert not sae.W_enc.grad.any()
    optimizer.zero_grad()
    assert sae.W_enc.grad is None and alias.grad is None


def test_a_closure_gradients_reach_the_aliases():
    """step(closure): the closure's backward fills W_enc.grad; the aliased update sees it."""
    results = {}
    for cls in (torch.optim.Adam, SAEAdam):
        sae, x, _ = _sae_and_batch("topk")
        optimizer = cls(param_groups(sae), lr=1e-2, fused=True)

        def closure(sae=sae, optimizer=optimizer, x=x):
            optimizer.zero_grad()
            loss = (sae(x).recon - x).square().mean()
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        results[cls] = (loss.item(), sae.W_enc.detach().clone())
    assert results[SAEAdam][0] == results[torch.optim.Adam][0]
    assert torch.equal(results[SAEAdam][1], results[torch.optim.Adam][1])
