"""Deferred matrix gradients: one GEMM per matrix for a dynamic program's products with it.

A dynamic program that multiplies its messages by the same matrix ``M`` at every step gets,
under autograd, one outer product ``x_t^T g_t`` per step for ``M``'s gradient (a rank-B update
that writes all of M) and one accumulation into M's gradient buffer.  Inside
:func:`deferred_products`, :func:`lorank.semiring.log_matmul_by` makes its products
:class:`_DeferredMatmul` nodes instead: their backward only records ``(x_t, g_t)`` on a
:class:`MatrixTape`, and the tape's sink node, attached to the program's first message by
:meth:`MatrixTape.attach`, returns ``X^T G`` over all steps as one GEMM.  The autograd engine
runs the sink after every product, because every product's input derives from that first
message.  A product records only when the engine will run the sink in the current backward
pass (``torch.autograd.grad`` with respect to other inputs records nothing).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD

from lorank import _gemm

_local = threading.local()
#: smaller matrices keep the plain product: their per-step outer products are cheaper than the
#: Python cost of the deferred nodes (measured on the HSMM, benchmarks/RESULTS.md)
DEFER_MIN_NUMEL = 1 << 16


class MatrixTape:
    """The matrices of one dynamic-program pass whose gradients are deferred, and the
    ``(input, output gradient)`` pairs their products record during a backward pass."""

    def __init__(self) -> None:
        self.mats: list[torch.Tensor] = []
        self.records: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        self.calls: list[int] = []
        self.sink_node = None

    def defers(self, m: torch.Tensor) -> bool:
        """Whether products with ``m`` are deferred: it has at least ``DEFER_MIN_NUMEL``
        entries, is differentiated in reverse mode only (forward mode and ``torch.func``
        transforms take the plain product), and no pass has been attached yet."""
        return (self.sink_node is None and m.requires_grad and torch.is_grad_enabled()
                and m.dim() in (2, 3) and m.numel() >= DEFER_MIN_NUMEL
                and fwAD._current_level < 0
                and not torch._C._functorch.is_functorch_wrapped_tensor(m))

    def register(self, m: torch.Tensor) -> int:
        self.mats.append(m)
        self.records.append({})
        self.calls.append(0)
        return len(self.mats) - 1

    def product(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        """``x @ mats[idx]`` (x (N, k) for a (k, m) matrix, (B, n, k) for a (B, k, m) one;
        other shapes, or before :meth:`attach`: the plain product)."""
        m = self.mats[idx]
        if self.sink_node is None or x.dim() != m.dim() or (
            m.dim() == 3 and x.shape[0] != m.shape[0]
        ):
            return torch.matmul(x, m)
        key = self.calls[idx]
        self.calls[idx] += 1
        return _DeferredMatmul.apply(x, m, self, idx, key)

    def attach(self, first: torch.Tensor) -> torch.Tensor:
        """``first`` (the program's first message) through the sink node; call it once,
        after the products' matrices are registered and before the first product."""
        if not self.mats:
            return first
        out = _Sink.apply(first, self, *self.mats)
        self.sink_node = out.grad_fn
        return out

    def will_sink_run(self) -> bool:
        return self.sink_node is not None and torch._C._will_engine_execute_node(self.sink_node)

    def matrix_grads(self) -> list[torch.Tensor | None]:
        """Each matrix's gradient, one GEMM over its recorded steps; clears the records."""
        grads: list[torch.Tensor | None] = []
        for m, recs in zip(self.mats, self.records, strict=True):
            if not recs:
                grads.append(None)
                continue
            xs = [recs[k][0] for k in sorted(recs)]
            gs = [recs[k][1] for k in sorted(recs)]
            if m.dim() == 2:
                x = torch.cat([v.reshape(-1, m.shape[-2]) for v in xs])
                g = torch.cat([v.reshape(-1, m.shape[-1]) for v in gs])
                grads.append(_gemm.product(x.t(), g))
            else:
                grads.append(torch.cat(xs, -2).mT @ torch.cat(gs, -2))
            recs.clear()
        return grads


class _DeferredMatmul(torch.autograd.Function):
    """``x @ m`` whose backward returns x's gradient and records ``(x, g)`` for m's."""

    @staticmethod
    def forward(ctx, x, m, tape, idx, key):
        ctx.save_for_backward(x, m)
        ctx.tape, ctx.idx, ctx.key = tape, idx, key
        return _gemm.product(x, m)

    @staticmethod
    def backward(ctx, g):
        x, m = ctx.saved_tensors
        if ctx.needs_input_grad[1] and ctx.tape.will_sink_run():
            ctx.tape.records[ctx.idx][ctx.key] = (x, g)
        gx = _gemm.product(g, m.mT) if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None


class _Sink(torch.autograd.Function):
    """The identity on the first message; its backward returns the deferred matrix
    gradients (the engine runs it after every product that derives from that message)."""

    @staticmethod
    def forward(ctx, first, tape, *mats):
        ctx.tape = tape
        return first.clone()

    @staticmethod
    def backward(ctx, g):
        return (g, None, *ctx.tape.matrix_grads())


@contextmanager
def deferred_products() -> Iterator[MatrixTape]:
    """A tape that :func:`lorank.semiring.log_matmul_by` registers its matrices on while the
    block runs (per thread); attach the program's first message with ``tape.attach``."""
    tape = MatrixTape()
    prev = getattr(_local, "tape", None)
    _local.tape = tape
    try:
        yield tape
    finally:
        _local.tape = prev


def current_tape() -> MatrixTape | None:
    return getattr(_local, "tape", None)
