"""Matrix products of the hot loops, on oneDNN's kernels where they beat torch's default.

PyTorch's CPU ``torch.mm`` in float32 calls MKL.  On AMD CPUs MKL does not take its fastest
code path: on the Zen 5 machine of ``benchmarks/RESULTS.md`` it multiplies at less than half
the rate of oneDNN (the other CPU GEMM library inside PyTorch, reached through
``torch.ops.mkldnn._linear_pointwise``), for square and for the thin 16-row products of a
chain alike.  oneDNN can also *pack* a matrix once into its kernel's layout, which a loop
that multiplies by the same matrix at every step (a chain's transition) then reuses.

:class:`Operand` wraps such a loop-invariant right-hand matrix; :func:`mm` is the one-off
product.  Both give ``torch.mm``'s result (float32 rounding may differ) and fall back to it
off the CPU, for other dtypes, for small products (where the call overhead dominates),
whenever a derivative may be taken (reverse mode, forward mode, ``torch.func``: oneDNN's op
has no derivative), under CPU autocast, with ``torch.backends.mkldnn`` disabled, and when
the backend is ``"torch"``.  :func:`matmul` is the differentiable product: a custom
Function whose gradients (and forward-mode tangent) are oneDNN products too.

The backend: ``"auto"`` (the default: oneDNN where it applies), ``"onednn"`` (the same, but
an error if oneDNN's op is missing) or ``"torch"`` (always ``torch.mm``).  Set it with
:func:`set_backend` or the environment variable ``LORANK_GEMM``, read at import.
"""

from __future__ import annotations

import os

import torch

from lorank._numerics import records_derivatives

BACKENDS = ("auto", "onednn", "torch")
#: products of fewer multiply-adds than this stay with ``torch.mm`` (a oneDNN call costs a
#: few microseconds more than ``torch.mm``; measured in benchmarks/RESULTS.md)
MIN_WORK = 1 << 21
#: an :class:`Operand` is packed only if it is used for at least this many multiply-adds in all
#: (packing is one pass over the matrix, about the time of a few thin products)
MIN_PACK_WORK = 1 << 24


def _find_ops():
    try:
        ops = torch.ops.mkldnn
        linear = ops._linear_pointwise
        return linear.default, linear.binary, ops._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None, None, None


_LINEAR, _LINEAR_BINARY, _REORDER = _find_ops()
_AVAILABLE = _LINEAR is not None and torch.backends.mkldnn.is_available()


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"GEMM backend must be one of {BACKENDS}, got {name!r}")
    if name == "onednn" and not _AVAILABLE:
        raise RuntimeError(
            "GEMM backend 'onednn' asked for, but this PyTorch build has no oneDNN linear op "
            f"(torch {torch.__version__}, mkldnn available: "
            f"{torch.backends.mkldnn.is_available()})"
        )
    return name


_backend = _check_backend(os.environ.get("LORANK_GEMM") or "auto")


def set_backend(name: str) -> str:
    """Choose the GEMM backend (``"auto"``, ``"onednn"`` or ``"torch"``); returns the old one."""
    global _backend
    old, _backend = _backend, _check_backend(name)
    return old


def get_backend() -> str:
    """The GEMM backend in use (see :func:`set_backend`)."""
    return _backend


def _onednn(work: int, *tensors: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether a product of ``work`` multiply-adds of these 2-D operands goes to oneDNN (with
    ``differentiable``, through :class:`_MatMul`, which only ``torch.func`` wrappers bar)."""
    if (_backend == "torch" or not _AVAILABLE or work < MIN_WORK
            or not torch._C._get_mkldnn_enabled() or torch.is_autocast_enabled("cpu")):
        return False
    return all(
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.layout == torch.strided
        and t.dim() == 2
        and not (torch._C._functorch.is_functorch_wrapped_tensor(t) if differentiable
                 else records_derivatives(t))
        for t in tensors
    )


def mm(x: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ m`` for x (n, k) and m (k, p), or per example for m (n, k, p); into ``out`` if
    given."""
    if m.dim() == 3:
        if out is None:
            return torch.bmm(x.unsqueeze(1), m).squeeze(1)
        torch.bmm(x.unsqueeze(1), m, out=out.unsqueeze(1))
        return out
    if not _onednn(x.shape[0] * x.shape[1] * m.shape[1], x, m):
        return torch.mm(x, m) if out is None else torch.mm(x, m, out=out)
    y = _LINEAR(x, m.t(), None, "none", [], "")
    return y if out is None else out.copy_(y)


def product(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(x, m)`` for any shapes it takes, through :func:`mm` when both are 2-D
    (no autograd: use :func:`matmul` for a differentiable product)."""
    if x.dim() == 2 and m.dim() == 2:
        return mm(x, m)
    return torch.matmul(x, m)


class Operand:
    """A right-hand matrix ``m`` (k, p), or one per example (B, k, p), multiplied by many
    (rows, k) left-hand sides: packed once for oneDNN when that pays (``uses`` products of
    ``rows`` rows)."""

    def __init__(self, m: torch.Tensor, rows: int, uses: int = 1):
        self.matrix = m
        self._weight = None
        work = rows * m.shape[-2] * m.shape[-1]
        if _onednn(work, m):
            weight = m.t()  # oneDNN's linear takes (out, in)
            if work * uses >= MIN_PACK_WORK:
                weight = _REORDER(weight.contiguous(), rows)
            self._weight = weight

    def _fast(self, x: torch.Tensor) -> bool:
        return self._weight is not None and _onednn(MIN_WORK, x)

    def mm(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ m`` (per example for batched ``m``: x (B, k)), into ``out`` if given."""
        if self._fast(x):
            y = _LINEAR(x, self._weight, None, "none", [], "")
            return y if out is None else out.copy_(y)
        return mm(x, self.matrix, out)

    def mm_mul(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """``(x @ m) * other`` as a new tensor (one fused pass with oneDNN)."""
        if self._fast(x):
            return _LINEAR_BINARY(x, other, self._weight, None, "mul")
        return self.mm(x).mul_(other)

    def addmm_(self, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``acc += x @ m`` in place."""
        if self._fast(x):
            return acc.add_(_LINEAR(x, self._weight, None, "none", [], ""))
        if self.matrix.dim() == 2:
            return acc.addmm_(x, self.matrix)
        acc.unsqueeze(1).baddbmm_(x.unsqueeze(1), self.matrix)
        return acc


# ---- a differentiable product -----------------------------------------------------------------
class _MatMul(torch.autograd.Function):
    """``a @ b`` on oneDNN, with both gradients on oneDNN too (through :func:`matmul`, so a
    higher derivative is differentiable again) and a forward-mode rule."""

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _LINEAR(a, b.t(), None, "none", [], "")

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        ga = matmul(grad, b.t()) if ctx.needs_input_grad[0] else None
        gb = matmul(a.t(), grad) if ctx.needs_input_grad[1] else None
        return ga, gb

    @staticmethod
    def jvp(ctx, da, db):
        a, b = ctx.saved_tensors
        out = None if da is None else matmul(da, b)
        if db is not None:
            out = matmul(a, db) if out is None else out + matmul(a, db)
        return out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D), differentiable: oneDNN for the product, its gradients and its tangent on
    CPU float32 (as :func:`mm`; ``torch.func`` transforms fall back), ``a @ b`` otherwise."""
    if a.dim() == 2 and b.dim() == 2 and _onednn(a.shape[0] * a.shape[1] * b.shape[1], a, b,
                                                  differentiable=True):
        return _MatMul.apply(a, b)
    return a @ b
