"""convjax: convnets in pure-functional JAX/Flax (Linen)."""

__version__ = "0.1.0"
