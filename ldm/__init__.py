"""Latent Diffusion Models: a research training framework (Rombach et al. 2022)."""

__version__ = "0.1.0"
