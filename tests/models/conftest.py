"""Shared fixture for the model tests: variables without compiling random initialisers.

On XLA:CPU, `jax.jit(model.init)` of a small model spends most of its time compiling the random
initialisers (tens of seconds on a loaded 2-core machine); tests of the forward pass only need
well-scaled values of the right shapes, which numpy gives in milliseconds.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def random_variables():
  """fn(model, *init_args, **init_kwargs) -> variables shaped as `model.init`'s: LayerNorm/
  BatchNorm scales 1 + N(0, 0.05^2), BatchNorm running means 0 and variances 1, everything else
  N(0, 0.05^2); deterministic (numpy seed 0)."""
  def make(model, *args, **kwargs):
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    rng = np.random.default_rng(0)

    def fill(path, s):
      last = getattr(path[-1], "key", None)
      if last == "mean" and path[0].key == "batch_stats":
        return jnp.zeros(s.shape, s.dtype)
      if last == "var" and path[0].key == "batch_stats":
        return jnp.ones(s.shape, s.dtype)
      base = 1.0 if last == "scale" else 0.0
      return jnp.asarray(base + 0.05 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
  return make
