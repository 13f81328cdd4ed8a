"""The sparse training path (saelab.sae.sparse) against the dense forward it replaces: same
reconstruction, same codes, same gradient for every parameter, same training step."""

from __future__ import annotations

import pytest
import torch

from saelab.sae import build_sae
from saelab.sae.sparse import (
    SparseCode,
    gather_pre_acts,
    offsets_of,
    sparse_decode,
    weighted_row_sums,
)
from saelab.train import auxk_loss, fvu, train_step

D_IN, D_SAE, K, BATCH = 24, 1024, 4, 64  # d_sae: row_topk takes its two-level path
HPARAMS = {
    "topk": {},
    "batchtopk": {},
    "sampled": {"l": 4, "score": "l2", "pool": "sample", "seed": 0},
    "switch": {"n_experts": 4, "balance_coef": 3.0},
}
SPARSE_VARIANTS = list(HPARAMS)


def _sae_and_x(variant: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sae = build_sae(variant, D_IN, D_SAE, K, HPARAMS[variant], gen)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
        sae.init_b_dec_(torch.randn(D_IN, generator=gen) * 0.1)
    return sae.train(), torch.randn(BATCH, D_IN, generator=gen)


def _loss_and_grads(sae, x, dead, sparse: bool):
    """Recon, codes [batch, d_sae], and the gradient of fvu + AuxK + sparsity loss."""
    rng = sae.activation.rng_state()
    out = sae.forward_sparse(x) if sparse else sae(x)
    sae.activation.set_rng_state(rng)  # Sampled: both paths draw the same pool
    acts = out.code.to_dense(BATCH, D_SAE) if sparse else out.acts
    residual = (x - out.recon).detach()
    loss = fvu(x, out.recon) + auxk_loss(sae, x, residual, dead, 8) + sae.sparsity_loss(x, out)
    sae.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    return out.recon.detach(), acts.detach(), grads


@pytest.mark.parametrize("variant", SPARSE_VARIANTS)
def test_sparse_forward_and_gradients_equal_the_dense_forward(variant: str):
    sae, x = _sae_and_x(variant)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # AuxK has work, through pre_acts_of
    assert sae.sparse_training
    recon_d, acts_d, grads_d = _loss_and_grads(sae, x, dead, sparse=False)
    recon_s, acts_s, grads_s = _loss_and_grads(sae, x, dead, sparse=True)
    torch.testing.assert_close(recon_s, recon_d, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts_s, acts_d, rtol=1e-6, atol=1e-6)
    assert (acts_s > 0).sum() >= 0.9 * K * BATCH  # a real selection, not all zeros
    assert set(grads_s) == set(grads_d)
    for name in grads_d:
        assert grads_d[name].abs().sum() > 0, name  # every parameter has work to check
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["batchtopk", "sampled"])
def test_sparse_selection_sets_the_same_batch_threshold(variant: str):
    sae, x = _sae_and_x(variant)
    rng = sae.activation.rng_state()
    sae(x)
    dense_theta = sae.activation.last_min_kept
    sae.activation.set_rng_state(rng)
    sae.forward_sparse(x)
    assert float(dense_theta) > 0
    assert float(sae.activation.last_min_kept) == pytest.approx(float(dense_theta), rel=1e-6)


@pytest.mark.parametrize("variant", ["topk", "batchtopk", "switch"])
def test_sparse_train_step_equals_the_dense_train_step(variant: str):
    """Same metrics, fired mask and parameters after three optimiser steps."""
    results = {}
    for sparse in (False, True):
        sae, x = _sae_and_x(variant, seed=1)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[:20] = True
        for _ in range(3):
            r = train_step(sae, opt, x, dead, k_aux=8, aux_coef=1 / 32, grad_clip=1.0,
                           sparse=sparse)  # fmt: skip
        results[sparse] = (r, {n: p.detach().clone() for n, p in sae.named_parameters()})
    (r_d, params_d), (r_s, params_s) = results[False], results[True]
    assert torch.equal(r_s.fired, r_d.fired)
    for key, value in r_d.metrics.items():
        assert r_s.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    for name, p in params_d.items():
        torch.testing.assert_close(params_s[name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_gather_pre_acts_gradient_matches_autograd_of_the_formula():
    """All four inputs, x included, against autograd through the dense formula."""
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64) for s in
               ((8, 5), (5, 12), (12,), (5,))]  # fmt: skip
    x, W_enc, b_enc, b_dec = (t.requires_grad_() for t in tensors)
    rows = torch.tensor([0, 0, 1, 3, 3, 3, 7])
    cols = torch.tensor([2, 11, 2, 0, 5, 2, 9])
    weights = torch.randn(len(rows), generator=gen, dtype=torch.float64)
    pre = (x - b_dec) @ W_enc + b_enc
    expected = torch.autograd.grad((pre[rows, cols] * weights).sum(), (x, W_enc, b_enc, b_dec))
    values = gather_pre_acts(x, W_enc, b_enc, b_dec, pre.detach()[rows, cols], rows, cols)
    got = torch.autograd.grad((values * weights).sum(), (x, W_enc, b_enc, b_dec))
    torch.testing.assert_close(values, pre.detach()[rows, cols])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_weighted_row_sums_equals_the_sparse_matrix_product():
    """Unsorted output indices, a repeated (out, src) pair and output rows with no entry."""
    gen = torch.Generator().manual_seed(6)
    src = torch.randn(7, 5, generator=gen)
    out_index = torch.tensor([4, 0, 4, 2, 0, 4, 2])
    src_index = torch.tensor([1, 6, 3, 0, 6, 1, 5])
    weights = torch.randn(len(out_index), generator=gen)
    matrix = torch.zeros(6, 7).index_put((out_index, src_index), weights, accumulate=True)
    got = weighted_row_sums(out_index, src_index, weights, src, 6)
    torch.testing.assert_close(got, matrix @ src)
    assert got.is_contiguous() and not got[[1, 3, 5]].any()  # rows with no entry are zero


def test_sparse_decode_with_empty_tokens_equals_the_dense_product():
    gen = torch.Generator().manual_seed(5)
    W_dec, b_dec = torch.randn(10, 6, generator=gen), torch.randn(6, generator=gen)
    rows, cols = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1, 4, 0, 4, 9])
    code = SparseCode(torch.rand(5, generator=gen), rows, cols, offsets_of(rows, 4))
    assert code.offsets.tolist() == [0, 2, 2, 5]  # token 1 and 3 have no entry
    expected = code.to_dense(4, 10) @ W_dec + b_dec
    torch.testing.assert_close(sparse_decode(code, W_dec, b_dec), expected)
    assert code.l0(4).item() == pytest.approx(5 / 4)
    assert code.fired(10).nonzero().flatten().tolist() == [0, 1, 4, 9]
