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


@pytest.fixture
def sgd_on_batchnorm_model():
  """fn(model, x, labels, steps=4, lr=0.1) -> (losses, params, batch_stats): plain SGD steps of
  softmax cross-entropy through `model.apply(..., train=True)`, BatchNorm statistics carried
  from step to step (initialised by the model's own init)."""
  def run(model, x, labels, steps=4, lr=0.1):
    num_classes = model.num_classes
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x))()

    def loss_fn(params, stats):
      logits, new = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      loss = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, num_classes),
                               -1))
      return loss, new["batch_stats"]

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    params, stats = variables["params"], variables["batch_stats"]
    losses = []
    for _ in range(steps):
      (loss, stats), grads = step(params, stats)
      losses.append(float(loss))
      params = jax.tree_util.tree_map(lambda a, g: a - lr * g, params, grads)
    return losses, params, stats
  return run
