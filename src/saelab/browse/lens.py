"""What a latent writes: its decoder row read through the model's unembedding (the logit lens),
and its nearest latents by decoder cosine, in the same SAE or in another one.

Logit lens of latent i (nostalgebraist 2020, "interpreting GPT: the logit lens"; the "logit
weights" of Bricken et al. 2023, "Towards Monosemanticity", and of SAEDashboard/Neuronpedia):
``lens_i = lm_head(final_norm(W_dec[i])) - lm_head(final_norm(0))`` [vocab]. The subtraction
removes what every input gets alike (a LayerNorm's bias; zero for RMSNorm), so that the ranking
is the decoder direction's own. The norm's scale makes the values those of a residual stream
holding only this direction at unit RMS; only the ranking within a latent is meant to be read.
The later layers are skipped: these are the direct effects of the direction, not what the model
ends up predicting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.splice import final_norm


@torch.no_grad()
def logit_lens(
    model: nn.Module, W_dec_SD: Tensor, n: int, chunk: int = 256
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``n`` tokens each latent promotes most and suppresses most (module docstring).

    Args:
        model: a causal LM with a final norm (:func:`saelab.splice.final_norm`) and
            ``get_output_embeddings()``; W_dec_SD: decoder ``[d_sae, d_in]`` (any scale);
        n: tokens per list; chunk: latents per matmul (a ``[chunk, vocab]`` float32 block).

    Returns:
        ``top_ids, top_logits, bottom_ids, bottom_logits``, each ``[d_sae, n]`` (int64 ids,
        float32 values; top descending, bottom ascending).
    """
    norm, head = final_norm(model), model.get_output_embeddings()
    param = next(model.parameters())
    zero = head(norm(torch.zeros(1, W_dec_SD.shape[1], dtype=param.dtype, device=param.device)))
    out = ([], [], [], [])
    for start in range(0, len(W_dec_SD), chunk):
        rows = W_dec_SD[start : start + chunk].to(param)
        logits = (head(norm(rows)) - zero).float().cpu()  # [chunk, vocab]
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        for acc, t in zip(
            out, (top.indices, top.values, bottom.indices, bottom.values), strict=True
        ):
            acc.append(t)
    return tuple(torch.cat(acc) for acc in out)  # type: ignore[return-value]


@torch.no_grad()
def nearest_by_cosine(
    A_SD: Tensor, B_SD: Tensor, n: int, exclude_self: bool, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """For each row of ``A_SD [S_a, d_in]``, the ``n`` rows of ``B_SD [S_b, d_in]`` with the
    largest cosine similarity: ``(indices [S_a, n] int64, cosines [S_a, n] float32)``, best first.
    ``exclude_self``: A and B are the same matrix, and row i is not its own neighbour."""
    A, B = F.normalize(A_SD.float(), dim=1), F.normalize(B_SD.float(), dim=1)
    n = min(n, len(B) - exclude_self)
    idx, cos = [], []
    for start in range(0, len(A), chunk):
        sims = A[start : start + chunk] @ B.T  # [chunk, S_b]
        if exclude_self:
            r = torch.arange(start, min(start + chunk, len(A)))
            sims[r - start, r] = float("-inf")
        best = sims.topk(n, dim=1)
        idx.append(best.indices)
        cos.append(best.values)
    return torch.cat(idx), torch.cat(cos)
