"""Tests for vit_jax/models/axial.py: position-sensitive axial-attention ResNets."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import axial

# 224 px, 1000-class head: the counts of the authors' PyTorch models (axial50s/m/l, axial26s of
# github.com/csrhddlam/axial-deeplab, counted there with torch); its README publishes 5.9M for
# Axial-ResNet-26-S. docs/reference.md, "Stand-alone self-attention and Axial-ResNets", says why
# the paper's Table 1 (12.4M) is not among them.
COUNTS = {"Axial-ResNet-S": 11_586_216, "Axial-ResNet-M": 25_179_400,
          "Axial-ResNet-L": 43_973_480, "Axial-ResNet-26-S": 5_944_936}


def count_params(model, size=224):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def _attention_count(c_in, f, span, heads=8):
  d = f // heads
  # qkv, its BN; the relative table; BN over 3 logit terms per head; BN over content + embedding.
  return c_in * 2 * f + 2 * 2 * f + (2 * span - 1) * 2 * d + 2 * 3 * heads + 2 * 2 * f


def _arithmetic_count(stages, base, span=56, classes=1000):
  total, c = 7 * 7 * 3 * base + 2 * base, base
  for s, n in enumerate(stages):
    f = 2 * base * 2**s
    for u in range(n):
      stride = 2 if s and not u else 1
      total += c * f + 2 * f + _attention_count(f, f, span) * 2 + f * 2 * f + 2 * 2 * f
      total += (c * 2 * f + 2 * 2 * f) if u == 0 else 0
      c = 2 * f
      span //= stride
  return total + c * classes + classes


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  kwargs = axial.config_from_name(name)
  count = count_params(models.get_model(name, num_classes=1000))
  assert count == COUNTS[name] == _arithmetic_count(kwargs["num_layers"], kwargs["base_width"])
  if name == "Axial-ResNet-26-S":
    assert round(count / 1e6, 1) == 5.9  # the official README's model zoo


def test_tree_layout_and_spans():
  shapes = jax.eval_shape(lambda: models.get_model("Axial-ResNet-S", num_classes=5).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
  flat = {"/".join(k): v.shape
          for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}
  expected = {
      "conv_root/kernel": (7, 7, 3, 32), "bn_root/scale": (32,),
      "block1/unit1/conv_down/kernel": (1, 1, 32, 64), "block1/unit1/bn_down/scale": (64,),
      "block1/unit1/height/qkv/kernel": (64, 128), "block1/unit1/height/bn_qkv/scale": (128,),
      "block1/unit1/height/bn_similarity/scale": (8, 3),
      "block1/unit1/height/bn_output/bias": (128,),
      "block1/unit1/conv_up/kernel": (1, 1, 64, 128),
      "block1/unit1/conv_proj/kernel": (1, 1, 32, 128),
      "block4/unit3/bn_up/scale": (1024,), "head/kernel": (1024, 5),
  }
  for k, shape in expected.items():
    assert flat[k] == shape, k
  # The span follows the feature map at 224 px: 56; 56 then 28; 28 then 14; 14 then 7.
  spans = {k.split("/relative")[0]: (v[0] + 1) // 2 for k, v in flat.items()
           if k.endswith("height/relative")}
  assert spans["block1/unit3/height"] == 56
  assert (spans["block2/unit1/height"], spans["block2/unit2/height"]) == (56, 28)
  assert (spans["block3/unit1/height"], spans["block3/unit6/height"]) == (28, 14)
  assert (spans["block4/unit1/height"], spans["block4/unit3/height"]) == (14, 7)
  assert flat["block1/unit1/width/relative"] == (111, 16)  # 2 * 56 - 1 offsets, 2 * d


def _identity_bn(variables):
  """BatchNorms at the identity (scale 1, bias 0, mean 0, var 1); other parameters as given."""
  def fix(path, a):
    keys = [getattr(p, "key", "") for p in path]
    if any(k.startswith("bn") for k in keys):
      return {"scale": jnp.ones_like(a), "mean": jnp.zeros_like(a), "var": jnp.ones_like(a)}.get(
          keys[-1], jnp.zeros_like(a))
    return a
  return jax.tree_util.tree_map_with_path(fix, variables)


def test_height_attention_is_the_position_sensitive_formula(random_variables):
  """Eq. 4 of the paper, written out in numpy along each column (BatchNorms at the identity)."""
  f, heads, span, h, w, c = 8, 2, 7, 6, 3, 5
  layer = axial.AxialAttention(f, axis="height", num_heads=heads, span=span)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, c))
  variables = _identity_bn(jax.tree_util.tree_map(lambda a: 20 * a,
                                                  random_variables(layer, x, False)))
  y = np.asarray(layer.apply(variables, x, False))
  p = variables["params"]
  kernel, table = np.asarray(p["qkv"]["kernel"]), np.asarray(p["relative"])
  bn = 1 / np.sqrt(1 + 1e-5)  # an identity BatchNorm in evaluation
  d = f // heads
  expected = np.zeros_like(y)
  for b in range(2):
    for col in range(w):
      qkv = np.asarray(x[b, :, col]) @ kernel * bn  # (H, 2f)
      for n in range(heads):
        hq = qkv[:, n * 2 * d:(n + 1) * 2 * d]
        q, k, v = hq[:, :d // 2], hq[:, d // 2:d], hq[:, d:]
        for o in range(h):
          r = table[np.arange(h) - o + span - 1]  # (H, 2d): offsets p - o
          logits = (k @ q[o] + r[:, :d // 2] @ q[o] + np.sum(k * r[:, d // 2:d], -1)) * bn
          a = np.exp(logits - logits.max())
          a /= a.sum()
          expected[b, o, col, n * d:(n + 1) * d] = (a @ v + a @ r[:, d:]) * bn
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", ["height", "width"])
def test_an_axial_layer_mixes_only_along_its_axis(axis, random_variables):
  layer = axial.AxialAttention(8, axis=axis, num_heads=2, span=8)
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 7, 4))
  variables = random_variables(layer, x, False)
  y = np.asarray(layer.apply(variables, x, False)[0])
  line = (slice(None), 3) if axis == "height" else (2, slice(None))  # column 3 / row 2
  y2 = np.asarray(layer.apply(variables, x.at[(0, *line)].add(2.0), False)[0])
  changed = np.abs(y2 - y).max(-1) > 1e-6
  expected = np.zeros((6, 7), bool)
  expected[line] = True
  np.testing.assert_array_equal(changed, expected)
  # One pixel reaches the whole of its column (row): global along the axis, not a window.
  y3 = np.asarray(layer.apply(variables, x.at[0, 2, 3].add(2.0), False)[0])
  np.testing.assert_array_equal(np.abs(y3 - y).max(-1) > 1e-6, expected)  # (2, 3): in both


def test_a_block_attends_along_columns_then_rows(random_variables):
  block = axial.AxialBlock(8, num_heads=2, span=8)
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 7, 16))
  variables = random_variables(block, x, False)
  run = lambda x: block.apply(variables, x, False, capture_intermediates=True,
                              mutable=["intermediates"])
  (y, s), (y2, s2) = run(x), run(x.at[0, 2, 3].add(2.0))
  after_height = np.abs(np.asarray(s2["intermediates"]["height"]["__call__"][0]
                                   - s["intermediates"]["height"]["__call__"][0]))[0].max(-1)
  expected = np.zeros((6, 7), bool)
  expected[:, 3] = True
  np.testing.assert_array_equal(after_height > 1e-6, expected)  # column 3 only
  assert (np.abs(np.asarray(y2 - y))[0].max(-1) > 1e-6).all()  # then every row: global


def test_relative_embeddings_make_logits_depend_on_offsets_only(random_variables):
  layer = axial.AxialAttention(8, axis="width", num_heads=2, span=9)
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(3), (1, 1, 1, 4)), (1, 2, 9, 4))
  variables = jax.tree_util.tree_map(lambda a: 20 * a, random_variables(layer, x, False))
  logits_of = lambda v: np.asarray(layer.apply(v, x, False, mutable=["intermediates"])[1][
      "intermediates"]["attention_logits"][0])[0, 0]  # (heads, L, L) of row 0
  logits = logits_of(variables)
  # Same content everywhere: logits[o, p] is a function of p - o (a Toeplitz matrix) ...
  np.testing.assert_allclose(logits[:, 1:, 1:], logits[:, :-1, :-1], rtol=1e-4, atol=1e-3)
  assert np.ptp(logits[:, 0], axis=-1).min() > 0.1  # ... which varies with the offset
  # Without the relative table only content is left: one logit for every pair.
  params = {**variables["params"], "relative": jnp.zeros_like(variables["params"]["relative"])}
  flat = logits_of({**variables, "params": params})
  assert np.ptp(flat, axis=(1, 2)).max() < 1e-3


def test_a_strided_block_pools_after_the_width_attention(random_variables):
  block = axial.AxialBlock(8, stride=2, num_heads=2, span=8)
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 16))
  variables = random_variables(block, x, False)
  y, s = block.apply(variables, x, False, capture_intermediates=True, mutable=["intermediates"])
  assert y.shape == (2, 4, 4, 16)
  assert s["intermediates"]["width"]["__call__"][0].shape == (2, 8, 8, 8)


def test_tiny_axial_resnet_trains_on_fashion_mnist_sized_images(sgd_on_batchnorm_model):
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  name, overrides, _, _ = fashion_mnist.MODELS["axial"]
  model = models.get_model(name, num_classes=10, **overrides)
  x = jax.random.uniform(jax.random.PRNGKey(5), (8, 28, 28, 1))
  y = jnp.arange(8) % 10
  losses, params, stats = sgd_on_batchnorm_model(model, x, y)
  assert losses[0] == pytest.approx(np.log(10), abs=1e-5)  # zero-init head
  assert losses[-1] < losses[0] - 0.05
  feats = model.clone(num_classes=0).apply({"params": params, "batch_stats": stats}, x)
  assert feats.shape == (8, 256)


def test_errors_name_the_problem():
  with pytest.raises(errors.ConfigError, match=r"Unknown Axial-ResNet 'Axial-ResNet-XL'.*-S"):
    models.get_model("Axial-ResNet-XL", num_classes=10)
  with pytest.raises(errors.ConfigError, match=r"Unknown Axial-ResNet 'Axial-ResNet-101-S'"):
    models.get_model("Axial-ResNet-101-S", num_classes=10)
  x = jnp.zeros((1, 30, 30, 1))
  small = dict(num_layers=(1,), base_width=8, num_heads=2, root="small")
  with pytest.raises(errors.ConfigError, match=r"span 28 is shorter than the height axis.*30"):
    jax.eval_shape(lambda: models.get_model("Axial-ResNet-S", num_classes=10, span=28,
                                            **small).init(jax.random.PRNGKey(0), x))
  with pytest.raises(errors.ConfigError, match=r"width 12 must split into num_heads=4 heads"):
    jax.eval_shape(lambda: axial.AxialAttention(12, num_heads=4).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)), False))
  with pytest.raises(errors.ConfigError, match=r"Unknown axial-attention axis 'depth'"):
    jax.eval_shape(lambda: axial.AxialAttention(8, axis="depth", num_heads=2).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)), False))
