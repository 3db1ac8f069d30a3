"""Input checks shared by every public entry point: errors name the argument and its shape."""

from __future__ import annotations

import math

import torch


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | tuple[int, ...] | None = None,
    floating: bool = True,
    allow_neg_inf: bool = True,
    values: bool = True,
) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a tensor of the right rank, float dtype and (if
    ``values``) free of NaN and +inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else ndim
        if x.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if floating and values:
        check_values(name, x, allow_neg_inf=allow_neg_inf)
    return x


def check_values(
    name: str, x: torch.Tensor, *, allow_neg_inf: bool = True, reduced: torch.Tensor | None = None
) -> None:
    """Raise if ``x`` holds NaN or +inf (or -inf unless ``allow_neg_inf``), in one pass.

    One max reduction finds both (NaN propagates through max, +inf is the max); the detailed
    count runs only when it fails.  ``reduced``: a max of ``x`` over some dimensions that the
    caller computed anyway (e.g. the per-step emission max), which then costs no pass at all.
    """
    if not x.numel():
        return
    if allow_neg_inf:
        top = (x if reduced is None else reduced).detach().amax()
        if top.item() < math.inf:  # False for NaN
            return
    else:
        lo, top = torch.aminmax(x.detach())
        if top.item() < math.inf and lo.item() > -math.inf:
            return
    x = x.detach()
    if torch.isnan(x).any():
        n = int(torch.isnan(x).sum())
        raise ValueError(f"{name} (shape {tuple(x.shape)}) contains {n} NaN value(s)")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} (shape {tuple(x.shape)}) contains +inf")
    if not allow_neg_inf and torch.isneginf(x).any():
        raise ValueError(f"{name} (shape {tuple(x.shape)}) contains -inf")


def check_lengths(
    lengths: object, batch: int, max_len: int, device: torch.device, source: str = "emission"
) -> torch.Tensor:
    """Return ``lengths`` as a long tensor (batch,), each in [1, max_len] (``max_len`` is the
    time dimension of the tensor named ``source``), or raise."""
    if lengths is None:
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(
            f"lengths must have shape (batch,) = ({batch},), got {tuple(lengths.shape)} "
            f"({source} has batch size {batch})"
        )
    if lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > max_len:
            raise ValueError(
                f"lengths must lie in [1, {max_len}] (the time dimension of {source}), "
                f"got min {lo} and max {hi}"
            )
    return lengths.to(device=device, dtype=torch.long)


def check_positive_int(name: str, value: object) -> int:
    """Raise unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """Raise unless ``value`` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a nonnegative integer, got {value!r}")
    return value


def check_probability(name: str, value: object) -> float:
    """Raise unless ``value`` is a number in [0, 1); return it as a float."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)
