"""vit_jax: vision transformers in JAX/Flax."""
