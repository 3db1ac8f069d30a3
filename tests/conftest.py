"""Shared test set-up: make ``tests/`` importable (``brute``, ``brute_structures``) and a
seeded generator fixture.  Hypothesis settings live in ``brute.PROPERTY``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)
