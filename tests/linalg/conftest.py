"""Small factorizations run fastest single-threaded: intra-op threads only add spin-waits
on the tiny matrices of these tests (and stall badly on a busy 2-core machine)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
