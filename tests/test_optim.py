"""Tests for vit_jax/optim.py."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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


def test_sgd_momentum_decoupled_weight_decay_on_kernels_and_frozen_head():
  """Two steps of SGD with momentum 0.9 and weight decay, against optax.sgd's own momentum with
  the decay added outside it (decoupled: p <- p - lr * wd * p, the momentum never sees it)."""
  lr, wd, m = 0.1, 0.5, 0.9
  c = cfg(optax__name="sgd", optax__momentum=m, lr__base=lr, lr__decay="constant", wd=wd,
          grad_clip_norm=0.0, freeze=r"head/.*")
  tx, _ = optim.make_optimizer(c, PARAMS, total_steps=10, warmup_steps=0)
  reference = optax.sgd(lr, momentum=m)
  leaves, treedef = jax.tree_util.tree_flatten(PARAMS)
  rng = np.random.default_rng(0)
  gradients = [jax.tree_util.tree_unflatten(treedef, [
      jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in leaves]) for _ in range(2)]
  params, state, ref_state = PARAMS, tx.init(PARAMS), reference.init(PARAMS)
  for grads in gradients:
    updates, state = tx.update(grads, state, params)
    sgd, ref_state = reference.update(grads, ref_state, params)
    for name in ("embedding/kernel", "embedding/bias", "Transformer/encoder_norm/scale"):
      path = name.split("/")
      got, want, p = (_leaf(t, path) for t in (updates, sgd, params))
      if name.endswith("kernel"):
        want = want - lr * wd * p  # decoupled decay, kernels only
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(updates["head"]["kernel"], 0.0)  # frozen
    np.testing.assert_array_equal(updates["head"]["bias"], 0.0)
    params = optax.apply_updates(params, updates)
  # The second step holds the first's gradient times the momentum: a decay fed through the
  # momentum (optax.chain(add_decayed_weights, sgd)) would be 0.9 * lr * wd * p0 away from it.
  coupled = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m))
  st = coupled.init(PARAMS)
  u, st = coupled.update(gradients[0], st, PARAMS)
  u, _ = coupled.update(gradients[1], st, optax.apply_updates(PARAMS, u))
  np.testing.assert_allclose(updates["embedding"]["kernel"] - u["embedding"]["kernel"],
                             m * lr * wd * PARAMS["embedding"]["kernel"], rtol=1e-4)


def _leaf(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _decayed_names(model_name, **overrides):
  """Names of the parameters of a real model that default weight decay moves (SGD without
  momentum, zero gradients, every parameter 1: the update is -lr * wd on decayed ones)."""
  from vit_jax import models
  model = models.get_model(model_name, num_classes=10, **overrides)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
  c = cfg(optax__name="sgd", lr__base=0.1, lr__decay="constant", wd=0.5, grad_clip_norm=0.0)
  tx, _ = optim.make_optimizer(c, params, total_steps=1, warmup_steps=0)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  moved = {}
  for name, u in zip(optim.param_names(updates), jax.tree_util.tree_leaves(updates)):
    values = set(np.unique(np.asarray(u)).tolist())
    assert values in ({0.0}, {np.float32(-0.05)}), (name, values)
    moved[name] = values == {np.float32(-0.05)}
  return {n for n, m in moved.items() if m}, {n for n, m in moved.items() if not m}


def test_weight_decay_convention_on_a_real_vits_names():
  """optim.py's convention (wd_mask's default): every Dense / conv kernel decays, head and
  pre-logits included; biases, LayerNorm scales and biases, the class token and the position
  embedding do not."""
  decayed, kept = _decayed_names("ViT-Mu/7", hidden_size=16, mlp_dim=32, num_heads=2,
                                 num_layers=1, representation_size=8)
  block = "Transformer/encoderblock_0/"
  attn = block + "MultiHeadDotProductAttention_1/"
  assert decayed == {"embedding/kernel", attn + "query/kernel", attn + "key/kernel",
                     attn + "value/kernel", attn + "out/kernel",
                     block + "MlpBlock_3/Dense_0/kernel", block + "MlpBlock_3/Dense_1/kernel",
                     "pre_logits/kernel", "head/kernel"}
  assert kept == {"cls", "Transformer/posembed_input/pos_embedding", "embedding/bias",
                  attn + "query/bias", attn + "key/bias", attn + "value/bias", attn + "out/bias",
                  block + "MlpBlock_3/Dense_0/bias", block + "MlpBlock_3/Dense_1/bias",
                  block + "LayerNorm_0/scale", block + "LayerNorm_0/bias",
                  block + "LayerNorm_2/scale", block + "LayerNorm_2/bias",
                  "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias",
                  "pre_logits/bias", "head/bias"}
  # DeiT's distillation token and second head; Swin's relative position bias tables (which
  # Swin's reference exempts too) and its patch embedding's norm.
  decayed, kept = _decayed_names("DeiT-Mu/7-distilled", hidden_size=16, mlp_dim=32, num_heads=2,
                                 num_layers=1)
  assert {"dist", "cls", "head_dist/bias"} <= kept and "head_dist/kernel" in decayed
  decayed, kept = _decayed_names("Swin-T", embed_dim=8, depths=(1,), num_heads=(2,),
                                 patch_size=4, window_size=7, img_size=28)
  assert {"layers_0/blocks_0/attn/relative_position_bias_table", "patch_embed/norm/scale",
          "patch_embed/proj/bias", "norm/scale"} <= kept
  assert {"patch_embed/proj/kernel", "layers_0/blocks_0/attn/query/kernel"} <= decayed


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
