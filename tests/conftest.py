"""Shared test set-up: make ``tests/`` importable (``brute``, ``brute_structures``), a seeded
generator fixture, and a tiny PTB-layout corpus with HMM structure (words come in three groups
visited cyclically, so an HMM with a few states beats the unigram model quickly).  Hypothesis
settings live in ``brute.PROPERTY``."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(1234)


def write_tiny_corpus(root: Path, sizes=(120, 20, 20), seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(18)]
    root.mkdir(parents=True, exist_ok=True)
    for split, n in zip(("train", "valid", "test"), sizes, strict=True):
        lines = []
        for _ in range(n):
            g = rng.randrange(3)
            sent = []
            for _ in range(rng.randint(2, 9)):
                sent.append(words[g * 6 + rng.randrange(6)])
                g = (g + 1) % 3
            lines.append(" ".join(sent))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path / "tiny")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and do not fight other jobs for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
