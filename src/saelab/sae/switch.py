"""Switch SAE (Mudide et al. 2024, "Efficient Dictionary Learning with Switch Sparse
Autoencoders", sec. 3): a router sends each token to one of ``n_experts`` TopK SAEs.

The ``d_sae`` latents are split into ``n_experts`` contiguous blocks of ``d_expert = d_sae /
n_experts``; expert e owns latents ``[e * d_expert, (e + 1) * d_expert)``, i.e. columns of
``W_enc [d_in, d_sae]``, rows of ``W_dec [d_sae, d_in]`` and entries of ``b_enc [d_sae]``. All
experts share ``b_dec [d_in]``. So a Switch SAE keeps the one weight layout of
:class:`~saelab.sae.model.SparseAutoencoder` (and its decoder normalisation, input-scale folding
and safetensors format) and adds the router ``W_router [d_in, n_experts]``,
``b_router [d_in]``:

- router: ``p = softmax((x - b_router) @ W_router)`` [batch, n_experts]; token t goes to
  ``e_t = argmax_e p_te`` (paper, eq. 1-2);
- expert: ``pre = (x - b_dec) @ W_enc[:, E_e] + b_enc[E_e]``, ``acts = p_t,e_t * TopK_k(pre)``:
  scaling by the router probability is what gives the router a gradient (paper, sec. 3.1);
- ``recon = acts @ W_dec[E_e] + b_dec``;
- load balancing (Switch Transformers, Fedus et al. 2022, eq. 4; paper sec. 3.2):
  ``balance_coef * n_experts * sum_e f_e * P_e`` with ``f_e`` the fraction of the batch's tokens
  routed to e (no gradient) and ``P_e`` the batch mean of ``p_te``. Its minimum is
  ``balance_coef``, reached by a uniform router.

Routing is real: the tokens of each expert are gathered, encoded and decoded by one matmul per
expert, and scattered back, so the encoder and decoder cost per token is ``1 / n_experts`` of a
dense SAE of the same width (the paper's reference code computes the dense encoder and masks it,
which saves nothing). Unlike the reference code, AuxK is applied (by the trainer, as for TopK):
a dead latent's pre-activation is computed for the tokens routed to its expert and scaled by
the router probability, as a live latent's act is (:meth:`SwitchSAE.pre_acts_of`); the other
entries are ``-inf``. A latent's dead counter advances only by the tokens routed to its
expert (:meth:`SwitchSAE.tokens_seen`): a latent cannot fire on a token sent elsewhere, so
counting every token would call latents of a rarely chosen expert dead while they fire on
each token they are given.

Encoder bias: the reference's encoder is ``nn.Linear(bias=False)`` (no ``b_enc``); here every
expert keeps the shared SAE layout's ``b_enc`` slice (so a Switch SAE saves and exports as the
other variants). It adds ``d_sae`` parameters, one threshold-like offset per latent, which a
TopK expert could otherwise only get through ``b_dec``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from saelab import distributed
from saelab.sae.activations import TopK
from saelab.sae.model import SAEOutput, SparseAutoencoder, SparseOutput, pre_activations
from saelab.sae.registry import HParam, VariantSpec, Violation, register
from saelab.sae.sparse import SparseCode, gather_pre_acts, offsets_of, sparse_decode
from saelab.sae.topk import row_topk


class SwitchSAE(SparseAutoencoder):
    """Switch SAE with ``n_experts`` TopK experts of width ``d_sae / n_experts`` (module docstring).

    Args:
        d_in, d_sae: as for :class:`SparseAutoencoder`; ``d_sae`` counts the latents of all
            experts together (width-matched to a dense SAE of ``d_sae`` latents).
        k: active latents per token, all within the token's expert.
        n_experts: number of experts E (>= 1; 1 is a dense TopK SAE times p = 1).
        balance_coef: α of the load-balancing loss, added to the FVU. The paper's α ~ 3 is
            added as ``α d_in LB`` to a summed squared error (reference trainer); relative to
            an FVU that is ``α d_in / V`` with V the inputs' total variance per token (see
            docs/fidelity.md: ~0.03 for the paper's GPT-2 runs).
        generator: RNG for the init. Router init: ``W_router ~ N(0, 1 / d_in)``, ``b_router``
            = 0 until :meth:`init_b_dec_` sets it with ``b_dec``.

    Raises:
        ValueError: ``n_experts`` does not divide ``d_sae``, ``k > d_sae / n_experts``, or
            ``balance_coef < 0``.
    """

    W_router: nn.Parameter
    b_router: nn.Parameter

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        n_experts: int,
        balance_coef: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if n_experts < 1 or d_sae % n_experts or not 0 < k <= d_sae // n_experts:
            raise ValueError(
                f"SwitchSAE: need n_experts >= 1 dividing d_sae and 0 < k <= d_sae / n_experts; "
                f"got d_sae={d_sae}, n_experts={n_experts}, k={k}"
            )
        if not balance_coef >= 0:
            raise ValueError(f"SwitchSAE: balance_coef must be >= 0, got {balance_coef}")
        super().__init__(d_in, d_sae, TopK(k), generator)
        self.n_experts = n_experts
        self.d_expert = d_sae // n_experts
        self.balance_coef = balance_coef
        W_router_DE = torch.randn(d_in, n_experts, generator=generator) / math.sqrt(d_in)
        self.W_router = nn.Parameter(W_router_DE)
        self.b_router = nn.Parameter(torch.zeros(d_in))

    @property
    def variant(self) -> str:
        return "switch"

    def hparams(self) -> dict[str, Any]:
        return {"n_experts": self.n_experts, "balance_coef": self.balance_coef}

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [batch, d_in] -> (probs [batch, n_experts] float32, expert [batch] int64 = argmax)."""
        probs_BE = torch.softmax((x - self.b_router) @ self.W_router, dim=-1)
        return probs_BE, probs_BE.argmax(dim=-1)

    def _experts(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Per-expert views (no copies): W_enc [d_in, d_expert], W_dec [d_expert, d_in],
        b_enc [d_expert]. ``unbind`` gives each parameter one backward node for all experts."""
        E, M = self.n_experts, self.d_expert
        W_enc_EDM = self.W_enc.view(self.d_in, E, M).permute(1, 0, 2)
        return (
            W_enc_EDM.unbind(0),
            self.W_dec.view(E, M, self.d_in).unbind(0),
            self.b_enc.view(E, M).unbind(0),
        )

    def forward_train(self, x: Tensor) -> SAEOutput:
        """x [batch, d_in] -> SAEOutput(recon [batch, d_in], acts [batch, d_sae],
        pre_acts [batch, d_sae]); acts are zero and pre_acts ``-inf`` outside each token's
        expert. One encoder and one decoder matmul per expert that received tokens. Routing and
        TopK are per token, so this is also the inference function (:meth:`infer`)."""
        probs_BE, expert_B = self.route(x)
        p_B = probs_BE.gather(1, expert_B[:, None]).squeeze(1)
        W_enc, W_dec, b_enc = self._experts()
        order, pre_rows, act_rows, recon_rows = [], [], [], []
        for e in range(self.n_experts):
            idx_T = (expert_B == e).nonzero().squeeze(1)  # T = tokens routed to e
            if idx_T.numel() == 0:
                continue
            pre_TM = pre_activations(x[idx_T], W_enc[e], b_enc[e], self.b_dec)
            acts_TM = self.activation.training_acts(pre_TM) * p_B[idx_T, None]
            order.append(idx_T)
            pre_rows.append(pre_TM)
            act_rows.append(acts_TM)
            recon_rows.append(torch.addmm(self.b_dec, acts_TM, W_dec[e]))
        inverse_B = torch.empty_like(expert_B)
        order_B = torch.cat(order)
        inverse_B[order_B] = torch.arange(order_B.numel(), device=x.device)
        recon_BD = torch.cat(recon_rows)[inverse_B]
        acts_BS = self._to_dense(torch.cat(act_rows)[inverse_B], expert_B, 0.0)
        pre_BS = self._to_dense(torch.cat(pre_rows)[inverse_B], expert_B, float("-inf"))
        return SAEOutput(recon_BD, acts_BS, pre_BS)

    def forward_sparse(self, x: Tensor) -> SparseOutput:
        """The sparse training path (:mod:`saelab.sae.sparse`) of :meth:`forward_train`: same
        recon, same gradients. Each expert's encoder GEMM runs on its tokens without autograd;
        only the ``k`` selected latents per token enter the graph, scaled by the router
        probability."""
        probs_BE, expert_B = self.route(x)
        p_B = probs_BE.gather(1, expert_B[:, None]).squeeze(1)
        rows, cols, values = self._select(x, expert_B)
        acts = gather_pre_acts(x, self.W_enc, self.b_enc, self.b_dec, values, rows, cols)
        code = SparseCode(acts.relu() * p_B[rows], rows, cols, offsets_of(rows, x.shape[0]))
        return SparseOutput(sparse_decode(code, self.W_dec, self.b_dec), code)

    @torch.no_grad()
    def _select(self, x: Tensor, expert_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per expert, the TopK latents of its tokens: (rows, cols, pre-activation values),
        [batch * k] each, token-major (cols are global latent indices; each expert's rows are
        written in place into ``[batch, k]`` tables, so no sort is needed)."""
        W_enc, _, b_enc = self._experts()
        k = self.activation.k
        batch = x.shape[0]
        cols_BK = torch.empty(batch, k, dtype=torch.int64, device=x.device)
        values_BK = torch.empty(batch, k, dtype=torch.float32, device=x.device)
        for e in range(self.n_experts):
            idx_T = (expert_B == e).nonzero().squeeze(1)  # T = tokens routed to e
            if idx_T.numel() == 0:
                continue
            pre_TM = pre_activations(x[idx_T], W_enc[e], b_enc[e], self.b_dec, in_place=True)
            values_TK, local_TK = row_topk(pre_TM, k)
            cols_BK[idx_T] = local_TK + e * self.d_expert
            values_BK[idx_T] = values_TK.float()
        rows = torch.arange(batch, device=x.device).repeat_interleave(k)
        return rows, cols_BK.flatten(), values_BK.flatten()

    def pre_acts_of(self, x: Tensor, latents: Tensor) -> Tensor:
        """For AuxK: :meth:`SparseAutoencoder.pre_acts_of` times the token's router probability
        ``p_t,e_t`` (detached), as a live latent's act is ``p_t,e_t * TopK(pre)`` (so the dead
        latents reconstruct the residual on the same scale as the live ones; the positive factor
        does not change which are the top ones), and ``-inf`` where the token is routed to
        another expert than the latent's. [batch, n], attached to the encoder's graph."""
        with torch.no_grad():
            probs_BE, expert_B = self.route(x)
            p_B = probs_BE.gather(1, expert_B[:, None])  # [batch, 1]
        pre_BX = super().pre_acts_of(x, latents) * p_B
        same_BX = expert_B[:, None] == torch.div(latents, self.d_expert, rounding_mode="floor")
        return pre_BX.masked_fill(~same_BX, float("-inf"))

    @torch.no_grad()
    def tokens_seen(self, x: Tensor) -> Tensor:
        """[d_sae] int64: the number of tokens of ``x [batch, d_in]`` routed to each latent's
        expert (module docstring: only those can make it fire)."""
        _, expert_B = self.route(x)
        per_expert_E = torch.bincount(expert_B, minlength=self.n_experts)
        return per_expert_E.repeat_interleave(self.d_expert)

    def _to_dense(self, rows_BM: Tensor, expert_B: Tensor, fill: float) -> Tensor:
        """Place each token's ``[d_expert]`` row in its expert's block of a ``[batch, d_sae]``
        tensor filled with ``fill`` (differentiable in ``rows_BM``)."""
        B, E, M = rows_BM.shape[0], self.n_experts, self.d_expert
        dense_BEM = rows_BM.new_full((B, E, M), fill)
        index_B1M = expert_B.view(B, 1, 1).expand(B, 1, M)
        return dense_BEM.scatter(1, index_B1M, rows_BM.unsqueeze(1)).view(B, E * M)

    def infer(self, x: Tensor) -> SAEOutput:
        """:meth:`forward_train`: routing and TopK are per token, so the trained function is
        the inference function."""
        return self.forward_train(x)

    def encode(self, x: Tensor) -> Tensor:
        """x [batch, d_in] -> acts [batch, d_sae] (routed; zero outside the token's expert)."""
        return self.infer(x).acts

    def sparsity_loss(self, x: Tensor, out: SAEOutput) -> Tensor:
        """Load-balancing loss ``balance_coef * n_experts * sum_e f_e P_e`` (module docstring)
        on ``x [batch, d_in]``; scalar attached to the router's parameters. The router is
        recomputed (a [batch, d_in] x [d_in, n_experts] product) rather than carried in ``out``.
        """
        probs_BE, expert_B = self.route(x)
        counts_E = torch.bincount(expert_B, minlength=self.n_experts)
        if distributed.world_size() == 1:
            f_E = counts_E.to(probs_BE.dtype) / len(x)
        else:  # f and P over the global batch of data-parallel training
            f_E = distributed.all_sum(counts_E).to(probs_BE.dtype)
            f_E = f_E / distributed.global_count(len(x), x.device)
        return self.balance_coef * self.n_experts * (f_E * distributed.global_mean(probs_BE)).sum()

    @torch.no_grad()
    def init_b_dec_(self, b_dec: Tensor) -> None:
        """Set ``b_dec`` and ``b_router`` to ``b_dec [d_in]`` (the trainer passes the geometric
        median of a first batch), so the router sees centred inputs from the first step."""
        super().init_b_dec_(b_dec)
        self.b_router.copy_(b_dec)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """As :meth:`SparseAutoencoder.fold_input_scale_`, and the router:
        ``(c x - b_router) @ W_router = (x - b_router / c) @ (c W_router)``, so the routing and
        the router probabilities on raw x are those of the trained SAE on ``c x``."""
        super().fold_input_scale_(scale)
        self.W_router *= scale
        self.b_router /= scale

    def _state_tensors(self) -> dict[str, Tensor]:
        return super()._state_tensors() | {"W_router": self.W_router, "b_router": self.b_router}

    @classmethod
    def _from_cfg(cls, cfg: dict[str, Any]) -> SwitchSAE:
        return cls(cfg["d_in"], cfg["d_sae"], cfg["k"], **cfg.get("hparams", {}))


def _expert_constraints(hparams: Mapping[str, Any], k: int, d_sae: int) -> list[Violation]:
    """The experts split ``sae.d_sae`` evenly and each holds at least k latents."""
    n_experts = hparams["n_experts"]
    if d_sae % n_experts:
        return [("variant_params.switch.n_experts", f"a divisor of sae.d_sae={d_sae}")]
    if k > d_sae // n_experts:
        return [(
            "k",
            f"at most sae.d_sae / variant_params.switch.n_experts = {d_sae // n_experts}"
            " (the width of one Switch expert)",
        )]  # fmt: skip
    return []


register(VariantSpec(
    "switch", model=SwitchSAE, params_class="SwitchParams", constraints=_expert_constraints,
    hparams=(
        HParam("n_experts", int, "experts of d_sae / n_experts latents each", low=1),
        HParam("balance_coef", float, "α of the load-balancing loss", low=0),
    ),
    source="Mudide et al. 2024",
    rule="a router picks one of `n_experts` TopK experts of `d_sae/n_experts` latents per "
    "token; latents scaled by the router probability; load balancing `α·E·Σ f_e P_e`; no "
    "SAELens architecture routes tokens",
))  # fmt: skip
