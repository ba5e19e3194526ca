"""diffusion_jax: Diffusion Models Beat GANs on Image Synthesis, in JAX/Flax."""

__version__ = "0.1.0"
