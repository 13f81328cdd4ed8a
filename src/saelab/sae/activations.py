"""Sparsity strategies: pre-activations -> sparse codes.

Every SAE variant shares one :class:`~saelab.sae.model.SparseAutoencoder`; they differ only in the
module that turns pre-activations into sparse codes. A new variant (JumpReLU, ReLU+L1, Sampled-SAE)
is a new :class:`SparsityActivation` subclass with a :class:`~saelab.sae.registry.VariantSpec`
(see :mod:`saelab.sae.registry`).

Shapes: ``batch`` tokens, ``d_sae`` latents. Inputs and outputs are float32 (any float dtype works;
the output has the input's dtype).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from saelab import distributed
from saelab.sae import registry
from saelab.sae.registry import HParam, VariantSpec, register
from saelab.sae.sparse import SparseCode
from saelab.sae.topk import batch_topk as batch_topk  # re-exported (the kernels moved)
from saelab.sae.topk import global_batch_topk, row_topk


class SparsityActivation(nn.Module):
    """Base class: ``forward(pre_acts [batch, d_sae]) -> acts [batch, d_sae]``, acts >= 0.

    Training and inference are two explicit functions, so that no caller depends on remembering
    ``.train()`` / ``.eval()``:

    - :meth:`training_acts`: the function the trainer differentiates. For the top-k families it
      is relu(pre_acts) at the entries of :meth:`select`, the one place the selection rule is
      written (:func:`acts_at`).
    - :meth:`inference_acts`: the function a user of the trained SAE gets, one token at a time.

    A per-token strategy (TopK, ReLU, JumpReLU) implements ``forward`` only: both functions are
    it. A batch-level one (``batch_level``: BatchTopK and its subclasses) overrides both, and its
    ``forward`` follows the ``nn.Module`` mode (training: :meth:`training_acts`, eval:
    :meth:`inference_acts`) for torch users; the library calls the two functions by name.

    Subclasses set the class attribute ``variant`` (the name used by :func:`make_activation` and
    stored in ``cfg.json``) and expose ``k``, the target mean number of active latents per token.
    The hooks below have neutral defaults, so a strategy overrides only what it needs:

    - ``sparse_training``: the strategy implements :meth:`select` (and, when it has a sparsity
      loss, :meth:`sparse_sparsity_loss`), so the trainer can use the sparse path of
      :mod:`saelab.sae.sparse` (top-k families, ReLU, JumpReLU).
    - :meth:`sparse_acts`: the acts at the selected entries from their pre-activations (relu;
      JumpReLU's own function).
    - ``autocast_safe``: whether training keeps its metrics with bf16 pre-activations
      (``train.autocast``); false makes the trainer run the strategy in float32.
    - ``uses_auxk``: whether the trainer adds the AuxK loss on dead latents (Gao et al. 2024,
      appendix A.2); true for the top-k families, whose dead latents get no other gradient.
    - :meth:`bind`: called once by the SAE with its width, to create per-latent state.
    - :meth:`init_from_batch_`: called once by the trainer on the first (scaled) batch; may set
      the strategy's own state and the SAE's encoder bias.
    - :meth:`sparsity_loss`: a penalty added to the training loss (L1, L0, ...).
    - :meth:`hparams`: the constructor's keyword arguments, saved in ``cfg.json`` so that
      ``make_activation(variant, k, **hparams)`` rebuilds the same strategy on load.
    - ``lr_scale``: learning-rate multiplier for the strategy's own parameters (if any).
    - ``unit_norm_decoder``: whether the trainer keeps decoder rows at unit norm (removing the
      parallel gradient, Gao et al. 2024, sec. 2.4); false for ReLU + L1, whose recipe
      (Conerly et al. 2024) leaves decoder norms free and weights the L1 term by them.
    - ``decoder_init_norm``: norm of every decoder row at init (1 unless the recipe says else).
    - ``sparsity_warmup``: fraction of the training steps over which the trainer ramps the
      sparsity loss's weight linearly from 0 to 1 (0: none); the λ warm-up of the L1 and L0
      recipes (Conerly et al. 2024; Rajamanoharan et al. 2024).
    - :meth:`rng_state` / :meth:`set_rng_state`: the strategy's own RNG, for training
      checkpoints (none by default).
    """

    variant: str = ""
    batch_level: bool = False
    uses_auxk: bool = False
    sparse_training: bool = False
    autocast_safe: bool = True
    lr_scale: float = 1.0
    unit_norm_decoder: bool = True
    decoder_init_norm: float = 1.0
    sparsity_warmup: float = 0.0
    k: int

    def forward(self, pre_acts: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_acts(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae], the training function (class
        docstring), whatever the module's mode; ``forward`` unless ``batch_level``."""
        return self.forward(pre_acts)

    def inference_acts(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae], the inference function: each row's
        acts depend on that row only, whatever the module's mode; ``forward`` unless
        ``batch_level``."""
        return self.forward(pre_acts)

    def bind(self, d_sae: int, d_in: int | None = None) -> None:
        """Size per-latent state for ``d_sae`` latents of an SAE on ``d_in``-wide inputs
        (called by ``SparseAutoencoder``; None: unknown, as in unit tests)."""

    @torch.no_grad()
    def init_from_batch_(self, pre_acts: Tensor, b_enc: Tensor | None = None) -> None:
        """Data-dependent init from the first training batch's ``pre_acts [batch, d_sae]``;
        ``b_enc [d_sae]`` is the SAE's encoder bias (that ``pre_acts`` include), which a strategy
        may shift in place. A no-op unless overridden."""

    def sparsity_loss(self, pre_acts: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
        """Weighted sparsity penalty, a scalar attached to the graph; 0 unless overridden.

        Args:
            pre_acts: [batch, d_sae], acts: [batch, d_sae] (this module's output on pre_acts),
            W_dec: [d_sae, d_in], the decoder (for norm-weighted penalties).
        """
        return pre_acts.new_zeros(())

    def hparams(self) -> dict[str, Any]:
        """Hyperparameters besides k, JSON-serialisable (``make_activation`` keywords)."""
        return {}

    def select(self, pre_acts: Tensor) -> tuple[Tensor, Tensor] | None:
        """The entries the training rule keeps, for the sparse training path
        (:mod:`saelab.sae.sparse`): ``(rows, cols)``, [nnz] int64 each, rows non-decreasing, such
        that :meth:`training_acts` is :meth:`sparse_acts` at those entries and 0 elsewhere (for
        the top-k families and ReLU, ``relu(pre_acts)`` there: :func:`acts_at`; JumpReLU's
        entries also cover its STE kernel, acts 0 where z <= θ). Called without autograd on
        ``pre_acts [batch, d_sae]``; may update state as ``forward`` does (BatchTopK's
        ``last_min_kept``). Only strategies with ``sparse_training`` implement it. A strategy
        whose L0 varies (ReLU, JumpReLU) may return None when too many entries are active for
        the sparse path to pay (:func:`_active_entries`); the SAE then runs the dense
        :meth:`~saelab.sae.model.SparseAutoencoder.forward_train`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no sparse training path")

    def sparse_acts(self, pre_N: Tensor, cols: Tensor) -> Tensor:
        """acts [nnz] at the entries of :meth:`select` from their pre-activations ``pre_N
        [nnz]`` float32 (attached to the graph) at latents ``cols [nnz]`` int64: what
        ``forward`` gives at those entries, with its gradient; relu unless overridden."""
        return pre_N.relu()

    def sparse_sparsity_loss(
        self, pre_N: Tensor, code: SparseCode, W_dec: Tensor, batch: int
    ) -> Tensor:
        """:meth:`sparsity_loss` on the sparse path: the same scalar and gradients from the
        selected entries only. ``pre_N [nnz]`` float32: their pre-activations (detached),
        ``code``: their acts (attached), ``W_dec [d_sae, d_in]``, ``batch``: this rank's
        tokens. 0 unless overridden."""
        return W_dec.new_zeros(())

    def rng_state(self) -> Tensor | None:
        """State of the strategy's own RNG (a uint8 tensor, ``torch.Generator.get_state``), or
        None when it has none (yet)."""
        return None

    def set_rng_state(self, state: Tensor | None) -> None:
        """Restore a state returned by :meth:`rng_state`."""


class TopK(SparsityActivation):
    """Per token, keep the k largest of relu(pre_acts), zero the rest (Gao et al. 2024, sec. 2.3).

    Exactly k entries per token are kept; fewer are nonzero when a token has fewer than k positive
    pre-activations.
    """

    variant = "topk"
    uses_auxk = True
    sparse_training = True

    def __init__(self, k: int) -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"TopK: k must be > 0, got {k}")
        self.k = k

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae], at most k nonzero per row: relu at
        :meth:`select`'s entries."""
        with torch.no_grad():
            rows, cols = self.select(pre_acts.detach())
        return acts_at(pre_acts, rows, cols)

    def select(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) [batch * k] int64 of each token's k largest pre-activations (the
        largest of their relu too: relu is monotone, and relu on the k kept values only is
        cheaper than on the whole [batch, d_sae] tensor)."""
        batch, d_sae = pre_acts.shape
        k = min(self.k, d_sae)
        cols_BK = row_topk(pre_acts, k)[1]
        rows = torch.arange(batch, device=pre_acts.device).repeat_interleave(k)
        return rows, cols_BK.flatten()

    def extra_repr(self) -> str:
        return f"k={self.k}"


class BatchTopK(SparsityActivation):
    """BatchTopK (Bussmann et al. 2024, sec. 3) in training, a global JumpReLU at inference.

    Training (:meth:`training_acts`, :meth:`select`): keep the ``k * batch`` largest entries of
    relu(pre_acts) across the whole batch, so the batch's mean L0 is k while one token may use
    more or fewer than k latents. The
    smallest positive kept value of the batch, i.e. the global threshold that keeps the same
    entries (:meth:`batch_threshold`), is stored (detached, fp32 scalar tensor, NaN when nothing
    positive was kept) in ``last_min_kept`` for the trainer's threshold estimate, but only while
    ``estimating`` is true (the trainer sets it on the steps whose estimates it averages) and the
    pre-activations are float32. Otherwise ``last_min_kept`` is None; under bf16 autocast the
    trainer then computes :meth:`batch_threshold` on float32 pre-activations itself, so θ never
    carries bf16 rounding (~0.4% of the value).

    Inference (:meth:`inference_acts`): ``acts = pre_acts * (pre_acts > threshold)`` with one
    global threshold θ (the ``threshold`` buffer, fp32 scalar, saved with the model), so a
    token's code no longer depends on the rest of its batch. θ is 0 (plain ReLU) until the
    trainer sets it.
    """

    variant = "batchtopk"
    batch_level = True
    uses_auxk = True
    sparse_training = True
    threshold: Tensor

    def __init__(self, k: int) -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"{type(self).__name__}: k must be > 0, got {k}")
        self.k = k
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.last_min_kept: Tensor | None = None
        self.estimating = True  # record last_min_kept in select (set by the trainer)

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae]: :meth:`training_acts` in training
        mode, :meth:`inference_acts` in eval mode (the ``nn.Module`` convention; the library
        calls the two by name)."""
        return self.training_acts(pre_acts) if self.training else self.inference_acts(pre_acts)

    def training_acts(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae]: relu at :meth:`select`'s entries, the
        ``k * batch`` largest of the batch (class docstring); sets ``last_min_kept``."""
        with torch.no_grad():
            rows_N, cols_N = self.select(pre_acts.detach())
        return acts_at(pre_acts, rows_N, cols_N)

    def inference_acts(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae] = pre_acts * (pre_acts > θ), a
        JumpReLU with one global threshold (class docstring)."""
        return torch.where(pre_acts > self.threshold, pre_acts, 0.0)

    @torch.no_grad()
    def select(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) [k * batch] int64 of the kept entries (the training rule), token-major;
        sets ``last_min_kept`` (class docstring)."""
        rows_N, cols_N = self._kept(pre_acts)
        self._record_threshold(pre_acts, pre_acts[rows_N, cols_N].relu())
        return rows_N, cols_N

    @torch.no_grad()
    def _record_threshold(self, pre_acts: Tensor, values_N: Tensor) -> None:
        """``last_min_kept`` = :meth:`batch_threshold` while ``estimating`` on float32
        ``pre_acts``, else None (class docstring)."""
        fp32 = pre_acts.dtype == torch.float32
        self.last_min_kept = (
            self.batch_threshold(pre_acts, values_N) if self.estimating and fp32 else None
        )

    @torch.no_grad()
    def batch_threshold(self, pre_acts: Tensor, values_N: Tensor | None = None) -> Tensor:
        """The batch's threshold estimate (fp32 scalar tensor, NaN if none) for ``pre_acts
        [batch, d_sae]``: the smallest positive of the ``k * batch`` largest entries, the global
        threshold that selects this batch's kept set (Bussmann et al. 2024, sec. 3).
        ``values_N`` [k * batch]: the kept acts when the caller has them (their minimum is the
        answer); None: the selection is redone on ``pre_acts`` (use float32 for a float32 θ)."""
        if values_N is None:
            rows_N, cols_N = global_batch_topk(pre_acts, self.k)
            values_N = pre_acts[rows_N, cols_N]
        return _min_positive(values_N)

    def _kept(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) [k * batch] int64, token-major, of the entries the training rule keeps:
        the ``k * batch`` largest of ``pre_acts [batch, d_sae]`` (the largest of its relu, up to
        ties among entries <= 0, whose act is 0 either way). The one step subclasses change.
        In data-parallel training, the largest of the global batch (:func:`global_batch_topk`)."""
        return global_batch_topk(pre_acts, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, threshold={float(self.threshold):.6g}"


def acts_at(pre_acts: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[batch, d_sae] acts equal to relu(``pre_acts [batch, d_sae]``) at the entries ``(rows,
    cols)`` ([nnz] int64 each, distinct) and 0 elsewhere, in ``pre_acts``' dtype and attached
    to its graph through the kept values only: the dense form of a selection
    (:meth:`SparsityActivation.select`)."""
    kept_N = rows * pre_acts.shape[1] + cols  # flat indices
    values_N = pre_acts.flatten().gather(0, kept_N).relu()
    return torch.zeros_like(pre_acts).flatten().scatter_(0, kept_N, values_N).view_as(pre_acts)


def _min_positive(values: Tensor) -> Tensor:
    """Smallest positive entry of ``values`` as an fp32 scalar tensor, NaN when none is > 0;
    in data-parallel training, over every rank's ``values``."""
    positive = values[values > 0]
    if distributed.world_size() > 1:
        local = positive.min().float() if positive.numel() else values.new_tensor(math.inf)
        smallest = distributed.all_min(local.float())
        return smallest if bool(smallest.isfinite()) else torch.full_like(smallest, math.nan)
    if positive.numel() == 0:
        return torch.full((), float("nan"), device=values.device)
    return positive.min().float()


# Largest share of active entries, nnz / (batch * d_sae), at which ReLU and JumpReLU train on
# the sparse path; above it (e.g. ReLU with b_enc = 0: L0 ~ d_sae / 2) they take the dense
# forward, whose three GEMMs beat ~4 gather passes of nnz rows somewhere around this share (an
# estimate, not a measured crossover; docs/performance.md). Also bounds the index memory (two
# int64 per entry). A speed knob only: both paths compute the same function.
_SPARSE_MAX_DENSITY = 1 / 16


def _active_entries(mask_BS: Tensor, max_density: float) -> tuple[Tensor, Tensor] | None:
    """(rows, cols) [nnz] int64 of the True entries of ``mask_BS [batch, d_sae]`` bool,
    token-major (rows non-decreasing, cols increasing within a row), or None when more than a
    share ``max_density`` of the entries are True (counted before any index is built)."""
    if int(mask_BS.sum()) > max_density * mask_BS.numel():
        return None
    flat_N = mask_BS.view(-1).nonzero().squeeze(1)
    d_sae = mask_BS.shape[1]
    return torch.div(flat_N, d_sae, rounding_mode="floor"), flat_N % d_sae


class ReLU(SparsityActivation):
    """ReLU + L1 as in Anthropic's April 2024 recipe (Conerly et al. 2024, "Circuits Updates,
    April 2024", "Training SAEs"; SAELens's ``standard`` training with
    ``scale_sparsity_penalty_by_decoder_norm``; dictionary_learning's
    ``StandardTrainerAprilUpdate``).

    ``acts = relu(pre_acts)``; sparsity loss ``l1_coef * mean_t sum_i f_ti ||W_dec,i||``. The
    recipe's three parts:

    - decoder norms are unconstrained (``unit_norm_decoder`` false: the trainer neither
      renormalises the rows nor removes the parallel gradient), so the norm weighting is what
      stops the SAE from shrinking f_i and growing ||W_dec,i|| to dodge the L1 penalty;
    - decoder rows start as random directions of norm ``decoder_init_norm`` (the update: 0.05
      to 1 depending on the model; 0.1 in SAELens), ``W_enc = W_dec^T``;
    - λ warm-up: the trainer ramps ``l1_coef`` linearly from 0 over the first
      ``sparsity_warmup`` fraction of the steps (the update: 5%).

    L0 follows from ``l1_coef``; ``k`` only sets the init.

    ``init_b_enc``: ``zero`` is the update's ``b_enc = 0``, where about half the latents fire on
    every token at first (L0 ~2,300 of 4,608 on SmolLM2). Adam moves b_enc by about lr per
    step, ~0.1 in a few hundred steps, far less than the pre-activations' spread, so a short run
    cannot bring L0 down to tens (it ended at L0 ~1,600 with FVU 0.8 at step 82 of 224).
    ``quantile`` (ours) subtracts from each b_enc_i the ``(1 - k / d_sae)`` quantile of latent
    i's pre-activations on the first batch, so every latent starts firing on a fraction k / d_sae
    of the tokens, L0 starts at k, and the L1 term has to keep it there rather than bring it
    down by two orders of magnitude.
    """

    variant = "relu"
    unit_norm_decoder = False
    sparse_training = True
    sparse_max_density = _SPARSE_MAX_DENSITY
    INIT_B_ENC = ("zero", "quantile")

    def __init__(
        self,
        k: int,
        l1_coef: float,
        init_b_enc: str,
        sparsity_warmup: float = 0.0,
        decoder_init_norm: float = 1.0,
    ) -> None:
        super().__init__()
        if k <= 0 or not l1_coef >= 0 or init_b_enc not in self.INIT_B_ENC:
            raise ValueError(
                f"ReLU: need k > 0, l1_coef >= 0, init_b_enc in {self.INIT_B_ENC}; "
                f"got k={k}, l1_coef={l1_coef}, init_b_enc={init_b_enc!r}"
            )
        if not 0 <= sparsity_warmup <= 1 or not decoder_init_norm > 0:
            raise ValueError(
                "ReLU: need 0 <= sparsity_warmup <= 1 and decoder_init_norm > 0; got "
                f"{sparsity_warmup}, {decoder_init_norm}"
            )
        self.k = k
        self.l1_coef = l1_coef
        self.init_b_enc = init_b_enc
        self.sparsity_warmup = sparsity_warmup
        self.decoder_init_norm = decoder_init_norm

    @torch.no_grad()
    def init_from_batch_(self, pre_acts: Tensor, b_enc: Tensor | None = None) -> None:
        """``quantile``: ``b_enc_i -= q_i``, q_i the ``ceil(batch * (1 - k / d_sae))``-th
        smallest of ``pre_acts[:, i]`` ([batch, d_sae]), so that about ``k * batch / d_sae``
        tokens of the batch have ``pre_acts_ti - q_i > 0`` (class docstring)."""
        if self.init_b_enc == "zero" or b_enc is None:
            return
        batch, d_sae = pre_acts.shape
        rank = min(batch, max(1, math.ceil(batch * (1 - self.k / d_sae))))
        b_enc -= pre_acts.float().kthvalue(rank, dim=0).values.to(b_enc.dtype)

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae] = relu(pre_acts)."""
        return pre_acts.relu()

    def sparsity_loss(self, pre_acts: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
        """``l1_coef * mean_t sum_i acts_ti ||W_dec,i||`` (scalar); acts >= 0, so |f| = f."""
        return self.l1_coef * distributed.global_mean(acts @ W_dec.norm(dim=1))

    @torch.no_grad()
    def select(self, pre_acts: Tensor) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) [nnz] int64 of the entries of ``pre_acts [batch, d_sae]`` > 0, the
        support of relu (and of its gradient), token-major; None above ``sparse_max_density``."""
        return _active_entries(pre_acts > 0, self.sparse_max_density)

    def sparse_sparsity_loss(
        self, pre_N: Tensor, code: SparseCode, W_dec: Tensor, batch: int
    ) -> Tensor:
        """:meth:`sparsity_loss` from the ``nnz`` active entries: ``l1_coef * mean_t sum_e
        acts_e ||W_dec,c_e||`` over token t's entries e (the other acts are 0). The gradient of
        the norms reaches every row of ``W_dec`` with an active entry, as in the dense form."""
        weighted_N = code.values * W_dec.norm(dim=1)[code.cols]
        per_token_B = weighted_N.new_zeros(batch).index_add(0, code.rows, weighted_N)
        return self.l1_coef * distributed.global_mean(per_token_B)

    def hparams(self) -> dict[str, Any]:
        return {
            "l1_coef": self.l1_coef,
            "init_b_enc": self.init_b_enc,
            "sparsity_warmup": self.sparsity_warmup,
            "decoder_init_norm": self.decoder_init_norm,
        }

    def extra_repr(self) -> str:
        return f"k={self.k}, l1_coef={self.l1_coef:g}"


def _rectangle(u: Tensor) -> Tensor:
    """Rectangle kernel ``K(u) = 1 if |u| < 1/2 else 0`` (Rajamanoharan et al. 2024, sec. 4)."""
    return (u.abs() < 0.5).to(u.dtype)


def _theta_at(theta_S: Tensor, cols: Tensor | None) -> Tensor:
    """θ per entry: ``theta_S [d_sae]`` itself (broadcast over the rows of a dense ``z [batch,
    d_sae]``), or ``theta_S[cols]`` [nnz] for the entries of the sparse path."""
    return theta_S if cols is None else theta_S[cols]


def _per_latent(v: Tensor, cols: Tensor | None, d_sae: int) -> Tensor:
    """Sum of ``v`` over each latent's entries, [d_sae]: over the rows of a dense ``v [batch,
    d_sae]``, or over the entries ``e`` with ``cols[e] == i`` of a sparse ``v [nnz]``."""
    if cols is None:
        return v.sum(0)
    return v.new_zeros(d_sae).index_add_(0, cols, v)


class _JumpReLUFn(torch.autograd.Function):
    """``z * H(z - θ)`` with the straight-through estimator of Rajamanoharan et al. 2024, sec. 4,
    eq. 11: ``∂/∂z = H(z - θ)`` and the pseudo-derivative ``∂/∂θ = -(θ / ε) K((z - θ) / ε)``.

    z [batch, d_sae] (any float dtype), θ [d_sae] float32 (> 0), ε = bandwidth. The sparse path
    passes ``cols`` [nnz] int64 and ``z [nnz]``, the entries at those latents (every entry with
    a nonzero act or kernel, :meth:`JumpReLU.select`): the same formula entry by entry, θ_i's
    gradient summed over latent i's entries.
    """

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, theta_S: Tensor, bandwidth: float, cols: Tensor | None = None
    ) -> Tensor:
        ctx.save_for_backward(z, theta_S, cols)
        ctx.bandwidth = bandwidth
        return torch.where(z > _theta_at(theta_S, cols), z, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, theta_S, cols = ctx.saved_tensors
        theta = _theta_at(theta_S, cols)
        grad_z = torch.where(z > theta, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((z.float() - theta) / ctx.bandwidth)
            sums_S = _per_latent(kernel * grad.float(), cols, theta_S.shape[0])
            grad_theta = -(theta_S / ctx.bandwidth) * sums_S
        return grad_z, grad_theta, None, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``H(z - θ)`` with the straight-through estimator of Rajamanoharan et al. 2024,
    sec. 4, eq. 12: ``∂/∂z = 0`` and ``∂/∂θ = -(1 / ε) K((z - θ) / ε)``.

    z [batch, d_sae] (any float dtype), θ [d_sae] float32, ε = bandwidth; output float32. With
    ``cols`` [nnz] int64 and ``z [nnz]``: the sparse form, as :class:`_JumpReLUFn`.
    """

    @staticmethod
    def forward(
        ctx: Any, z: Tensor, theta_S: Tensor, bandwidth: float, cols: Tensor | None = None
    ) -> Tensor:
        ctx.save_for_backward(z, theta_S, cols)
        ctx.bandwidth = bandwidth
        return (z > _theta_at(theta_S, cols)).float()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, theta_S, cols = ctx.saved_tensors
        grad_z = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        grad_theta = None
        if ctx.needs_input_grad[1]:
            kernel = _rectangle((z.float() - _theta_at(theta_S, cols)) / ctx.bandwidth)
            sums_S = _per_latent(kernel * grad.float(), cols, theta_S.shape[0])
            grad_theta = -sums_S / ctx.bandwidth
        return grad_z, grad_theta, None, None


class JumpReLU(SparsityActivation):
    """JumpReLU (Rajamanoharan et al. 2024, "Jumping Ahead", sec. 3-4) trained to a target L0.

    ``acts = z * H(z - θ)`` with a learnable per-latent threshold ``θ = exp(log_threshold)``
    (``log_threshold`` [d_sae], float32 ``nn.Parameter``, saved with the SAE; the log keeps θ > 0
    and, as in the paper, θ in fp32 whatever the dtype of z). θ's gradient comes from the
    straight-through estimator with a rectangle kernel of width ε, both through the JumpReLU and
    through the Heaviside of the L0 count (see :class:`_JumpReLUFn`, :class:`_StepFn`); z gets
    no gradient from the L0 term (paper, sec. 4).

    Units. The paper's ε = 0.001 (and its θ init 0.001) are pre-activation values of inputs
    normalised to unit mean squared norm, E||x||^2 = 1 (the paper's training set-up, also
    Gemma Scope's and SAELens's ``jumprelu`` defaults). The trainer scales inputs to
    E||x||^2 = d_in instead (Gao et al. 2024), which multiplies every pre-activation by
    sqrt(d_in) (24 for SmolLM2's d_in = 576). So ``bandwidth`` and ``init_threshold`` are given
    in the paper's units and applied as ``ε = bandwidth * sqrt(d_in)`` (``bind`` learns d_in
    from the SAE); taken literally in our units, ε = 0.001 would be 24x narrower than the
    paper's and the kernel would cover almost no pre-activation.

    Sparsity loss, target L0 = ``k``: ``l0_coef * (L0 / k - 1)^2`` with
    ``L0 = mean_t sum_i H(z_ti - θ_i)``. The paper's ``λ L0`` fixes λ, not L0, so every k would
    need its own λ sweep; the quadratic penalty around the target is dictionary_learning's
    ``JumpReluTrainer`` (saprmarks/dictionary_learning, ``trainers/jumprelu.py``,
    ``sparsity_coefficient * ((l0 / target_l0) - 1)^2``) and makes ``k`` mean the same as for
    the top-k variants. Its weight is warmed up linearly from 0 over the first
    ``sparsity_warmup`` fraction of the steps (Gemma Scope: the first 10,000 steps;
    dictionary_learning's ``sparsity_warmup_steps``; the trainer applies it).

    Short runs (a few hundred steps, not the paper's ~100k): under Adam, log θ moves by about
    lr per step, ~0.1 in all over 224 steps at lr 4e-4, while the encoder drifts; z gets
    reconstruction gradient only where z > θ, so a latent pushed below θ stays off and L0 falls.
    Hence two departures from the paper, both optional:

    - init: θ = ``init_threshold`` (paper units) for every latent (the paper: 0.001), or, when it
      is None, the first training batch's BatchTopK threshold, the ``(k * batch)``-th largest of
      relu(pre_acts), so L0 starts at k;
    - ``threshold_lr_scale`` multiplies θ's learning rate (``lr_scale``); whether it is still
      needed once ε is in the paper's units is not measured yet (docs/fidelity.md).
    """

    variant = "jumprelu"
    # bf16 resolves ~0.008 near 1, about the STE's bandwidth: the rectangle kernel then sees
    # few pre-activations and θ stops learning (synthetic run: L0 2.4 instead of 3.6 with
    # k = 4, FVU 0.30 instead of 0.24). So JumpReLU trains in float32.
    autocast_safe = False
    sparse_training = True
    sparse_max_density = _SPARSE_MAX_DENSITY
    log_threshold: nn.Parameter

    def __init__(
        self,
        k: int,
        bandwidth: float,
        l0_coef: float,
        init_threshold: float | None,
        threshold_lr_scale: float = 1.0,
        sparsity_warmup: float = 0.0,
    ) -> None:
        super().__init__()
        if k <= 0 or not bandwidth > 0 or not l0_coef >= 0 or not threshold_lr_scale > 0:
            raise ValueError(
                "JumpReLU: need k > 0, bandwidth > 0, l0_coef >= 0, threshold_lr_scale > 0"
            )
        if init_threshold is not None and not init_threshold > 0:
            raise ValueError(f"JumpReLU: init_threshold must be None or > 0, got {init_threshold}")
        if not 0 <= sparsity_warmup <= 1:
            raise ValueError(f"JumpReLU: sparsity_warmup must be in [0, 1], got {sparsity_warmup}")
        self.k = k
        self.bandwidth = bandwidth
        self.l0_coef = l0_coef
        self.init_threshold = init_threshold
        self.lr_scale = threshold_lr_scale
        self.sparsity_warmup = sparsity_warmup
        self.unit = 1.0  # pre-activation units per paper unit: sqrt(d_in), set by bind()
        self.log_threshold = nn.Parameter(torch.zeros(0))  # sized by bind()

    @property
    def threshold(self) -> Tensor:
        """θ = exp(log_threshold), [d_sae] float32 (attached to the graph)."""
        return self.log_threshold.exp()

    @property
    def eps(self) -> float:
        """The kernel width ε in the trainer's pre-activation units: ``bandwidth * sqrt(d_in)``
        (class docstring; ``bandwidth`` itself when ``bind`` got no d_in)."""
        return self.bandwidth * self.unit

    def bind(self, d_sae: int, d_in: int | None = None) -> None:
        """Create ``log_threshold [d_sae]`` = log(init_threshold * sqrt(d_in)), or 0 (θ = 1)
        until :meth:`init_from_batch_` sets it; ``d_in`` None: paper units are taken as ours."""
        self.unit = 1.0 if d_in is None else math.sqrt(d_in)
        init = 1.0 if self.init_threshold is None else self.init_threshold * self.unit
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init)))

    @torch.no_grad()
    def init_from_batch_(self, pre_acts: Tensor, b_enc: Tensor | None = None) -> None:
        """When ``init_threshold`` is None: θ_i = the ``(k * batch)``-th largest entry of
        relu(pre_acts [batch, d_sae]) for every i (at least ε), so L0 starts at k."""
        if self.init_threshold is not None:
            return
        relu_N = pre_acts.float().relu().flatten()
        n_keep = min(self.k * pre_acts.shape[0], relu_N.numel())
        theta = relu_N.topk(n_keep, sorted=False).values.min().clamp_min(self.eps)
        self.log_threshold.fill_(float(theta.log()))

    def forward(self, pre_acts: Tensor) -> Tensor:
        """pre_acts [batch, d_sae] -> acts [batch, d_sae] = pre_acts * H(pre_acts - θ)."""
        if self.log_threshold.shape != pre_acts.shape[-1:]:
            raise ValueError(
                f"JumpReLU: {self.log_threshold.numel()} thresholds for "
                f"{pre_acts.shape[-1]} latents; build it through SparseAutoencoder or bind()"
            )
        return _JumpReLUFn.apply(pre_acts, self.threshold, self.eps)

    def sparsity_loss(self, pre_acts: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
        """``l0_coef * (L0 / k - 1)^2``, L0 = mean_t sum_i H(pre_acts_ti - θ_i) (STE for θ)."""
        l0 = distributed.global_mean(_StepFn.apply(pre_acts, self.threshold, self.eps).sum(dim=-1))
        return self.l0_coef * (l0 / self.k - 1.0).pow(2)

    @torch.no_grad()
    def select(self, pre_acts: Tensor) -> tuple[Tensor, Tensor] | None:
        """(rows, cols) [nnz] int64, token-major, of the entries of ``pre_acts [batch, d_sae]``
        above ``θ_i - ε/2`` (less a margin): every entry with a nonzero act (z > θ) or a nonzero
        STE kernel (``|z - θ| < ε/2``), i.e. every entry :meth:`forward` and
        :meth:`sparsity_loss` give a nonzero value or gradient. The margin, ``ε / 2048 + θ /
        2^20``, exceeds float32 rounding of ``(z - θ) / ε``, so an entry left out has kernel 0
        as computed by :class:`_JumpReLUFn`; an entry taken in with act 0 and kernel 0
        contributes 0. None above ``sparse_max_density``."""
        theta_S = self.threshold.double()
        lower_S = theta_S - 0.5 * self.eps * (1 + 2**-10) - theta_S * 2**-20
        return _active_entries(pre_acts > lower_S.float(), self.sparse_max_density)

    def sparse_acts(self, pre_N: Tensor, cols: Tensor) -> Tensor:
        """``z * H(z - θ)`` at the selected entries (:class:`_JumpReLUFn`, sparse form)."""
        return _JumpReLUFn.apply(pre_N, self.threshold, self.eps, cols)

    def sparse_sparsity_loss(
        self, pre_N: Tensor, code: SparseCode, W_dec: Tensor, batch: int
    ) -> Tensor:
        """:meth:`sparsity_loss` from the selected entries: L0 counts their ``H(z - θ)``
        (the others are below θ), θ's STE gradient sums their kernels (the others' are 0)."""
        step_N = _StepFn.apply(pre_N, self.threshold, self.eps, code.cols)
        count_B = step_N.new_zeros(batch).index_add(0, code.rows, step_N)
        l0 = distributed.global_mean(count_B)
        return self.l0_coef * (l0 / self.k - 1.0).pow(2)

    def hparams(self) -> dict[str, Any]:
        return {
            "bandwidth": self.bandwidth,
            "l0_coef": self.l0_coef,
            "init_threshold": self.init_threshold,
            "threshold_lr_scale": self.lr_scale,
            "sparsity_warmup": self.sparsity_warmup,
        }

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, bandwidth={self.bandwidth:g} (ε={self.eps:g}), l0_coef={self.l0_coef:g}"
        )


SCORES = ("l2", "squared_l2", "entropy")
POOLS = ("top", "sample")


def feature_scores(relu_BS: Tensor, score: str) -> Tensor:
    """Score of each feature column of ``relu_BS [batch, d_sae]`` (post-ReLU, >= 0) -> [d_sae]
    float32, >= 0, and 0 exactly for a column that is 0 on the whole batch (Oozeer et al. 2025,
    sec. 3: L2, squared L2 or entropy of the feature's activations over the batch).

    - ``l2``: ``||f_:,i||_2``; ``squared_l2``: ``||f_:,i||_2^2`` (same ranking as l2, but a
      different sampling distribution).
    - ``entropy``: ``exp(H(p_i))`` with ``p_ti = f_ti / sum_t f_ti``, the distribution of the
      feature's mass over the batch's tokens, ``H = -sum_t p_ti log p_ti`` (nats). exp(H) is the
      effective number of tokens the feature fires on, in [1, batch]: high for a feature spread
      over many tokens (shared structure), 1 for one that fires on a single token. Higher is
      taken as more informative: the paper's target is the "activation lottery" of rare,
      high-magnitude latents, which have low entropy. The exponential keeps the ranking of H
      but gives every firing feature a positive weight (H = 0 would never be sampled); magnitude
      is ignored (scale-invariant per column).
    """
    relu_BS = relu_BS.float()
    if distributed.world_size() > 1:
        return _global_feature_scores(relu_BS, score)
    if score == "l2":
        return relu_BS.norm(dim=0)
    if score == "squared_l2":
        return relu_BS.pow(2).sum(dim=0)
    if score == "entropy":
        mass_S = relu_BS.sum(dim=0)
        p_BS = relu_BS / mass_S.clamp_min(torch.finfo(torch.float32).tiny)
        entropy_S = -torch.xlogy(p_BS, p_BS).sum(dim=0)
        return torch.where(mass_S > 0, entropy_S.exp(), 0.0)
    raise ValueError(f"unknown feature score {score!r}; allowed: {', '.join(SCORES)}")


def _global_feature_scores(relu_BS: Tensor, score: str) -> Tensor:
    """:func:`feature_scores` over the global batch of data-parallel training, from per-rank
    column sums (identical on every rank): ``l2 = sqrt(Σ f²)``, ``squared_l2 = Σ f²``, and
    ``H = log M - (Σ f log f) / M`` with ``M = Σ f`` (``-Σ p log p`` for ``p = f / M``)."""
    if score in ("l2", "squared_l2"):
        sq_S = distributed.all_sum(relu_BS.pow(2).sum(dim=0))
        return sq_S.sqrt() if score == "l2" else sq_S
    if score == "entropy":
        flogf_S = torch.xlogy(relu_BS, relu_BS).sum(0)
        sums_2S = distributed.all_sum(torch.stack([relu_BS.sum(0), flogf_S]))
        mass_S, flogf_S = sums_2S.unbind(0)
        safe_S = mass_S.clamp_min(torch.finfo(torch.float32).tiny)
        entropy_S = safe_S.log() - flogf_S / safe_S
        return torch.where(mass_S > 0, entropy_S.exp(), 0.0)
    raise ValueError(f"unknown feature score {score!r}; allowed: {', '.join(SCORES)}")


def select_pool(
    scores_S: Tensor, n_pool: int, pool: str, generator: torch.Generator | None = None
) -> Tensor:
    """Indices [min(n_pool, #positive scores)] of the candidate features, from ``scores_S
    [d_sae]`` (>= 0). ``top``: the best ``n_pool`` scores (ties in any order). ``sample``:
    *successive sampling* (sequential probability-proportional-to-size sampling without
    replacement): ``n_pool`` draws, each among the features not drawn yet with probability
    proportional to their scores (``torch.multinomial(replacement=False)``, from ``generator``);
    the same law as the first ``n_pool`` places of a Plackett-Luce ranking. A feature's
    inclusion probability is *not* proportional to its score (no closed form): it increases
    with the score but saturates at 1, so high scores are under-weighted relative to
    proportionality and low ones over-weighted (``tests/test_activations.py`` measures it). The
    paper (Oozeer et al. 2025, sec. 3) says only that the pool is formed from the scores; this
    is our reading. Features with score 0 are never chosen."""
    n_pool = min(n_pool, int((scores_S > 0).sum()))
    if pool == "top":
        return scores_S.topk(n_pool, sorted=False).indices
    if pool == "sample":
        return torch.multinomial(scores_S, n_pool, replacement=False, generator=generator)
    raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join(POOLS)}")


class Sampled(BatchTopK):
    """Sampled-SAE (Oozeer et al. 2025, "Distribution-Aware Feature Selection for SAEs",
    sec. 3): BatchTopK restricted to a per-batch candidate pool of ``k * l`` features.

    Training: score every feature column of ``relu(pre_acts) [batch, d_sae]``
    (:func:`feature_scores`, ``score``), choose a pool of ``k * l`` features
    (:func:`select_pool`, ``pool``; ``sample`` draws from a ``torch.Generator`` seeded with
    ``seed``), then keep the ``k * batch`` largest entries of the pool's columns. When the pool
    would hold every feature that fires on the batch (always when ``k * l >= d_sae``), the
    selection is BatchTopK's, bit for bit.

    Inference (the paper gives no rule): as :class:`BatchTopK`, one global threshold θ applied
    to every latent, the trainer's mean of ``last_min_kept`` over the final steps. Here
    ``last_min_kept`` is the batch's *unrestricted* BatchTopK threshold, the ``(k * batch)``-th
    largest entry of relu(pre_acts) over all features, not the smallest value kept in the pool:
    at inference there is no pool, every latent above θ fires, and a θ taken from the pool
    (which excludes features with larger values) would give an L0 far above k (38 instead of 4
    on a synthetic run with l = 4). So the Sampled SAE is compared with the others at the same
    inference L0; the two thresholds coincide when the pool holds every firing feature.

    ``l = 1``: tokens draw only from ``k`` features; large ``l``: plain BatchTopK (paper, sec. 4).
    """

    variant = "sampled"

    def __init__(self, k: int, l: int, score: str, pool: str, seed: int = 0) -> None:  # noqa: E741
        super().__init__(k)
        if l < 1 or score not in SCORES or pool not in POOLS:
            raise ValueError(
                f"Sampled: need l >= 1, score in {SCORES}, pool in {POOLS}; "
                f"got l={l}, score={score!r}, pool={pool!r}"
            )
        self.l = l
        self.score = score
        self.pool = pool
        self.seed = seed
        self._generator: torch.Generator | None = None

    def _generator_on(self, device: torch.device) -> torch.Generator:
        """The pool's RNG, created (seeded with ``seed``) on first use on ``device``."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def rng_state(self) -> Tensor | None:
        """The pool generator's state; None before its first draw."""
        return None if self._generator is None else self._generator.get_state()

    def set_rng_state(self, state: Tensor | None) -> None:
        """Restore the pool generator (on the module's device) to ``state``; None: unseeded
        until its first draw, as a new module."""
        if state is None:
            self._generator = None
            return
        self._generator_on(self.threshold.device).set_state(state)

    def _kept(self, pre_acts: Tensor) -> tuple[Tensor, Tensor]:
        """BatchTopK's ``k * batch`` largest entries, taken among the pool's columns only."""
        n_pool = self.k * self.l
        scores_S = feature_scores(pre_acts.relu(), self.score)
        if n_pool >= int((scores_S > 0).sum()):
            return super()._kept(pre_acts)  # the pool holds every firing feature
        pool_P = select_pool(scores_S, n_pool, self.pool, self._generator_on(pre_acts.device))
        rows_N, slots_N = global_batch_topk(pre_acts[:, pool_P], self.k)
        return rows_N, pool_P[slots_N]  # [batch, P] -> [batch, d_sae]

    @torch.no_grad()
    def batch_threshold(self, pre_acts: Tensor, values_N: Tensor | None = None) -> Tensor:
        """The ``(k * batch)``-th largest entry of relu(``pre_acts``) over all features (class
        docstring), whatever the pool kept (``values_N`` is ignored). When the pool held every
        firing feature this is the minimum of the kept acts; the selection is redone anyway
        rather than re-scanning the batch to detect that rare case. It costs one unrestricted
        selection, so it runs only on the steps whose estimates the trainer averages
        (``estimating``)."""
        return super().batch_threshold(pre_acts, None)

    def hparams(self) -> dict[str, Any]:
        return {"l": self.l, "score": self.score, "pool": self.pool, "seed": self.seed}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, l={self.l}, score={self.score}, pool={self.pool}"


_UNIT = HParam(
    "sparsity_warmup",
    float,
    "fraction of the steps over which the sparsity loss's weight ramps up from 0",
    low=0,
    high=1,
)
for _spec in (
    VariantSpec(
        "topk",
        activation=TopK,
        saelens="topk",
        source="Gao et al. 2024",
        rule="the k largest pre-activations per token",
    ),
    VariantSpec(
        "batchtopk",
        activation=BatchTopK,
        saelens="jumprelu",
        source="Bussmann et al. 2024",
        rule="the `k·batch` largest of the whole batch; at inference a JumpReLU with one global "
        "θ (mean of each batch's smallest kept activation over the last 20% of steps)",
    ),
    VariantSpec(
        "relu",
        activation=ReLU,
        saelens="standard",
        source="Conerly et al. 2024",
        params_class="ReLUParams",
        hparams=(
            HParam("l1_coef", float, "weight of the decoder-norm-weighted L1", low=0),
            HParam("init_b_enc", str, "b_enc init", choices=ReLU.INIT_B_ENC),
            _UNIT,
            HParam("decoder_init_norm", float, "decoder rows' norm at init", low=0, low_open=True),
        ),
        rule="ReLU + L1 weighted by decoder row norm, decoder norms unconstrained, λ warm-up "
        "(the April-2024 recipe); L0 set by `l1_coef`",
    ),
    VariantSpec(
        "jumprelu",
        activation=JumpReLU,
        saelens="jumprelu",
        source="Rajamanoharan et al. 2024",
        params_class="JumpReLUParams",
        hparams=(
            HParam("bandwidth", float, "STE kernel width ε (paper units)", low=0, low_open=True),
            HParam("l0_coef", float, "λ of λ (L0/k - 1)^2", low=0),
            HParam(
                "init_threshold",
                float,
                "θ at init (paper units)",
                low=0,
                low_open=True,
                null="from the first batch",
            ),
            HParam("threshold_lr_scale", float, "θ's lr / the SAE's", low=0, low_open=True),
            _UNIT,
        ),
        rule="per-latent θ in fp32, rectangle-kernel straight-through estimator, trained to "
        "L0 = k by `l0_coef·(L0/k − 1)²`",
    ),
    VariantSpec(
        "sampled",
        activation=Sampled,
        saelens="jumprelu",
        source="Oozeer et al. 2025",
        params_class="SampledParams",
        hparams=(
            HParam("l", int, "pool of k * l features per batch", low=1),
            HParam("score", str, "feature score over the batch", choices=SCORES),
            HParam("pool", str, "how the pool is drawn", choices=POOLS),
            HParam("seed", int, "the pool draw's generator"),
        ),
        rule="BatchTopK inside a pool of `k·l` features scored per batch (L2 / squared L2 / "
        "entropy), drawn by successive sampling (each draw ∝ score among the rest) or "
        "best-first",
    ),
):
    register(_spec)

# the five activation-based variants of this module, by name
ACTIVATIONS: dict[str, type[SparsityActivation]] = {
    cls.variant: cls for cls in (TopK, BatchTopK, ReLU, JumpReLU, Sampled)
}


def make_activation(variant: str, k: int, **hparams: Any) -> SparsityActivation:
    """Build the sparsity strategy named ``variant`` (a registered variant with an activation
    module, :mod:`saelab.sae.registry`) with target L0 ``k`` and its hyperparameters (the
    keywords of its class, e.g. ``l1_coef`` for ``relu``; see :meth:`SparsityActivation.hparams`).

    Raises:
        ValueError: unknown variant (the message lists the allowed ones), or a hyperparameter
            that is unknown, missing or out of range.
    """
    specs = registry.variants()
    if variant not in specs or specs[variant].activation is None:
        allowed = sorted(n for n, s in specs.items() if s.activation is not None)
        raise ValueError(f"unknown SAE variant {variant!r}; allowed: {', '.join(allowed)}")
    return specs[variant].make_activation(k, hparams)
