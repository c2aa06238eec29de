"""Tests for vit_jax/models/sasa.py: stand-alone local self-attention ResNets."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import sasa

# Ours, 224 px and a 1000-class head; the paper's Table 1 prints 10.3M, 14.1M and 18.0M for the
# attention ResNet-26/38/50 (docs/reference.md, "Stand-alone self-attention and Axial-ResNets":
# ResNet-38's 14.19M prints as 14.1M only when truncated, not rounded).
COUNTS = {"SASA-ResNet-26": 10_342_632, "SASA-ResNet-38": 14_190_632,
          "SASA-ResNet-50": 18_038_632}
PAPER_M = {"SASA-ResNet-26": 10.3, "SASA-ResNet-38": 14.1, "SASA-ResNet-50": 18.0}


def count_params(model, size=224):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def _arithmetic_count(stages, width=64, window=7, classes=1000):
  """torchvision's ResNet (BN: 2 parameters a channel) with every 3x3 conv (9 w^2) replaced by
  W_Q, W_K, W_V (3 w^2) and window rows of row and column embeddings (w/2 each)."""
  total, c = 7 * 7 * 3 * width + 2 * width, width
  for s, n in enumerate(stages):
    w = width * 2**s
    for u in range(n):
      total += c * w + 2 * w + 3 * w * w + window * w + 2 * w + w * 4 * w + 2 * 4 * w
      total += (c * 4 * w + 2 * 4 * w) if u == 0 else 0
      c = 4 * w
  return total + c * classes + classes


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_published_parameter_counts(name):
  depth = int(name.split("-")[-1])
  count = count_params(models.get_model(name, num_classes=1000))
  assert count == COUNTS[name] == _arithmetic_count(sasa.DEPTHS[depth])
  assert int(count / 1e5) / 10 == PAPER_M[name]
  # The same table's convolutional baselines (13.7M, 19.6M, 25.6M): the same arithmetic with the
  # 3x3 convolutions put back, which pins the stages (1,2,4,1), (2,3,5,2), (3,4,6,3).
  conv = count + sum(6 * n * (64 * 2**s)**2 - 7 * n * 64 * 2**s
                     for s, n in enumerate(sasa.DEPTHS[depth]))
  assert round(conv / 1e6, 1) == {26: 13.7, 38: 19.6, 50: 25.6}[depth]


def test_tree_layout():
  shapes = jax.eval_shape(lambda: models.get_model("SASA-ResNet-26", num_classes=5).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  flat = {"/".join(k): v.shape
          for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}
  expected = {
      "conv_root/kernel": (7, 7, 3, 64), "bn_root/scale": (64,),
      "block1/unit1/conv1/kernel": (1, 1, 64, 64), "block1/unit1/bn1/bias": (64,),
      "block1/unit1/attention/query/kernel": (64, 64),
      "block1/unit1/attention/value/kernel": (64, 64),
      "block1/unit1/attention/rel_height": (7, 8, 4), "block1/unit1/attention/rel_width": (7, 8, 4),
      "block1/unit1/conv3/kernel": (1, 1, 64, 256),
      "block1/unit1/conv_proj/kernel": (1, 1, 64, 256),
      "block2/unit2/attention/key/kernel": (128, 128), "block4/unit1/bn3/scale": (2048,),
      "head/kernel": (2048, 5),
  }
  for k, shape in expected.items():
    assert flat[k] == shape, k
  assert not [k for k in flat if "conv_proj" in k and "/unit1/" not in k]
  assert {k.split("/")[0] for k in shapes["batch_stats"]} == {
      "bn_root", "block1", "block2", "block3", "block4"}


def _layer(window=3, features=8, heads=2):
  return sasa.LocalSelfAttention(features, num_heads=heads, window=window)


def test_an_output_pixel_depends_on_its_window_only(random_variables):
  layer = _layer(window=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
  variables = random_variables(layer, x)
  for (i, j) in ((4, 4), (0, 0), (8, 3)):
    grad = jax.grad(lambda x: layer.apply(variables, x)[0, i, j].sum())(x)
    seen = np.abs(np.asarray(grad[0])).sum(-1) > 0  # (9, 9)
    window = np.zeros((9, 9), bool)
    window[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2] = True
    np.testing.assert_array_equal(seen, window, err_msg=f"pixel {(i, j)}")
  # Perturbation: changing a pixel moves the outputs of the pixels within 1 of it, only.
  y = layer.apply(variables, x)[0]
  y2 = layer.apply(variables, x.at[0, 6, 2].add(3.0))[0]
  changed = np.abs(np.asarray(y2 - y)).max(-1) > 1e-6
  expected = np.zeros((9, 9), bool)
  expected[5:8, 1:4] = True
  np.testing.assert_array_equal(changed, expected)


def _logits(layer, variables, x):
  _, state = layer.apply(variables, x, mutable=["intermediates"])
  return np.asarray(state["intermediates"]["attention_logits"][0])  # (B, H, W, heads, k, k)


def test_relative_embeddings_make_logits_depend_on_offsets_only(random_variables):
  layer = _layer(window=5, features=8, heads=2)
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 4)), (1, 10, 10, 4))
  variables = jax.tree_util.tree_map(lambda a: 20 * a, random_variables(layer, x))  # std 1
  logits = _logits(layer, variables, x)[0]  # (10, 10, heads, 5, 5)
  # Same content everywhere: every pixel whose window lies inside the image sees the same
  # logits over its offsets, and they vary with the offset.
  interior = logits[2:8, 2:8].reshape(36, 2, 5, 5)
  np.testing.assert_allclose(interior, np.broadcast_to(interior[:1], interior.shape), atol=1e-4)
  assert interior[0].std(axis=(1, 2)).min() > 0.1
  # The row embedding moves the logits along the window's rows only, the column one along its
  # columns only: q . (k + r) with r = [r_row(a - i), r_col(b - j)].
  params = variables["params"]
  for zeroed, constant_axis in (("rel_width", 2), ("rel_height", 1)):
    p = {**params, zeroed: jnp.zeros_like(params[zeroed])}
    part = _logits(layer, {"params": p}, x)[0][5, 5]  # (heads, 5, 5)
    np.testing.assert_allclose(part, np.broadcast_to(part.mean(constant_axis, keepdims=True),
                                                     part.shape), atol=1e-4)
  p = {**params, "rel_width": jnp.zeros_like(params["rel_width"]),
       "rel_height": jnp.zeros_like(params["rel_height"])}
  part = _logits(layer, {"params": p}, x)[0][5, 5]
  assert np.ptp(part, axis=(1, 2)).max() < 1e-4  # content alone: no offset dependence
  # Out-of-image neighbours are masked.
  assert (logits[0, 0, :, :2, :] < -1e8).all() and (logits[0, 0, :, 2:, 2:] > -1e8).all()


@pytest.mark.parametrize("window,block,hw", [(3, 3, (9, 9)), (5, 4, (9, 11)), (7, 7, (14, 28)),
                                             (7, 7, (5, 6)), (3, 7, (28, 28))])
def test_blocked_attention_computes_the_windowed_attention(window, block, hw):
  # The layer trains and predicts through the blocked form; the windowed form (its logits are the
  # sown attention maps) is the definition: the same outputs, image sizes that are and are not
  # multiples of the block, windows wider than parts of the image.
  rng = np.random.default_rng(0)
  heads, d = 2, 4
  q = jnp.asarray(rng.normal(size=(2, *hw, heads, d)), jnp.float32)
  key, value = (jnp.asarray(rng.normal(size=(2, *hw, heads * d)), jnp.float32) for _ in "kv")
  rel_h = jnp.asarray(rng.normal(size=(window, heads, d // 2)), jnp.float32)
  rel_w = jnp.asarray(rng.normal(size=(window, heads, d - d // 2)), jnp.float32)
  kw = dict(rel_h=rel_h, rel_w=rel_w, window=window, dtype=jnp.float32)
  y_windows, _ = sasa._local_attention(q, key, value, **kw)
  y_blocks = sasa._blocked_local_attention(q, key, value, block=block, **kw)
  assert y_blocks.shape == y_windows.shape == (2, *hw, heads, d)
  np.testing.assert_allclose(np.asarray(y_blocks), np.asarray(y_windows), atol=2e-6, rtol=2e-6)


def test_the_layer_trains_through_blocks_with_the_windowed_outputs(random_variables):
  # query_block only chooses the computation: 0 (windowed) and 4 (blocked) share the parameters
  # and give the same outputs and gradients.
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 10, 8))
  variables = random_variables(_layer(window=5), x)
  out = {}
  for block in (0, 4):
    layer = sasa.LocalSelfAttention(8, num_heads=2, window=5, query_block=block)
    loss = lambda v: jnp.sum(layer.apply(v, x)**2)
    out[block] = jax.jit(jax.value_and_grad(loss))(variables)
  np.testing.assert_allclose(out[4][0], out[0][0], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(out[4][1]), jax.tree_util.tree_leaves(out[0][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_local_attention_is_translation_equivariant(random_variables):
  layer = _layer(window=3)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 12, 12, 4))
  variables = random_variables(layer, x)
  y = np.asarray(layer.apply(variables, x)[0])
  y2 = np.asarray(layer.apply(variables, jnp.roll(x, (1, 2), axis=(1, 2)))[0])
  # Pixels whose 3x3 window sees no wrapped row or column in either image.
  np.testing.assert_allclose(y2[2:11, 3:11], y[1:10, 1:9], rtol=1e-5, atol=1e-5)


def test_a_strided_unit_pools_after_the_attention(random_variables):
  unit = sasa.SASABottleneck(8, stride=2, num_heads=2, window=3)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 16))
  variables = random_variables(unit, x, train=False)
  y, state = unit.apply(variables, x, train=False, capture_intermediates=True,
                        mutable=["intermediates"])
  assert y.shape == (2, 4, 4, 32)
  attended = state["intermediates"]["attention"]["__call__"][0]
  assert attended.shape == (2, 8, 8, 8)  # attention at full resolution, then the pool
  pooled = jnp.mean(attended.reshape(2, 4, 2, 4, 2, 8), axis=(2, 4))
  bn2, stats = variables["params"]["bn2"], variables["batch_stats"]["bn2"]
  expected = (pooled - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn2["scale"] + bn2["bias"]
  np.testing.assert_allclose(state["intermediates"]["bn2"]["__call__"][0], expected, rtol=1e-4,
                             atol=1e-5)


def test_tiny_sasa_resnet_trains_on_fashion_mnist_sized_images(sgd_on_batchnorm_model):
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  name, overrides, _, _ = fashion_mnist.MODELS["sasa"]
  model = models.get_model(name, num_classes=10, **overrides)
  x = jax.random.uniform(jax.random.PRNGKey(4), (8, 28, 28, 1))
  y = jnp.arange(8) % 10
  losses, params, stats = sgd_on_batchnorm_model(model, x, y)
  assert losses[0] == pytest.approx(np.log(10), abs=1e-5)  # zero-init head
  assert losses[-1] < losses[0] - 0.05
  assert not np.allclose(stats["bn_root"]["mean"], 0)  # training updated the statistics
  feats = model.clone(num_classes=0).apply({"params": params, "batch_stats": stats}, x)
  assert feats.shape == (8, 256)


def test_errors_name_the_problem():
  with pytest.raises(errors.ConfigError, match=r"Unknown SASA-ResNet depth 34.*SASA-ResNet-26"):
    models.get_model("SASA-ResNet-34", num_classes=10)
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(errors.ConfigError, match=r"window=4.*odd"):
    jax.eval_shape(lambda: _layer(window=4).init(jax.random.PRNGKey(0), x))
  with pytest.raises(errors.ConfigError, match=r"width 8 is not divisible by num_heads=3"):
    jax.eval_shape(lambda: _layer(heads=3).init(jax.random.PRNGKey(0), x))
  with pytest.raises(errors.ConfigError, match=r"Unknown ResNet root 'tiny'.*'imagenet'.*'small'"):
    jax.eval_shape(lambda: models.get_model("SASA-ResNet-26", num_classes=10, root="tiny").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))


def test_the_shared_window_and_offset_helpers():
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jnp.arange(2 * 4 * 5 * 1, dtype=jnp.float32).reshape(2, 4, 5, 1) + 1
  shifted, valid = layers.local_windows(x, 3)
  assert len(shifted) == 9 and valid.shape == (4, 5, 3, 3)
  # Copy (a, b) at pixel (i, j) is pixel (i + a - 1, j + b - 1), zero (and invalid) outside.
  assert float(shifted[0][0, 2, 3, 0]) == float(x[0, 1, 2, 0])
  assert float(shifted[8][1, 0, 0, 0]) == float(x[1, 1, 1, 0])
  assert float(shifted[0][0, 0, 0, 0]) == 0 and not valid[0, 0, 0, 0] and valid[0, 0, 1, 1]
  assert valid.sum() == sum(int(np.asarray(s[0, ..., 0] != 0).sum()) for s in shifted)
  np.testing.assert_array_equal(layers.relative_index([0, 1, 2], [0, 1, 2], 2),
                                [[2, 3, 4], [1, 2, 3], [0, 1, 2]])
  with pytest.raises(errors.ConfigError, match=r"offset 3 is beyond the table's 5 offsets"):
    layers.relative_index([0], [3], 2)
