"""Specifications of the SAE model and its sparsity strategies (CPU, seeded, hand-built inputs)."""

import json

import pytest
import torch

from saelab.sae import BatchTopK, SparseAutoencoder, TopK, make_activation
from saelab.sae.activations import batch_topk, row_topk

VARIANTS = ("topk", "batchtopk")


def _sae(variant: str, d_in: int = 8, d_sae: int = 32, k: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae, make_activation(variant, k), generator=gen)
    with torch.no_grad():  # non-trivial biases so that every term of the formulas matters
        sae.b_enc.normal_(0.0, 0.1, generator=gen)
        sae.b_dec.normal_(0.0, 1.0, generator=gen)
    return sae


def test_topk_keeps_the_k_largest_per_token():
    """TopK(2) keeps each row's two largest positive entries, values unchanged."""
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 4.0, 1.0]])
    expected = torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 4.0, 1.0]])
    assert torch.equal(TopK(2)(pre), expected)


def test_topk_never_keeps_negative_entries():
    """A row with one positive entry keeps only it: top-k is taken of relu(pre_acts)."""
    pre = torch.tensor([[-1.0, -2.0, 0.5, -3.0]])
    assert torch.equal(TopK(2)(pre), torch.tensor([[0.0, 0.0, 0.5, 0.0]]))


def test_topk_exactly_k_per_token_on_random_input():
    """With all pre-activations positive, every token has exactly k nonzero acts."""
    pre = torch.rand(64, 100, generator=torch.Generator().manual_seed(0)) + 0.1
    acts = TopK(7)(pre)
    assert torch.equal((acts > 0).sum(dim=1), torch.full((64,), 7))
    # The kept entries are the row's 7 largest: the smallest kept >= the largest dropped.
    kept_min = acts.masked_fill(acts == 0, float("inf")).min(dim=1).values
    dropped_max = pre.masked_fill(acts > 0, -float("inf")).max(dim=1).values
    assert torch.all(kept_min >= dropped_max)


def test_batchtopk_known_answer_and_min_kept():
    """BatchTopK(2) on 2 tokens keeps the 2 * 2 = 4 largest of relu(pre) across the batch.

    Values: 5, 4, 3 (token 0) and 1 (token 1) are the four largest, so token 0 uses 3 latents and
    token 1 uses 1; the smallest kept activation is 1.
    """
    act = BatchTopK(2).train()
    pre = torch.tensor([[5.0, 4.0, 3.0, -1.0], [0.5, -2.0, 1.0, -3.0]])
    expected = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert torch.equal(act(pre), expected)
    assert act.last_min_kept.item() == 1.0


def test_batchtopk_exactly_k_times_batch_over_the_batch():
    """On random positive input, k * batch entries are kept in all, not k per token."""
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(200, 300, generator=gen).exp()  # all positive, skewed
    acts = BatchTopK(5).train()(pre)
    per_token = (acts > 0).sum(dim=1)
    assert per_token.sum().item() == 5 * 200
    assert per_token.min() < 5 < per_token.max()  # tokens differ from k both ways
    kept = acts[acts > 0]
    assert kept.min() >= pre[acts == 0].max()  # the largest are kept
    assert kept.min() == pre.flatten().topk(5 * 200).values.min()


@pytest.mark.parametrize("shift", [0.0, -2.5, -6.0])
def test_batchtopk_selection_equals_full_topk(shift: float):
    """The candidate-filtered selection keeps the same entries as topk over the whole batch.

    shift -6 leaves fewer positive entries than k * batch, which exercises the fallback.
    """
    gen = torch.Generator().manual_seed(2)
    relu = (torch.randn(1024, 96, generator=gen) + shift).relu()
    n_keep = 8 * 1024
    rows, cols = batch_topk(relu, n_keep)
    assert bool((rows[1:] >= rows[:-1]).all())  # token-major
    fast = relu[rows, cols].sort().values
    full = relu.flatten().topk(n_keep).values.sort().values
    assert torch.equal(fast, full)


def _assert_row_topk_exact(x: torch.Tensor, k: int) -> None:
    values, indices = row_topk(x, k)
    assert values.shape == indices.shape == (x.shape[0], k) and indices.dtype == torch.int64
    assert torch.equal(x.gather(1, indices), values)  # the indices point at the values
    assert bool((indices.sort(dim=1).values.diff(dim=1) > 0).all())  # k distinct entries
    assert torch.equal(values.sort(dim=1).values, x.topk(k, dim=1).values.sort(dim=1).values)


@pytest.mark.parametrize(
    ("n", "k"),
    [(2048, 32), (4608, 32), (4608, 128), (16384, 32), (16384, 128), (1000, 32), (256, 64)],
)  # the two-level paths (chunks of 8 or 4, groups of 8 or 4); fallbacks: 1000 (no split), 256
def test_row_topk_selects_the_same_values_as_topk(n: int, k: int):
    """Each row's k largest values, exactly, whatever path row_topk takes."""
    x = torch.randn(64, n, generator=torch.Generator().manual_seed(n + k))
    _assert_row_topk_exact(x, k)


def test_row_topk_with_ties_and_clustered_maxima():
    """Ties (few distinct values) and rows whose k largest entries share few chunks and one
    group (entry j is in chunk j mod n/8, group j mod n/64 at n = 4096, k = 32): the same values
    as topk, k distinct indices."""
    gen = torch.Generator().manual_seed(4)
    ties = torch.randint(0, 4, (16, 4096), generator=gen).float()
    _assert_row_topk_exact(ties, 32)
    clustered = torch.randn(16, 4096, generator=gen)
    same_group = torch.arange(32) * 64 + 5  # group 5: 4 entries in each of its 8 chunks
    clustered[:, same_group] += 10.0
    _assert_row_topk_exact(clustered, 32)
    values, indices = row_topk(clustered, 32)
    assert torch.equal(indices.sort(dim=1).values, same_group.expand(16, 32))
    _assert_row_topk_exact(clustered[:, ::2], 32)  # not contiguous: the plain topk


def test_batchtopk_selection_with_one_token_holding_most_of_the_batch():
    """A token with far more than 4x its share of the kept entries (its candidates are all
    kept) makes the per-token candidates insufficient: the result is still the exact set."""
    gen = torch.Generator().manual_seed(3)
    pre = torch.randn(256, 512, generator=gen)
    pre[7] += 10.0  # token 7 alone outranks everything else: 512 kept entries in one row
    n_keep = 4 * 256
    rows, cols = batch_topk(pre, n_keep)
    assert torch.equal(
        pre[rows, cols].sort().values, pre.flatten().topk(n_keep).values.sort().values
    )
    assert int((rows == 7).sum()) == 512 and bool((rows[1:] >= rows[:-1]).all())


def test_batchtopk_gradient_reaches_only_kept_entries():
    """d(sum acts)/d(pre) is 1 on kept entries and 0 elsewhere."""
    pre = torch.tensor([[5.0, 4.0, 3.0, -1.0], [0.5, -2.0, 1.0, -3.0]], requires_grad=True)
    acts = BatchTopK(2).train()(pre)
    acts.sum().backward()
    assert torch.equal(pre.grad, (acts > 0).float())


def test_batchtopk_eval_is_a_jumprelu_at_the_threshold():
    """Eval mode: acts = pre * (pre > θ). With θ = 1.5, 1.5 itself and 1.49 are dropped."""
    act = BatchTopK(2).eval()
    act.threshold.fill_(1.5)
    pre = torch.tensor([[2.0, 1.5, 1.0, -3.0], [1.6, 0.0, 4.0, 1.49]])
    expected = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.6, 0.0, 4.0, 0.0]])
    assert torch.equal(act(pre), expected)


def test_batchtopk_eval_is_independent_of_the_batch():
    """Eval mode: a token's code is the same alone or inside any batch (unlike training)."""
    sae = _sae("batchtopk").eval()
    sae.activation.threshold.fill_(0.3)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    together = sae.encode(x)
    alone = torch.cat([sae.encode(x[i : i + 1]) for i in range(16)])
    assert torch.equal(together > 0, alone > 0)
    assert torch.allclose(together, alone, atol=1e-6)  # matmul rounding may differ by batch size


def test_make_activation_names_and_errors():
    """The factory builds each variant with its k and rejects unknown names, listing the allowed."""
    assert isinstance(make_activation("topk", 3), TopK)
    assert make_activation("batchtopk", 5).k == 5
    allowed = "allowed: batchtopk, jumprelu, matryoshka, relu, sampled, topk"
    with pytest.raises(ValueError, match=allowed):
        make_activation("gated", 3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_follows_gao(variant: str):
    """Decoder rows unit norm, W_enc = W_dec^T (a copy, not a view), zero biases."""
    sae = SparseAutoencoder(6, 20, make_activation(variant, 3))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(20))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sae.W_enc.shape == (6, 20) and sae.W_dec.shape == (20, 6)


def test_forward_matches_the_formulas():
    """pre = (x - b_dec) W_enc + b_enc; acts = TopK(pre); recon = acts W_dec + b_dec."""
    sae = _sae("topk")
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(out.pre_acts, pre, atol=1e-5)
    assert torch.equal(out.acts, TopK(4)(out.pre_acts))
    assert torch.allclose(out.recon, out.acts @ sae.W_dec + sae.b_dec, atol=1e-6)


def test_normalize_decoder_gives_unit_rows():
    """After normalize_decoder_ every decoder row has norm 1, direction unchanged."""
    sae = _sae("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 33, dtype=torch.float32)[:, None])
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.allclose(sae.W_dec * before.norm(dim=1, keepdim=True), before, atol=1e-5)


def test_remove_parallel_grad_known_answer():
    """Row w = (1, 0), grad g = (3, 4): the parallel part (3, 0) goes, (0, 4) stays."""
    sae = SparseAutoencoder(2, 1, make_activation("topk", 1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0]]))
    sae.W_dec.grad = torch.tensor([[3.0, 4.0]])
    sae.remove_parallel_decoder_grad_()
    assert torch.equal(sae.W_dec.grad, torch.tensor([[0.0, 4.0]]))


def test_remove_parallel_grad_leaves_grad_orthogonal_to_rows():
    """After removal, each row of W_dec.grad is orthogonal to the matching row of W_dec."""
    sae = _sae("topk")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    (sae(x).recon - x).pow(2).sum().backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() > 1e-3  # not trivially 0 before
    sae.remove_parallel_decoder_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_input_scale_keeps_acts_and_divides_recon(variant: str):
    """An SAE trained on c x, folded with c, gives on x the same acts and recon / c."""
    sae = _sae(variant).eval()
    if variant == "batchtopk":
        sae.activation.threshold.fill_(0.2)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    c = 3.7
    scaled = sae(c * x)
    sae.fold_input_scale_(c)
    folded = sae(x)
    assert torch.equal(folded.acts > 0, scaled.acts > 0)
    assert torch.allclose(folded.acts, scaled.acts, atol=1e-5)
    assert torch.allclose(folded.recon, scaled.recon / c, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(tmp_path, variant: str):
    """save -> load gives identical outputs, the threshold, and the metadata in cfg.json."""
    sae = _sae(variant).eval()
    if variant == "batchtopk":
        sae.activation.threshold.fill_(0.25)
    sae.save(tmp_path, metadata={"hookpoint": "blocks.15.hook_resid_pre", "input_scale": 0.5})
    loaded = SparseAutoencoder.load(tmp_path)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))
    assert not loaded.training
    assert torch.equal(loaded(x).recon, sae(x).recon)
    assert torch.equal(loaded(x).acts, sae(x).acts)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["variant"] == variant and cfg["k"] == 4 and cfg["d_sae"] == 32
    assert cfg["metadata"]["input_scale"] == 0.5
    if variant == "batchtopk":
        assert loaded.activation.threshold.item() == 0.25


def test_load_errors_are_clear(tmp_path):
    """A missing file is FileNotFoundError; an unknown variant or missing tensor is ValueError."""
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path)
    _sae("batchtopk").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"variant": "nope"}))
    with pytest.raises(ValueError, match="unknown SAE variant 'nope'"):
        SparseAutoencoder.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"variant": "topk"}))
    with pytest.raises(ValueError, match="threshold"):  # topk has no threshold tensor
        SparseAutoencoder.load(tmp_path)


def test_forward_train_and_infer_do_not_depend_on_the_module_mode():
    """forward_train is BatchTopK's batch rule and infer its threshold rule in either mode: in
    training mode both equal what sae(x) gives in that mode; infer is pre * (pre > θ) and
    forward_train keeps k * batch entries (all pre-activations made positive)."""
    sae = _sae("batchtopk")
    sae.activation.threshold.fill_(0.3)
    with torch.no_grad():
        sae.b_enc.add_(10.0)  # every pre-activation > 0, so the k * batch kept entries are > 0
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(8))
    train_acts, eval_acts = sae.train()(x).acts, sae.eval()(x).acts
    pre = sae.encode_pre(x)
    assert torch.equal(eval_acts, torch.where(pre > 0.3, pre, 0.0))
    assert int((train_acts > 0).sum()) == 4 * 16
    for mode in (True, False):
        sae.train(mode)
        assert torch.equal(sae.forward_train(x).acts, train_acts)
        assert torch.equal(sae.infer(x).acts, eval_acts)
        assert torch.equal(sae.encode(x), eval_acts)


def test_topk_dense_code_is_relu_at_its_selection():
    """TopK's dense acts are relu(pre) at select()'s entries and 0 elsewhere (one rule), equal
    to the k largest of torch.topk on tie-free inputs."""
    act = TopK(3)
    pre = torch.randn(5, 40, generator=torch.Generator().manual_seed(9))
    rows, cols = act.select(pre)
    expected = torch.zeros_like(pre)
    expected[rows, cols] = pre[rows, cols].relu()
    assert torch.equal(act(pre), expected)
    values, indices = pre.topk(3, dim=1)
    assert torch.equal(act(pre), torch.zeros_like(pre).scatter(1, indices, values.relu()))
