"""sora_jax: train and sample text-to-video diffusion transformers in JAX."""
