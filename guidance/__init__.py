"""Frozen flow models, the sampler and the guidance methods."""
