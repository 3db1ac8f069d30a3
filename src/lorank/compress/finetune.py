"""A small recovery fine-tuning loop for compressed models."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorank.compress.core import ForwardFn, default_forward

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[object, object], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    forward_fn: ForwardFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    params: Iterable[nn.Parameter] | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train ``model`` for ``steps`` optimizer steps on ``data`` (cycled if shorter) with
    ``loss_fn(forward_fn(model, batch), batch)``; AdamW by default, on all trainable
    parameters (or ``params``, e.g. only the factors).  Returns the loss of every step.

    The model is left in eval mode."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a nonnegative integer, got {steps!r}")
    forward_fn = forward_fn or default_forward
    params = [p for p in (params if params is not None else model.parameters())
              if p.requires_grad]
    if not params:
        raise ValueError("finetune: no trainable parameters")
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    model.train()
    batches = itertools.cycle(data) if steps else iter(())
    try:
        for step in range(steps):
            batch = next(batches)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(forward_fn(model, batch), batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"finetune: non-finite loss {float(loss)} at step "
                                         f"{step}; lower lr")
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                recent = losses[-log_every:]
                log(f"finetune step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}"
                    f" (ppl {math.exp(min(50.0, sum(recent) / len(recent))):.1f})")
    finally:
        model.eval()
    return losses
