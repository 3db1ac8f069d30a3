"""Running a model with temporary forward hooks (calibration statistics, input sizes)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def hooked_eval(model: nn.Module, hooks: list) -> Iterator[None]:
    """``model`` in eval mode with the forward-hook handles ``hooks`` registered; on exit the
    hooks are removed and the training mode restored (also on errors)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
