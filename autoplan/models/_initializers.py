"""Parameter initializers that compile quickly on CPU.

XLA on CPU compiles random number generation for 3-D and 4-D shapes several
times slower than for a flat vector (seconds for a handful of conv kernels).
These initializers draw a flat vector and reshape it: same distribution,
a fraction of the compile time.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def normal(stddev: float):
    """``N(0, stddev**2)`` initializer."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        flat = jax.random.normal(key, (math.prod(shape),), dtype)
        return flat.reshape(shape) * jnp.asarray(stddev, dtype)

    return init


def he_normal(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
    """He-normal initializer, ``N(0, 2 / fan_in)``, for ``[..., in, out]`` kernels."""
    fan_in = math.prod(shape[:-1])
    return normal(math.sqrt(2.0 / fan_in))(key, shape, dtype)
