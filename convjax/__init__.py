"""convjax: convnets in pure-functional JAX/Flax (Linen)."""

from convjax import xla_defaults

xla_defaults.apply()  # before JAX creates its CPU backend; see convjax/xla_defaults.py

__version__ = "0.1.0"
