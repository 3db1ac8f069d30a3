"""Distribution objects over latent structures (batch-first, torch.distributions-like)."""
