"""One call that trains a model with TRP, Maestro or SLTrain and returns the factorized model
and its report (the library side of a ``--method trp|maestro|sltrain`` command line)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorank.compress.core import ForwardFn
from lorank.compress.finetune import finetune
from lorank.compress.report import CompressionReport
from lorank.compress.trainable.maestro import Maestro, MaestroConfig
from lorank.compress.trainable.sltrain import SLTrainConfig, sltrain, sltrain_report
from lorank.compress.trainable.trp import TRP, TRPConfig

__all__ = ["train_low_rank"]


def train_low_rank(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable[[object, object], torch.Tensor],
    config: TRPConfig | MaestroConfig | SLTrainConfig,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    forward_fn: ForwardFn | None = None,
    clip_norm: float | None = 1.0,
    rank: int | dict[str, int] | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, CompressionReport, list[float]]:
    """Train ``model`` for ``steps`` AdamW steps on ``data`` (cycled; each batch fed as
    ``loss_fn(forward_fn(model, batch), batch)``, as in :func:`lorank.compress.finetune`)
    with the method ``config`` selects, then return ``(model, report, losses)``:

    * :class:`TRPConfig`: trains ``model`` itself (in place), then factorizes it at the TRP
      ranks (``LowRankLinear`` / ``LowRankRNN`` ...);
    * :class:`MaestroConfig`: trains the Maestro form of the selected layers, then keeps the
      first ``rank`` components of each (default: the ranks training arrived at);
    * :class:`SLTrainConfig`: replaces the selected linear layers by new ``SLTrainLinear``
      layers and trains them (pretraining); the result keeps them (``merge`` or
      ``to_sparse_lowrank`` convert them)."""
    if isinstance(config, SLTrainConfig):
        model = sltrain(model, config)
        hooks = None
    elif isinstance(config, MaestroConfig):
        hooks = Maestro(model, config)
        model = hooks.model
    elif isinstance(config, TRPConfig):
        hooks = TRP(model, config)
    else:
        raise TypeError(f"config must be a TRPConfig, MaestroConfig or SLTrainConfig, got "
                        f"{type(config).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if hooks is not None:
        hooks.attach(opt)
    try:
        losses = finetune(model, data, loss_fn, steps=steps, optimizer=opt,
                          forward_fn=forward_fn, clip_norm=clip_norm, params=params,
                          log_every=log_every, log=log)
    finally:
        if hooks is not None:
            hooks.detach()
    if isinstance(hooks, Maestro):
        small, report = hooks.compress(rank)
    elif isinstance(hooks, TRP):
        small, report = hooks.compress()
    else:
        small, report = model, sltrain_report(model)
    small.eval()
    return small, report, losses
