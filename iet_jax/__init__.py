"""iet-jax: the Individualized Exploratory Transformer (IET) for super-resolution in JAX."""
