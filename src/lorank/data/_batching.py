"""Length-bucketed batching with deterministic shuffling and distributed sharding.

Shared by text (:func:`lorank.data.text.sentence_batches`) and music
(:func:`lorank.data.music.music_batches`).  Everything is computed from the lengths alone, so
every process of a torch.distributed job that passes the same ``seed`` builds the same global
list of batches and then takes its own share ``batches[rank::world_size]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch

T = TypeVar("T")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def length_batches(
    lengths: Sequence[int] | torch.Tensor,
    batch_size: int,
    *,
    max_tokens: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """Group item indices into batches of similar length; return this rank's batches.

    1. Items are sorted by length (ties broken by a seeded random permutation when
       ``shuffle``, by original position otherwise).
    2. Consecutive items are packed greedily: a batch holds at most ``batch_size`` items and,
       if ``max_tokens`` is given, at most ``max_tokens`` padded positions
       (``items * longest``); an item longer than ``max_tokens`` gets a batch of its own.
    3. The number of batches is made a multiple of ``world_size`` by halving the batch with the
       most items (or, when every batch holds one item, merging the two shortest neighbours),
       so every rank gets the same number of batches and every item is used exactly once.
    4. With ``shuffle`` the batch order is permuted (seeded); otherwise batches run from short
       to long.  Rank ``r`` takes ``batches[r::world_size]``.
    5. Within a batch, indices are ordered longest first.

    Pass ``seed = base_seed + epoch`` for a new order each epoch.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    n = lengths.numel()
    _check_int("batch_size", batch_size, 1)
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1)
    if rank >= world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if n < world_size:
        raise ValueError(
            f"cannot shard {n} item(s) over world_size={world_size} processes: every process "
            "needs at least one batch"
        )
    if n == 0:
        return []

    gen = torch.Generator().manual_seed(int(seed))
    if shuffle:
        perm = torch.randperm(n, generator=gen)
        order = perm[torch.sort(lengths[perm], stable=True).indices]
    else:
        order = torch.sort(lengths, stable=True).indices
    order_l = order.tolist()
    sorted_len = lengths[order].tolist()

    # greedy packing in ascending length: the newest item is always the longest
    batches: list[list[int]] = []
    cur: list[int] = []
    for idx, ln in zip(order_l, sorted_len, strict=True):
        if cur and (
            len(cur) >= batch_size
            or (max_tokens is not None and (len(cur) + 1) * max(ln, 1) > max_tokens)
        ):
            batches.append(cur)
            cur = []
        cur.append(idx)
    batches.append(cur)

    # equal share per rank
    while len(batches) % world_size:
        sizes = [len(b) for b in batches]
        big = max(range(len(batches)), key=lambda i: (sizes[i], -i))
        if sizes[big] > 1:
            b = batches[big]
            half = len(b) // 2
            batches[big : big + 1] = [b[:half], b[half:]]
        else:  # all singletons (only with a tight max_tokens): merge the cheapest neighbours
            pair = min(
                range(len(batches) - 1),
                key=lambda i: int(lengths[batches[i]].sum() + lengths[batches[i + 1]].sum()),
            )
            batches[pair : pair + 2] = [batches[pair] + batches[pair + 1]]

    if shuffle:
        perm_b = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in perm_b]
    lens = lengths.tolist()
    mine = batches[rank::world_size]
    return [sorted(b, key=lambda i: -lens[i]) for b in mine]


def padded_batches(
    items: Sequence[torch.Tensor],
    batch_size: int,
    *,
    max_tokens: int | None = None,
    fill: float = 0,
    dtype: torch.dtype | None = None,
    return_indices: bool = False,
    **order,
) -> BatchIterator:
    """Batches of items of similar length (dimension 0 of each tensor), padded with ``fill``:
    ``(batch (B, T, *rest), lengths (B,))`` and ``indices (B,)`` with ``return_indices``.
    ``order``: ``shuffle``, ``seed``, ``rank``, ``world_size`` of :func:`length_batches`."""
    lengths = torch.tensor([int(x.shape[0]) for x in items], dtype=torch.long)
    batches = length_batches(lengths, batch_size, max_tokens=max_tokens, **order)

    def collate(idx: list[int]):
        lens = lengths[idx]
        first = items[idx[0]]
        out = torch.full((len(idx), int(lens.max()), *first.shape[1:]), fill,
                         dtype=dtype or first.dtype)
        for row, i in enumerate(idx):
            out[row, : lens[row]] = items[i]
        if return_indices:
            return out, lens, torch.tensor(idx, dtype=torch.long)
        return out, lens

    return BatchIterator(batches, collate)


class BatchIterator(Generic[T]):
    """An iterator over precomputed index batches that also knows its length."""

    def __init__(self, batches: list[list[int]], collate: Callable[[list[int]], T]) -> None:
        self.batches = batches
        self._collate = collate
        self._pos = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._pos >= len(self.batches):
            raise StopIteration
        b = self.batches[self._pos]
        self._pos += 1
        return self._collate(b)
