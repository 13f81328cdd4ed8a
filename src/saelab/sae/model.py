"""One sparse autoencoder for every variant; sparsity is an injected activation module.

``pre_acts = (x - b_dec) @ W_enc + b_enc``, ``acts = activation(pre_acts)``,
``recon = acts @ W_dec + b_dec`` (Bussmann et al. 2024, sec. 2; Gao et al. 2024, sec. 2.2).

Training and inference are two named functions (:meth:`SparseAutoencoder.forward_train`,
:meth:`SparseAutoencoder.infer`), which differ for the batch-level activations (BatchTopK and its
subclasses: the batch's top ``k * batch`` in training, a global threshold θ at inference); the
library calls them by name, never relying on ``.train()`` / ``.eval()``. ``sae(x)`` follows the
``nn.Module`` mode (training: ``forward_train``, eval: ``infer``) for torch users.

Weight layout (the SAELens interchange layout): ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
``b_enc [d_sae]``, ``b_dec [d_in]``, all float32 ``nn.Parameter``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.sae.activations import SparsityActivation, make_activation
from saelab.sae.sparse import SparseCode, gather_pre_acts, offsets_of, sparse_decode

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"
_PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")


def pre_activations(
    x_BD: Tensor, W_enc_DM: Tensor, b_enc_M: Tensor, b_dec_D: Tensor, *, in_place: bool = False
) -> Tensor:
    """The encoder: x [batch, d_in] -> pre_acts [batch, m] = (x - b_dec) @ W_enc + b_enc for an
    encoder ``W_enc_DM [d_in, m]``, ``b_enc_M [m]`` (the whole dictionary, an expert's block or
    a few latents' columns) and ``b_dec_D [d_in]``; float32 (or the autocast dtype).

    Computed as ``x @ W_enc + (b_enc - b_dec @ W_enc)``: the same value, but b_dec's gradient
    through the encoder becomes a [d_in] x [d_in, m] product instead of a [batch, m] x [m, d_in]
    one (x needs no gradient), which saves one of the step's large matmuls. ``in_place``: the
    bias is added in place to the product (for callers without autograd: ``addmm`` copies the
    bias into the [batch, m] output before the GEMM, a pass as large as the GEMM's output); the
    two forms may differ in the last bit.
    """
    bias_M = b_enc_M - b_dec_D @ W_enc_DM
    if in_place:
        return (x_BD @ W_enc_DM).add_(bias_M)
    return torch.addmm(bias_M, x_BD, W_enc_DM)


class SAEOutput(NamedTuple):
    """recon [batch, d_in], acts [batch, d_sae] (sparse, >= 0), pre_acts [batch, d_sae]."""

    recon: Tensor
    acts: Tensor
    pre_acts: Tensor


class SparseOutput(NamedTuple):
    """Output of the sparse training path: recon [batch, d_in] (attached to the graph), the
    active latents as a :class:`~saelab.sae.sparse.SparseCode` (nnz entries) and their
    pre-activations pre_acts [nnz] float32 (detached; None from Switch)."""

    recon: Tensor
    code: SparseCode
    pre_acts: Tensor | None = None


class SparseAutoencoder(nn.Module):
    """Sparse autoencoder with a pluggable sparsity ``activation``.

    Init (Gao et al. 2024, sec. 2.4): decoder rows random directions of unit norm (of norm
    ``activation.decoder_init_norm``: 0.1 for ReLU + L1, Conerly et al. 2024), encoder the
    decoder's transpose, ``b_enc = 0``, ``b_dec = 0`` (the trainer sets ``b_dec`` to the
    geometric median of a first batch).

    Args:
        d_in: width of the activations.
        d_sae: number of latents.
        activation: the sparsity strategy, e.g. ``make_activation("topk", 32)``; the SAE calls
            its ``bind(d_sae)`` (per-latent state such as JumpReLU's thresholds).
        generator: RNG for the init (default: torch's global RNG).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        activation: SparsityActivation,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.d_in = d_in
        self.d_sae = d_sae
        self.activation = activation
        activation.bind(d_sae, d_in)
        self.metadata: dict[str, Any] = {}  # provenance read back by load() (hookpoint, ...)
        W_dec_SD = torch.randn(d_sae, d_in, generator=generator)
        W_dec_SD *= activation.decoder_init_norm / W_dec_SD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_SD)
        self.W_enc = nn.Parameter(W_dec_SD.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode_pre(self, x: Tensor) -> Tensor:
        """x [batch, d_in] -> pre_acts [batch, d_sae] = (x - b_dec) @ W_enc + b_enc
        (:func:`pre_activations`)."""
        return pre_activations(x, self.W_enc, self.b_enc, self.b_dec)

    def encode(self, x: Tensor) -> Tensor:
        """x [batch, d_in] -> acts [batch, d_sae] (sparse, >= 0), the inference function
        (:meth:`infer`) whatever the module's mode."""
        return self.activation.inference_acts(self.encode_pre(x))

    def decode(self, acts: Tensor) -> Tensor:
        """acts [batch, d_sae] -> recon [batch, d_in] = acts @ W_dec + b_dec."""
        return torch.addmm(self.b_dec, acts, self.W_dec)

    def forward(self, x: Tensor) -> SAEOutput:
        """x [batch, d_in] -> SAEOutput(recon, acts, pre_acts): :meth:`forward_train` in
        training mode, :meth:`infer` in eval mode (module docstring)."""
        return self.forward_train(x) if self.training else self.infer(x)

    def forward_train(self, x: Tensor) -> SAEOutput:
        """x [batch, d_in] -> SAEOutput(recon, acts, pre_acts) of the training function (the
        activation's :meth:`~saelab.sae.activations.SparsityActivation.training_acts`; for
        BatchTopK the codes depend on the whole batch), whatever the module's mode."""
        pre_acts = self.encode_pre(x)
        acts = self.activation.training_acts(pre_acts)
        return SAEOutput(self.decode(acts), acts, pre_acts)

    def infer(self, x: Tensor) -> SAEOutput:
        """x [batch, d_in] -> SAEOutput(recon, acts, pre_acts) of the inference function (the
        activation's :meth:`~saelab.sae.activations.SparsityActivation.inference_acts`: each
        token's code depends on that token only), whatever the module's mode. What the saved
        SAE means: evaluation, probing, the feature browser and the export use it."""
        pre_acts = self.encode_pre(x)
        acts = self.activation.inference_acts(pre_acts)
        return SAEOutput(self.decode(acts), acts, pre_acts)

    @property
    def sparse_training(self) -> bool:
        """Whether :meth:`forward_sparse` is available (TopK, BatchTopK, Sampled, Switch, ReLU,
        JumpReLU)."""
        return self.activation.sparse_training

    def forward_sparse(self, x: Tensor) -> SparseOutput | SAEOutput:
        """:meth:`forward_train` for ``x [batch, d_in]`` float32, with
        the same recon and the same gradients, computed sparsely (:mod:`saelab.sae.sparse`): one
        dense encoder GEMM without autograd, the activation's :meth:`select`, then only the
        selected latents' encoder entries, decoder rows and gradients. When ``select`` declines
        (ReLU, JumpReLU with too many active entries for the sparse path to pay), the dense
        :meth:`forward_train`'s output instead.

        Raises:
            NotImplementedError: the activation has no sparse path (``sparse_training`` false).
        """
        with torch.no_grad():
            pre_acts_BS = pre_activations(x, self.W_enc, self.b_enc, self.b_dec, in_place=True)
        selected = self.activation.select(pre_acts_BS)
        if selected is None:
            return self.forward_train(x)
        rows, cols = selected
        pre_N = pre_acts_BS[rows, cols].float()
        del pre_acts_BS
        values = self.activation.sparse_acts(
            gather_pre_acts(x, self.W_enc, self.b_enc, self.b_dec, pre_N, rows, cols), cols
        )
        code = SparseCode(values, rows, cols, offsets_of(rows, x.shape[0]))
        return SparseOutput(sparse_decode(code, self.W_dec, self.b_dec), code, pre_N)

    def pre_acts_of(self, x: Tensor, latents: Tensor) -> Tensor:
        """x [batch, d_in] -> pre_acts [batch, n] of the latents ``latents [n]`` int64 only,
        attached to the graph (AuxK's dead latents: a GEMM of n columns, not d_sae)."""
        return pre_activations(x, self.W_enc[:, latents], self.b_enc[latents], self.b_dec)

    def tokens_seen(self, x: Tensor) -> Tensor:
        """Per latent, how many tokens of ``x [batch, d_in]`` it could have fired on: [d_sae]
        int64, ``batch`` for every latent of a dense SAE (the dead-latent counter adds it, Gao
        et al. 2024, appendix A.2)."""
        return torch.full((self.d_sae,), x.shape[0], dtype=torch.long, device=x.device)

    @property
    def variant(self) -> str:
        return self.activation.variant

    def hparams(self) -> dict[str, Any]:
        """The variant's hyperparameters besides k (saved in ``cfg.json``)."""
        return self.activation.hparams()

    def sparsity_loss(self, x: Tensor, out: SAEOutput | SparseOutput) -> Tensor:
        """The variant's weighted training penalty on ``x [batch, d_in]`` with
        ``out = self.forward_train(x)`` (scalar attached to the graph): the activation's
        :meth:`~saelab.sae.activations.SparsityActivation.sparsity_loss` (L1, target L0, or 0);
        with ``out = self.forward_sparse(x)``, its sparse form
        (:meth:`~saelab.sae.activations.SparsityActivation.sparse_sparsity_loss`)."""
        if isinstance(out, SparseOutput):
            return self.activation.sparse_sparsity_loss(
                out.pre_acts, out.code, self.W_dec, x.shape[0]
            )
        return self.activation.sparsity_loss(out.pre_acts, out.acts, self.W_dec)

    @torch.no_grad()
    def init_b_dec_(self, b_dec: Tensor) -> None:
        """Set ``b_dec`` to ``b_dec [d_in]`` (the trainer: a first batch's geometric median)."""
        self.b_dec.copy_(b_dec)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm (Gao et al. 2024, sec. 2.4)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` each row's component along that row (Gao et al. 2024, 2.4).

        With unit-norm rows renormalised after every step, the parallel component only changes a
        row's norm, which the renormalisation undoes; removing it keeps Adam's statistics for the
        direction only. ``g_i <- g_i - (g_i . w_i) w_i / ||w_i||^2``.
        """
        grad_SD = self.W_dec.grad
        if grad_SD is None:
            return
        W_dec_SD = self.W_dec.detach()
        # Row-wise dots as a batched [1, d_in] x [d_in, 1] product and an in-place addcmul: no
        # [d_sae, d_in] temporary (each would be a pass over the decoder's size).
        dot_S = torch.bmm(grad_SD.unsqueeze(1), W_dec_SD.unsqueeze(2)).view(-1)
        sq_norm_S = torch.linalg.vector_norm(W_dec_SD, dim=1).square().clamp_min(1e-12)
        grad_SD.addcmul_((dot_S / sq_norm_S).unsqueeze(1), W_dec_SD, value=-1.0)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` act on raw ``x`` with identical acts.

        Derivation: the trained SAE computes, on ``c x`` (c = ``scale``),
        ``pre = (c x - b_dec) @ W_enc + b_enc = (x - b_dec / c) @ (c W_enc) + b_enc``, so
        ``W_enc' = c W_enc`` and ``b_dec' = b_dec / c`` give the same pre-activations, hence the
        same acts (and the same BatchTopK / JumpReLU thresholds, which live in pre-activation
        units). Its reconstruction of ``c x`` is
        ``acts @ W_dec + b_dec``; dividing by c, ``x_hat = acts @ (W_dec / c) + b_dec / c``, so
        ``W_dec' = W_dec / c`` with the same ``b_dec'``. Afterwards the decoder rows have norm
        ``1 / c`` instead of 1; do not call :meth:`normalize_decoder_` on a folded SAE.
        """
        if not scale > 0:
            raise ValueError(f"fold_input_scale_: scale must be > 0, got {scale}")
        self.W_enc *= scale
        self.b_dec /= scale
        self.W_dec /= scale

    def _state_tensors(self) -> dict[str, Tensor]:
        """The saved tensors by name: the four weights, then the activation's own state."""
        tensors = {name: getattr(self, name) for name in _PARAM_NAMES}
        return tensors | self.activation.state_dict(keep_vars=True)

    def save(self, directory: str | Path, metadata: Mapping[str, Any] | None = None) -> None:
        """Write ``sae.safetensors`` and ``cfg.json`` into ``directory`` (created if needed).

        The safetensors file holds ``W_enc, W_dec, b_enc, b_dec`` and the activation's state
        (``threshold`` for BatchTopK and Sampled, ``log_threshold`` for JumpReLU), float32.
        ``cfg.json`` holds ``d_in, d_sae, variant, k``, ``hparams`` (the variant's
        hyperparameters, :meth:`SparsityActivation.hparams`) and ``metadata`` (any
        JSON-serialisable mapping, e.g. hookpoint and input scale).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self._state_tensors().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        cfg = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "variant": self.variant,
            "k": self.activation.k,
            "hparams": self.hparams(),
            "metadata": dict(metadata if metadata is not None else self.metadata),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        logger.info("saved %s SAE (d_sae=%d) to %s", self.variant, self.d_sae, directory)

    @classmethod
    def _from_cfg(cls, cfg: dict[str, Any]) -> SparseAutoencoder:
        """A fresh SAE of the shape and variant described by a ``cfg.json`` mapping."""
        activation = make_activation(cfg["variant"], cfg["k"], **cfg.get("hparams", {}))
        return cls(cfg["d_in"], cfg["d_sae"], activation)

    @classmethod
    def load(cls, directory: str | Path) -> SparseAutoencoder:
        """Read an SAE written by :meth:`save` (on CPU, in eval mode).

        Raises:
            FileNotFoundError: ``cfg.json`` or ``sae.safetensors`` is missing.
            ValueError: unknown variant or hyperparameters, missing/extra tensors or a shape
                mismatch. A ``cfg.json`` without ``hparams`` (older files) means none.
        """
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"SAE directory {directory} has no {name}")
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        missing_keys = [key for key in ("d_in", "d_sae", "variant", "k") if key not in cfg]
        if missing_keys:
            raise ValueError(f"{directory / CONFIG_FILE} lacks key {missing_keys[0]!r}")
        sae = cls._from_cfg(cfg)
        tensors = load_file(str(directory / WEIGHTS_FILE))
        expected = sae._state_tensors()
        if set(tensors) != set(expected):
            raise ValueError(
                f"{directory / WEIGHTS_FILE} holds {sorted(tensors)}, expected {sorted(expected)}"
            )
        with torch.no_grad():
            for name, target in expected.items():
                if tensors[name].shape != target.shape:
                    raise ValueError(
                        f"{directory / WEIGHTS_FILE}: {name} has shape "
                        f"{tuple(tensors[name].shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(tensors[name])
        sae.metadata = dict(cfg.get("metadata", {}))
        return sae.eval()
