"""What the chain's backward keeps: nothing of size B x T x Z x R; memory-light keeps O(B T R);
the inference path keeps nothing."""

import torch

import lorank


def saved_tensors(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves while ``fn`` runs."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_lowrank_saved_state_never_btzr_and_memory_light_saves_less() -> None:
    b, t, z, r = 3, 6, 40, 5
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(z, r, generator=gen, requires_grad=True)
    right = torch.randn(z, r, generator=gen, requires_grad=True)
    emission = torch.randn(b, t, z, generator=gen).log_softmax(-1).requires_grad_(True)

    def run(memory_light: bool) -> list[torch.Tensor]:
        return saved_tensors(
            lambda: lorank.HMM(
                torch.zeros(z), lorank.LowRank(left, right), emission, memory_light=memory_light
            ).log_partition
        )

    def n_btz(saved: list[torch.Tensor]) -> int:
        """(B, T, Z)-sized buffers the chain allocated (the caller's emission excluded)."""
        ptrs = {x.data_ptr() for x in saved if x.numel() == b * t * z}
        return len(ptrs - {emission.data_ptr()})

    default, light = run(False), run(True)
    for saved in (default, light):
        biggest = max(x.numel() for x in saved)
        assert biggest <= b * t * z, f"a saved tensor is larger than the emission: {saved}"
    # the default kernel saves time-major (T, B, Z) scaled emissions and messages and the
    # (T, B, R) rank messages; memory-light the (B, T, Z) scaled emissions and (B, T, R)
    # rank messages only
    assert n_btz(default) == 2 and n_btz(light) == 1
    shapes = lambda saved: {tuple(x.shape) for x in saved}
    assert (t, b, z) in shapes(default) and (t, b, r) in shapes(default)
    assert (b, t, r) in shapes(light)
    # nothing is saved when no gradient is wanted, whether or not inputs require grad
    with torch.no_grad():
        assert run(False) == [] and run(True) == []
