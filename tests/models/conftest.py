"""Shared fixture for the model tests: variables without compiling random initialisers.

On XLA:CPU, `jax.jit(model.init)` of a small model spends most of its time compiling the random
initialisers (tens of seconds on a loaded 2-core machine); tests of the forward pass only need
well-scaled values of the right shapes, which numpy gives in milliseconds.
"""
import jax
import jax.numpy as jnp
import pytest

from tests.conftest import random_variables_of


@pytest.fixture
def random_variables():
  """tests.conftest.random_variables_of: variables shaped as `model.init`'s, from numpy."""
  return random_variables_of


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
