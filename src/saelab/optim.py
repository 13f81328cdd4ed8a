"""Adam for SAE parameters, run on contiguous aliases of their storage.

torch's fused CPU Adam (one kernel over all parameters, much faster than the default foreach
implementation on CPU) works on contiguous memory: a parameter that is not contiguous is
copied out and back on every step. ``W_enc [d_in, d_sae]`` is stored column-major (it starts
as ``W_dec.T.clone()``, and the sparse path's gradient has that layout too), and that copy was
most of the optimizer step (measured in docs/performance.md, ``bench/optim.py``). Adam is
elementwise, so running it on the contiguous ``[d_sae, d_in]`` view ``W_enc.t()`` (same memory)
with the gradient's matching view gives bit-identical parameters (``tests/test_optim.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn


def _contiguous_alias(param: nn.Parameter) -> nn.Parameter | None:
    """A parameter sharing ``param``'s memory as a contiguous ``[n, m]`` tensor, for a
    transposed-contiguous (column-major) 2-d ``param [m, n]``; None if ``param`` needs none."""
    if param.is_contiguous() or param.dim() != 2 or not param.t().is_contiguous():
        return None
    return nn.Parameter(param.detach().t())


class SAEAdam(torch.optim.Adam):
    """``torch.optim.Adam`` (fused by default) that updates each column-major 2-d parameter
    through its contiguous transposed alias (module docstring); same arguments as Adam, same
    updates. Gradients stay on the original parameters (``param.grad``, e.g. for clipping);
    :meth:`step` hands the aliases their transposed views, without a copy when the gradient
    has the parameter's layout.

    The state of an aliased parameter (``exp_avg``, ``exp_avg_sq``) has the alias's shape; a
    state dict saved by plain Adam (the parameter's shape) is transposed on load.
    """

    def __init__(self, params: Iterable[dict[str, Any]] | Iterable[Tensor], **kwargs: Any) -> None:
        kwargs.setdefault("fused", True)
        self._aliases: list[tuple[nn.Parameter, nn.Parameter]] = []
        given = list(params)
        if given and not isinstance(given[0], dict):
            given = [{"params": given}]
        groups = []
        for group in given:
            group_params = []
            for param in group["params"]:
                alias = _contiguous_alias(param)
                if alias is not None:
                    self._aliases.append((param, alias))
                group_params.append(param if alias is None else alias)
            groups.append({**group, "params": group_params})
        super().__init__(groups, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the parameters given (aliased ones included)."""
        for param, alias in self._aliases:
            alias.grad = None  # a view of param.grad
            if param.grad is not None and set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()
        super().zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Adam step; each alias's gradient is ``param.grad.t()`` (copied only when not
        contiguous). ``closure`` (optional, as Adam's: recomputes the loss and its gradients)
        runs first, so the aliases get the gradients it leaves; returns its loss, or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for param, alias in self._aliases:
                alias.grad = None if param.grad is None else param.grad.t().contiguous()
        super().step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As Adam's; an aliased parameter's state saved in the parameter's own shape (by
        plain Adam) is transposed to the alias's."""
        super().load_state_dict(state_dict)
        for _, alias in self._aliases:
            for name, value in self.state[alias].items():
                if isinstance(value, Tensor) and value.dim() == 2 and value.shape != alias.shape:
                    self.state[alias][name] = value.t().contiguous()
