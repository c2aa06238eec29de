"""Tests for vit_jax/optim.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from vit_jax import optim

PARAMS = {"embedding": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
          "Transformer": {"encoder_norm": {"scale": jnp.ones((3,))}},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}


def cfg(**kw):
  c = common.base_config()
  c.unlock()
  for k, v in kw.items():
    node = c
    *path, leaf = k.split("__")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def test_param_names_and_regex_mask():
  names = optim.param_names(PARAMS)
  assert "Transformer/encoder_norm/scale" in names and "head/kernel" in names
  mask = optim.regex_mask(optim.KERNELS_ONLY, PARAMS, what="wd_mask")
  assert mask["embedding"]["kernel"] and mask["head"]["kernel"]
  assert not mask["embedding"]["bias"] and not mask["Transformer"]["encoder_norm"]["scale"]
  with pytest.raises(ValueError, match=r"freeze regex 'hed/.\*' matches no parameter"):
    optim.regex_mask("hed/.*", PARAMS, what="freeze")


def test_schedule_warmup_then_cosine():
  c = cfg(lr__base=1.0, lr__end=0.1, lr__decay="cosine")
  s = optim.make_schedule(c.lr, total_steps=110, warmup_steps=10)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half way through the cosine
  np.testing.assert_allclose(s(110), 0.1, atol=1e-6)
  lin = optim.make_schedule(cfg(lr__base=2.0, lr__decay="linear").lr, total_steps=10,
                            warmup_steps=0)
  np.testing.assert_allclose([lin(0), lin(5), lin(10)], [2.0, 1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="Unknown lr.decay 'cos'"):
    optim.make_schedule(cfg(lr__decay="cos").lr, total_steps=10, warmup_steps=0)


def test_sgd_weight_decay_only_on_kernels_and_frozen_head():
  c = cfg(optax__name="sgd", optax__momentum=0.0, lr__base=0.1, lr__decay="constant", wd=0.5,
          grad_clip_norm=0.0, freeze=r"head/.*")
  tx, _ = optim.make_optimizer(c, PARAMS, total_steps=10, warmup_steps=0)
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  # kernel: -lr * (g + wd * p) = -0.1 * 1.5; bias/scale: -0.1 * 1; frozen head: 0.
  np.testing.assert_allclose(updates["embedding"]["kernel"], -0.15)
  np.testing.assert_allclose(updates["embedding"]["bias"], -0.1)
  np.testing.assert_allclose(updates["Transformer"]["encoder_norm"]["scale"], -0.1)
  np.testing.assert_allclose(updates["head"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)


def test_clipping_and_adamw_first_step():
  c = cfg(optax__name="adamw", lr__base=0.01, lr__decay="constant", grad_clip_norm=1.0)
  tx, _ = optim.make_optimizer(c, PARAMS, total_steps=10, warmup_steps=0)
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  # Adam's first step is lr * sign(g) whatever the (clipped) scale.
  np.testing.assert_allclose(updates["head"]["bias"], -0.01, rtol=1e-4)


def test_durations_in_steps_epochs_examples():
  c = cfg(total_epochs=2.5)
  assert optim.durations(c, "total", steps_per_epoch=100, batch_size=8) == 250
  c = cfg(total_examples=800)
  assert optim.durations(c, "total", steps_per_epoch=100, batch_size=8) == 100
  c = cfg(lr__warmup_steps=7)
  assert optim.durations(c, "lr.warmup", steps_per_epoch=100, batch_size=8) == 7
  assert optim.durations(cfg(), "eval_every", steps_per_epoch=1, batch_size=1, default=3) == 3
  with pytest.raises(ValueError, match="Set one of total_steps, total_epochs or total_examples"):
    optim.durations(cfg(), "total", steps_per_epoch=1, batch_size=1, required=True)
  with pytest.raises(ValueError, match="Set only one of total_steps, total_epochs"):
    optim.durations(cfg(total_steps=1, total_epochs=1.0), "total", steps_per_epoch=1,
                    batch_size=1)


def test_unknown_optimizer():
  with pytest.raises(ValueError, match="Unknown optax.name 'lamb'"):
    optim.make_optimizer(cfg(optax__name="lamb"), PARAMS, total_steps=1, warmup_steps=0)


def _two_updates(c):
  tx, _ = optim.make_optimizer(c, PARAMS, total_steps=10, warmup_steps=0)
  grads = jax.tree_util.tree_map(jnp.ones_like, PARAMS)
  state = tx.init(PARAMS)
  first, state = tx.update(grads, state, PARAMS)
  second, _ = tx.update(grads, state, PARAMS)
  return float(first["embedding"]["bias"][0]), float(second["embedding"]["bias"][0])


def test_optimizer_names_mean_what_optaxs_do():
  """'sgd' was SGD with momentum 0.9 (the base config always set momentum); now it is optax.sgd:
  the second step of a constant gradient is the first's size. 'momentum' accumulates (1 + 0.9),
  an explicit momentum applies to 'sgd' too, and 'adam' with weight decay is an error."""
  base = dict(lr__base=0.1, lr__decay="constant", grad_clip_norm=0.0)
  first, second = _two_updates(cfg(optax__name="sgd", **base))
  np.testing.assert_allclose([first, second], [-0.1, -0.1], rtol=1e-6)
  first, second = _two_updates(cfg(optax__name="momentum", **base))
  np.testing.assert_allclose([first, second], [-0.1, -0.19], rtol=1e-6)
  first, second = _two_updates(cfg(optax__name="sgd", optax__momentum=0.5, **base))
  np.testing.assert_allclose([first, second], [-0.1, -0.15], rtol=1e-6)
  with pytest.raises(ValueError, match="optax.name='adam' has no weight decay.*use "
                                       "optax.name='adamw'"):
    optim.make_optimizer(cfg(optax__name="adam", wd=0.1, **base), PARAMS, total_steps=1,
                         warmup_steps=0)
  # Without weight decay adam and adamw are the same optimizer (as optax's are).
  a = _two_updates(cfg(optax__name="adam", **base))
  w = _two_updates(cfg(optax__name="adamw", **base))
  np.testing.assert_allclose(a, w)
