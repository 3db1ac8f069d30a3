"""Input preparation shared by the structured distributions (PCFG, HSMM, their hypergraphs).

One copy of each convention (see the table in docs/structures.md): errors name the argument
the caller passed; all floating inputs share one dtype and device; logits are normalized so
that a row of all ``-inf`` stays ``-inf`` (never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorank._numerics import finite_or_zero
from lorank.semiring import safe_logsumexp


def check_instance(name: str, value: object, cls: type, expected: str) -> None:
    """Raise a TypeError naming the argument unless ``value`` is a ``cls``."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")


#: dtypes the dynamic programs accept: sums of products over many steps need their range and
#: precision (bfloat16 gave an HMM entropy of 57.75 instead of 138.85)
PRECISE_DTYPES = (torch.float32, torch.float64)


def check_precision(name: str, t: torch.Tensor) -> None:
    """Raise a TypeError naming the argument unless ``t`` is float32 or float64."""
    if t.is_floating_point() and t.dtype not in PRECISE_DTYPES:
        raise TypeError(
            f"{name} (shape {tuple(t.shape)}) has dtype {t.dtype}: lorank's dynamic programs "
            f"compute in float32 or float64 (half precision is too coarse for products over "
            f"many steps); pass {name}.float()"
        )


def check_alike(**tensors: torch.Tensor) -> None:
    """Raise a TypeError naming the arguments unless all tensors share one dtype and device,
    float32 or float64."""
    items = list(tensors.items())
    name0, ref = items[0]
    check_precision(name0, ref)
    for name, t in items[1:]:
        for what in ("dtype", "device"):
            a, b = getattr(ref, what), getattr(t, what)
            if a != b:
                raise TypeError(
                    f"{name} has {what} {b} (shape {tuple(t.shape)}) but {name0} has {what} "
                    f"{a} (shape {tuple(ref.shape)}); all inputs must share one {what}"
                )


def check_batch_shape(name: str, batch_shape: torch.Size, b: int, source: str) -> None:
    """Raise unless a factor's batch shape is () (shared) or (b,) (one per example of
    ``source``, the argument that fixes the batch size)."""
    if len(batch_shape) and tuple(batch_shape) != (b,):
        raise ValueError(
            f"batched {name} must have batch shape ({b},) to match {source}, got "
            f"{tuple(batch_shape)}"
        )


def check_no_dead_rows(name: str, logits: torch.Tensor) -> None:
    """Raise unless every row (last dimension) of ``logits`` has a finite entry: a
    distribution over no outcome (e.g. a root or initial state that can never be drawn)."""
    if logits.numel() and bool(torch.isneginf(logits).all(-1).any()):
        rows = torch.isneginf(logits).all(-1).nonzero().tolist()
        raise ValueError(
            f"{name} (shape {tuple(logits.shape)}) has a row that is all -inf (rows "
            f"{rows[:5]}): a distribution needs at least one possible outcome"
        )


def log_normalize(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log_softmax`` along ``dim`` that leaves an all ``-inf`` slice ``-inf`` (not NaN), with
    finite gradients there: a state whose row is all ``-inf`` is simply never used."""
    return logits - finite_or_zero(safe_logsumexp(logits, dim, keepdim=True))


def grads_or_zeros(
    output: torch.Tensor, inputs: Sequence[torch.Tensor], create_graph: bool = False
) -> list[torch.Tensor]:
    """``autograd.grad(output, inputs)`` where an input the output does not depend on (or an
    output that depends on no input, e.g. a batch of one-word sentences) gets zeros."""
    if not output.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(output, list(inputs), allow_unused=True,
                                create_graph=create_graph)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


__all__ = [
    "check_alike",
    "check_batch_shape",
    "check_instance",
    "check_no_dead_rows",
    "grads_or_zeros",
    "log_normalize",
]
