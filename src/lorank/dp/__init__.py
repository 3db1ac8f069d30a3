"""Pure dynamic programs: (potentials, factor, lengths, semiring) -> tensors."""
