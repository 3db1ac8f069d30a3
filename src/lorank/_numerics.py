"""Small numerical helpers shared by the dynamic programs: one copy of each."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def records_derivatives(x: torch.Tensor) -> bool:
    """Whether a derivative of ``x`` may be taken: reverse mode (``requires_grad`` under grad
    mode), forward mode (a dual level is open) or a ``torch.func`` transform.  Without one,
    the guarded helpers below take their one-call form."""
    return ((x.requires_grad and torch.is_grad_enabled()) or fwAD._current_level >= 0
            or torch._C._functorch.is_functorch_wrapped_tensor(x))


def safe_log(x: torch.Tensor) -> torch.Tensor:
    """``log x`` for ``x >= 0`` with ``log 0 = -inf`` and a zero (not inf/NaN) derivative
    there; NaN stays NaN.  When no derivative is recorded: the plain logarithm (same values)."""
    if not records_derivatives(x):
        return x.log()
    zero = x == 0
    return torch.where(zero, float("-inf"), torch.where(zero, torch.ones_like(x), x).log())


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every non-finite entry (``±inf``, NaN) replaced by 0."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # gradient 0 there too


def stable_shift(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The detached max of ``x`` over ``dim`` (kept), 0 where that max is not finite: the shift
    of a log-sum-exp that never turns an all ``-inf`` slice into NaN."""
    return finite_or_zero(x.amax(dim=dim, keepdim=True)).detach()


def gumbel_noise(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, drawn on the CPU generator's device by default."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(dtype).tiny)))


def gumbel_argmax(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One categorical draw per row of ``logits`` (..., K) by the Gumbel-max trick."""
    noise = gumbel_noise(logits.shape, generator, logits.dtype, logits.device)
    return (logits + noise).argmax(-1)
