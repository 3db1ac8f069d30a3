"""What the chain's backward keeps: nothing of size B x T x Z x R; memory-light keeps O(B T R)."""

import torch

import lorank


def saved_tensor_sizes(fn) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves while ``fn`` runs."""
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_lowrank_saved_state_never_btzr_and_memory_light_saves_less() -> None:
    b, t, z, r = 3, 6, 40, 5
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(z, r, generator=gen, requires_grad=True)
    right = torch.randn(z, r, generator=gen, requires_grad=True)
    emission = torch.randn(b, t, z, generator=gen).log_softmax(-1).requires_grad_(True)

    def run(memory_light: bool) -> list[tuple[int, ...]]:
        return saved_tensor_sizes(
            lambda: lorank.HMM(
                torch.zeros(z), lorank.LowRank(left, right), emission, memory_light=memory_light
            ).log_partition
        )

    default, light = run(False), run(True)
    for shapes in (default, light):
        biggest = max(torch.Size(s).numel() for s in shapes)
        assert biggest <= b * t * z, f"a saved tensor is larger than the emission: {shapes}"
    # inside the chain kernel: the default saves the (B, T, Z) pre-emission products,
    # memory-light only rank-space messages (B, T, R)
    n_btz = lambda shapes: sum(1 for s in shapes if s == (b, t, z))
    assert n_btz(light) < n_btz(default)
    assert (b, t, r) in light
