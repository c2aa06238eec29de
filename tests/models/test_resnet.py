"""Tests for vit_jax/models/resnet.py: BiT ResNets and the hybrid ViT's ResNet stem."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import resnet

# docs/reference.md, "ViT configurations and parameter counts": 224 px, 1000-class head. The
# published hybrid counts and BiT-M-R50x1's were re-derived by hand (`_arithmetic_count` below:
# conv kernels + 2 * GN channels + head, ViT as in test_vit.py) before being asserted.
PUBLISHED_COUNTS = {
    "R+ViT-Ti/16": 6_337_704, "R26+ViT-S/32": 36_431_912, "R26+ViT-B/32": 101_383_976,
    "R50+ViT-B/16": 98_659_112, "R50+ViT-L/32": 328_994_856, "BiT-R50x1": 25_549_352,
}


def count_params(model, size=224, channels=3):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def flat_shapes(model, size, channels=3):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))
  return {"/".join(k): v.shape
          for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}


def _arithmetic_count(stages, width, preact, classes=1000):
  """ResNet parameters from the architecture description alone (no flax)."""
  gn = lambda c: 2 * c
  total, c = 7 * 7 * 3 * width + (0 if preact else gn(width)), width
  for s, n in enumerate(stages):
    mid = width * 2**s
    for u in range(n):
      out, proj = 4 * mid, u == 0  # the first unit of every stage changes shape
      total += c * mid + 9 * mid * mid + mid * out + gn(mid) * 2
      total += gn(c) if preact else gn(out)
      total += (c * out + (0 if preact else gn(out))) if proj else 0
      c = out
  return total + (gn(c) if preact else 0) + c * classes + classes


class _Stem(nn.Module):
  """The hybrid stem alone, called from a compact method as VisionTransformer does."""
  kwargs: dict

  @nn.compact
  def __call__(self, x):
    return resnet.stem(x, **self.kwargs)


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
  assert count_params(models.get_model(name, num_classes=1000)) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("name,preact", [("BiT-R50x1", True), ("BiT-R50x1", False),
                                         ("BiT-R26x1", True), ("BiT-R101x3", True),
                                         ("BiT-R152x1", False)])
def test_counts_match_arithmetic(name, preact):
  kwargs = resnet.config_from_name(name)
  expected = _arithmetic_count(kwargs["num_layers"], 64 * kwargs["width_factor"], preact)
  assert count_params(models.get_model(name, num_classes=1000, preact=preact)) == expected
  if (name, preact) == ("BiT-R50x1", True):
    assert expected == 25_549_352  # BiT-M-R50x1
  if (name, preact) == ("BiT-R50x1", False):
    assert expected == 25_557_032  # post-activation units: GN where torchvision has BN


def test_hybrid_names_map_to_published_configs():
  assert models.get_model("R50+ViT-B/16", num_classes=1).resnet == dict(
      num_layers=(3, 4, 9), width_factor=1)
  assert models.get_model("R50+ViT-B/16", num_classes=1).patch_size == (1, 1)
  assert models.get_model("R+ViT-Ti/16", num_classes=1).patch_size == (8, 8)
  assert models.get_model("R+ViT-Ti/16", num_classes=1).resnet["num_layers"] == ()
  m = models.get_model("R26+ViT-S/32", num_classes=1)
  assert (m.hidden_size, m.resnet["num_layers"], m.patch_size) == (384, (2, 2, 2, 2), (1, 1))
  assert models.get_model("R50+ViT-L/32", num_classes=1).resnet["num_layers"] == (3, 4, 6, 3)
  assert models.get_model("BiT-R101x3", num_classes=1).num_layers == (3, 4, 23, 3)
  assert models.get_model("BiT-R101x3", num_classes=1).width_factor == 3


def test_hybrid_published_tree_layout():
  flat = flat_shapes(models.get_model("R50+ViT-B/16", num_classes=1000), 224)
  assert {k.split("/")[0] for k in flat} == {
      "conv_root", "gn_root", "block1", "block2", "block3", "embedding", "cls", "Transformer",
      "head"}
  expected = {
      "conv_root/kernel": (7, 7, 3, 64), "gn_root/scale": (64,), "gn_root/bias": (64,),
      "block1/unit1/conv1/kernel": (1, 1, 64, 64), "block1/unit1/gn1/scale": (64,),
      "block1/unit1/conv2/kernel": (3, 3, 64, 64), "block1/unit1/gn2/bias": (64,),
      "block1/unit1/conv3/kernel": (1, 1, 64, 256), "block1/unit1/gn3/scale": (256,),
      "block1/unit1/conv_proj/kernel": (1, 1, 64, 256), "block1/unit1/gn_proj/bias": (256,),
      "block2/unit1/conv_proj/kernel": (1, 1, 256, 512),
      "block3/unit9/conv3/kernel": (1, 1, 256, 1024), "block3/unit9/gn3/bias": (1024,),
      "embedding/kernel": (1, 1, 1024, 768),
      "Transformer/posembed_input/pos_embedding": (1, 197, 768),
  }
  for k, shape in expected.items():
    assert flat[k] == shape, k
  units = {s: {k.split("/")[1] for k in flat if k.startswith(f"block{s}/")} for s in (1, 2, 3)}
  assert units == {s: {f"unit{u}" for u in range(1, n + 1)} for s, n in zip((1, 2, 3), (3, 4, 9))}
  # Only the first unit of a stage projects its shortcut; no conv has a bias.
  assert not [k for k in flat if "conv_proj" in k and "/unit1/" not in k]
  assert not [k for k in flat if k.startswith(("conv", "block")) and k.endswith("/bias")
              and "/gn" not in k]


def test_preact_tree_layout():
  flat = flat_shapes(models.get_model("BiT-R50x1", num_classes=5), 64)
  assert "gn_root/scale" not in flat and not [k for k in flat if "gn_proj" in k]
  assert flat["norm-pre-head/scale"] == (2048,)
  assert flat["block1/unit1/gn1/scale"] == (64,)  # pre-activation: normalises the unit's input
  assert flat["block2/unit1/gn1/bias"] == (256,)
  assert flat["block4/unit3/gn3/scale"] == (512,)
  assert flat["block4/unit1/conv_proj/kernel"] == (1, 1, 1024, 2048)
  assert flat["head/kernel"] == (2048, 5)


def test_weight_standardization_matches_numpy():
  rng = np.random.default_rng(0)
  w = rng.normal(0.3, 0.05, size=(3, 3, 4, 5)).astype(np.float32)
  mean = w.mean(axis=(0, 1, 2))
  std = np.sqrt(((w - mean) ** 2).mean(axis=(0, 1, 2)))
  np.testing.assert_allclose(resnet.weight_standardize(w, eps=1e-5), (w - mean) / (std + 1e-5),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(resnet.weight_standardize(w, eps=1e-10, eps_in_sqrt=True),
                             (w - mean) / np.sqrt(std**2 + 1e-10), rtol=1e-5, atol=1e-5)
  # A big eps shows which formula is which.
  np.testing.assert_allclose(resnet.weight_standardize(w, eps=1.0), (w - mean) / (std + 1.0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(resnet.weight_standardize(w, eps=1.0, eps_in_sqrt=True),
                             (w - mean) / np.sqrt(std**2 + 1.0), rtol=1e-5, atol=1e-6)


def test_stdconv_uses_the_standardised_raw_kernel():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
  conv = resnet.StdConv(3, (3, 3), padding="VALID")
  params = conv.init(jax.random.PRNGKey(0), x)
  raw = np.asarray(params["params"]["kernel"])
  assert raw.shape == (3, 3, 4, 3)
  w = raw - raw.mean(axis=(0, 1, 2))
  w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
  expected = np.zeros((2, 3, 4, 3), np.float32)
  for i in range(3):
    for j in range(4):
      expected[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + 3, j:j + 3], w)
  np.testing.assert_allclose(conv.apply(params, x), expected, rtol=1e-4, atol=1e-4)
  # Scaling and shifting the stored kernel per output channel changes nothing.
  params2 = {"params": {"kernel": raw * 7.0 + np.arange(3, dtype=np.float32)}}
  np.testing.assert_allclose(conv.apply(params2, x), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("num_layers,size,stride,channels", [
    ((3, 4, 9), 224, 16, 1024), ((), 224, 4, 64), ((2, 2, 2, 2), 224, 32, 2048),
    ((3, 4, 9), 64, 16, 1024)])
def test_stem_output_stride(num_layers, size, stride, channels):
  stem = _Stem(dict(num_layers=num_layers, width_factor=1))
  out = jax.eval_shape(lambda: stem.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)))[0])
  assert out.shape == (2, size // stride, size // stride, channels)


def test_small_root_keeps_resolution():
  stem = _Stem(dict(num_layers=(1, 1), base_width=16, root="small", gn_groups=8))
  (out, params) = jax.eval_shape(lambda: stem.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 28, 28, 1))))
  assert out.shape == (2, 14, 14, 128)
  assert params["params"]["conv_root"]["kernel"].shape == (3, 3, 1, 16)


def test_gn3_scale_is_zero_init_so_units_start_as_relu_of_shortcut():
  unit = resnet.BottleneckUnit(features=8, gn_groups=4)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 32))  # identity shortcut
  y, params = jax.jit(unit.init_with_output)(jax.random.PRNGKey(0), x)
  p = params["params"]
  assert set(p) == {"conv1", "gn1", "conv2", "gn2", "conv3", "gn3"}
  np.testing.assert_array_equal(p["gn3"]["scale"], np.zeros(32))
  np.testing.assert_array_equal(p["gn2"]["scale"], np.ones(8))
  np.testing.assert_allclose(y, jax.nn.relu(x), atol=1e-6)
  # The same holds for every unit of the hybrid stem.
  flat = flat_shapes(models.get_model("R26+ViT-S/32", num_classes=1), 64)
  assert len([k for k in flat if k.endswith("gn3/scale")]) == 8


def test_group_norm_uses_32_groups():
  stem = _Stem(dict(num_layers=(), width_factor=1))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params = stem.init(jax.random.PRNGKey(0), x)
  _, state = stem.apply(params, x, capture_intermediates=True)
  y = np.asarray(state["intermediates"]["gn_root"]["__call__"][0])  # (2, 16, 16, 64)
  groups = y.reshape(2, 16 * 16, 32, 2)  # 32 groups of 2 channels each
  np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0, atol=1e-4)
  np.testing.assert_allclose(groups.var(axis=(1, 3)), 1, atol=1e-3)
  assert np.abs(y.reshape(2, 256, 64).var(axis=1) - 1).max() > 0.05  # not per channel


def test_stem_layout_equals_post_activation_resnet():
  """The hybrid's stem params drive ResNet(preact=False) unchanged: one layout for both."""
  kw = dict(num_layers=(1, 2), base_width=32, gn_groups=8, root="small")
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
  stem = _Stem(dict(kw))
  params = jax.jit(stem.init)(jax.random.PRNGKey(0), x)
  for unit in ("block1/unit1", "block2/unit1", "block2/unit2"):
    b, u = unit.split("/")
    assert not np.any(params["params"][b][u]["gn3"]["scale"])  # zero-init
  # Non-zero gn3 scales so that the residual branches matter.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.5 if "gn3" in jax.tree_util.keystr(p) else v, params)
  feats = jax.jit(stem.apply)(params, x)
  net = resnet.ResNet(num_classes=0, preact=False, **kw)
  np.testing.assert_allclose(jax.jit(net.apply)(params, x), feats.mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-5)


def _train_steps(model, x, y, steps=4, lr=0.1):
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x, train=True)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), -1))

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  losses = []
  for _ in range(steps):
    loss, grads = value_and_grad(params)
    losses.append(float(loss))
    params = jax.tree_util.tree_map(lambda a, g: a - lr * g, params, grads)
  return params, losses + [float(value_and_grad(params)[0])]


def test_tiny_resnet_on_fashion_mnist_sized_images():
  # (The post-activation flavour runs in test_stem_layout_equals_post_activation_resnet.)
  model = models.get_model("BiT-R26x1", num_classes=10, num_layers=(1, 1), base_width=16,
                           root="small", gn_groups=8)
  x = jax.random.uniform(jax.random.PRNGKey(3), (8, 28, 28, 1))
  y = jnp.arange(8) % 10
  params, losses = _train_steps(model, x, y)
  assert losses[0] == pytest.approx(np.log(10), abs=1e-5)  # zero-init head
  assert losses[-1] < losses[0] - 0.05
  logits, feats = jax.jit(lambda p: (model.apply(p, x), model.clone(num_classes=0).apply(p, x)))(
      {"params": params})
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, feats @ params["head"]["kernel"] + params["head"]["bias"],
                             rtol=1e-4, atol=1e-5)
  assert feats.shape == (8, 128)


def test_tiny_hybrid_on_fashion_mnist_sized_images():
  model = models.get_model(
      "R26+ViT-Mu/32", num_classes=10, num_layers=1, patch_size=(7, 7),
      resnet=dict(num_layers=(1,), width_factor=1, base_width=16, root="small", gn_groups=8))
  x = jax.random.uniform(jax.random.PRNGKey(4), (8, 28, 28, 1))
  y = jnp.arange(8) % 10
  params, losses = _train_steps(model, x, y, lr=0.03)
  assert params["embedding"]["kernel"].shape == (7, 7, 64, 128)  # 4x4 tokens on 28x28 features
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 128)
  assert losses[-1] < losses[0] - 0.05


def test_bfloat16_compute_float32_params():
  kw = dict(num_classes=10, num_layers=(1,), base_width=16, root="small", gn_groups=8)
  x = jax.random.uniform(jax.random.PRNGKey(5), (2, 28, 28, 1))
  m32 = resnet.ResNet(**kw)
  params = jax.jit(m32.init)(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda a: a + 0.01, params)  # non-zero head
  m16 = resnet.ResNet(**kw, dtype=jnp.bfloat16)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(
      jax.eval_shape(m16.init, jax.random.PRNGKey(0), x)))
  out16, out32 = jax.jit(m16.apply)(params, x), jax.jit(m32.apply)(params, x)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, rtol=0.05, atol=0.05)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"Unknown ResNet depth 34 in 'BiT-R34x1'.*26, 50, 101, 152"):
    models.get_model("BiT-R34x1", num_classes=10)
  with pytest.raises(ValueError, match=r"Unknown hybrid 'R26\+ViT-B/16'.*R50\+ViT-<variant>/16"):
    models.get_model("R26+ViT-B/16", num_classes=10)
  with pytest.raises(ValueError, match=r"Unknown ViT variant 'Q'"):
    models.get_model("R50+ViT-Q/16", num_classes=10)
  with pytest.raises(ValueError, match=r"Unknown model name.*R\+ViT-<variant>/16.*BiT-R50x<width>"):
    models.get_model("ResNet-50")
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['depth'\].*ResNet.*width_factor"):
    models.get_model("BiT-R50x1", num_classes=10, depth=50)
  x = jnp.zeros((1, 28, 28, 1))
  with pytest.raises(ValueError, match=r"Unknown ResNet root 'tiny'.*'imagenet'.*'small'"):
    resnet.ResNet(num_classes=10, root="tiny").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"gn_groups=32.*16 channels.*gn_groups=16"):
    resnet.ResNet(num_classes=10, base_width=16).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=r"num_layers=\(2, 0\).*at least one unit"):
    resnet.ResNet(num_classes=10, num_layers=(2, 0), base_width=32).init(
        jax.random.PRNGKey(0), x)


def test_hybrid_npz_loads(tmp_path):
  """A published-layout hybrid `.npz` (GroupNorm params stored (1,1,1,C)) loads into the same
  hybrid at another resolution and class count, and runs."""
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  model = models.get_model(
      "R26+ViT-Mu/32", num_classes=5, num_layers=1, patch_size=(2, 2),
      resnet=dict(num_layers=(1, 1), width_factor=1, base_width=32, gn_groups=8))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 96, 96, 3))
  init = jax.jit(model.init)(jax.random.PRNGKey(2), x)["params"]

  # The "published" file: the same architecture trained at 64 px (4x4 tokens + cls) with a
  # 10-class head; random values so that every leaf is recognisable.
  rng = np.random.default_rng(0)
  flat = {"/".join(k): rng.normal(size=v.shape).astype(np.float32)
          for k, v in flax.traverse_util.flatten_dict(init).items()}
  flat["Transformer/posembed_input/pos_embedding"] = rng.normal(size=(1, 17, 128))
  flat["head/kernel"], flat["head/bias"] = rng.normal(size=(128, 10)), np.zeros(10)
  gn_keys = [k for k in flat if re.search(r"(^|/)gn\w*/(scale|bias)$", k)]
  assert len(gn_keys) == 2 * (1 + 4 + 4)  # gn_root; gn1-3 and gn_proj in each of two units
  np.savez(tmp_path / "hybrid.npz",
           **{k: v.reshape(1, 1, 1, -1) if k in gn_keys else v for k, v in flat.items()})

  params = npz.load_pretrained(tmp_path / "hybrid.npz", init, log=lambda _: None)
  loaded = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
  for k in ("conv_root/kernel", "gn_root/bias", "block2/unit1/gn_proj/scale",
            "block1/unit1/conv2/kernel", "embedding/kernel"):
    np.testing.assert_array_equal(loaded[k], flat[k], err_msg=k)
  assert loaded["gn_root/bias"].shape == (32,)
  assert loaded["Transformer/posembed_input/pos_embedding"].shape == (1, 37, 128)  # 6x6 + cls
  np.testing.assert_array_equal(loaded["head/kernel"], init["head"]["kernel"])  # 5 classes: new
  params = flax.traverse_util.unflatten_dict(
      {**flax.traverse_util.flatten_dict(params), ("head", "kernel"): flat["head/kernel"][:, :5]})
  logits = jax.jit(model.apply)({"params": params}, x)
  assert logits.shape == (2, 5) and np.all(np.isfinite(logits))
  assert float(jnp.std(logits)) > 0


# --------------------------------------------- non-local blocks and attention augmentation.
SMALL = dict(num_layers=(2, 2, 2), base_width=16, root="small", gn_groups=8)


def test_a_non_local_block_starts_as_the_identity():
  block = resnet.NonLocalBlock(gn_groups=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6, 32))
  variables = block.init(jax.random.PRNGKey(1), x)
  assert not np.any(variables["params"]["norm"]["scale"])
  np.testing.assert_array_equal(block.apply(variables, x), x)


def test_a_non_local_block_is_global(random_variables):
  block = resnet.NonLocalBlock(gn_groups=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 32))
  variables = random_variables(block, x)  # the norm's scale ~1: no longer the identity
  y0 = block.apply(variables, x)
  y1 = block.apply(variables, x.at[0, 0, 0].add(1.0))
  change = np.abs(np.asarray(y1 - y0)).max(axis=-1)[0]  # (H, W)
  assert change[5, 5] > 1e-4  # the far corner sees the first pixel
  assert change.min() > 1e-6  # ... and so does every other position


class _Augmented(nn.Module):
  """`conv2` of a unit with attention augmentation, alone."""
  features: int
  aa: tuple
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    return resnet._conv2(x, resnet.StdConv, self.features, self.strides, self.aa,  # pylint: disable=protected-access
                         jnp.float32, jnp.float32)


def test_augmented_convolution_is_local_in_its_conv_part_and_global_in_its_attention():
  m = _Augmented(16, (0.25, 0.25, 2))
  dk, dv = resnet.aa_depths(16, 0.25, 0.25, 2)
  assert (dk, dv) == (4, 4)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 8))
  variables = m.init(jax.random.PRNGKey(1), x)
  shapes = jax.tree.map(np.shape, variables["params"])
  assert shapes["conv2"]["kernel"] == (3, 3, 8, 12)  # 16 - d_v convolutional outputs
  assert shapes["attn2"] == {"qkv": {"kernel": (8, 12)}, "out": {"kernel": (4, 4)},
                             "rel_height": (17, 2), "rel_width": (17, 2)}
  y0 = m.apply(variables, x)
  y1 = m.apply(variables, x.at[0, 0, 0].add(1.0))
  assert y0.shape == (1, 9, 9, 16)
  change = np.abs(np.asarray(y1 - y0))[0]  # (H, W, C)
  conv, attn = change[..., :12].max(-1), change[..., 12:].max(-1)
  assert conv[:2, :2].min() > 1e-4 and conv[2:].max() == 0 and conv[:, 2:].max() == 0
  assert attn[8, 8] > 1e-5 and attn.min() > 1e-7  # every position attends to the whole map
  m2 = _Augmented(16, (0.25, 0.25, 2), strides=(2, 2))
  assert m2.apply(m2.init(jax.random.PRNGKey(1), x), x).shape == (1, 5, 5, 16)


def test_relative_logits_2d_depend_on_the_offset_only():
  rng = np.random.default_rng(0)
  h, w, d = 3, 4, 5
  q0 = rng.normal(size=d)
  rel_h, rel_w = rng.normal(size=(2 * h - 1, d)), rng.normal(size=(2 * w - 1, d))
  q = jnp.asarray(np.broadcast_to(q0, (1, 1, h, w, d)))
  logits = np.asarray(resnet.relative_logits_2d(q, jnp.asarray(rel_h), jnp.asarray(rel_w)))[0, 0]
  for i in range(h * w):
    for j in range(h * w):
      (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
      expected = q0 @ rel_h[yj - yi + h - 1] + q0 @ rel_w[xj - xi + w - 1]
      np.testing.assert_allclose(logits[i, j], expected, rtol=1e-5, atol=1e-5)


def _attention_resnet_count(name, size=224):
  """The BiT count plus what the attention options add, from the description alone."""
  kwargs = resnet.config_from_name(name)
  total = _arithmetic_count(kwargs["num_layers"], 64, preact=True)
  for stage, _ in kwargs.get("nonlocal_units", ()):
    c = 4 * 64 * 2**(stage - 1)
    total += 3 * (c * c // 2 + c // 2) + c // 2 * c + c + 2 * c  # theta, phi, g; out; norm
  side = size // 4  # the map after the root; each stage after the first halves it
  for stage in kwargs.get("aa_stages", ()):
    mid, n = 64 * 2**(stage - 1), side // 2**(stage - 1)
    dk, dv = resnet.aa_depths(mid, 0.2, 0.1, 8)
    per_unit = -9 * mid * dv + mid * (2 * dk + dv) + dv * dv + 2 * (2 * n - 1) * (dk // 8)
    total += kwargs["num_layers"][stage - 1] * per_unit
  return total


# docs/reference.md, "Relative positions and attention in ResNets": 224 px, 1000 classes.
ATTENTION_COUNTS = {"NL-ResNet-50": 27_651_112, "AA-ResNet-50": 25_106_270,
                    "AA-ResNet-101": 43_695_906}


@pytest.mark.parametrize("name", sorted(ATTENTION_COUNTS))
def test_attention_resnet_parameter_counts(name):
  assert _attention_resnet_count(name) == ATTENTION_COUNTS[name]
  assert count_params(models.get_model(name, num_classes=1000)) == ATTENTION_COUNTS[name]


def test_attention_resnet_names_and_bad_fields():
  assert resnet.config_from_name("NL-ResNet-50")["nonlocal_units"] == ((3, 5),)
  assert resnet.config_from_name("NL-ResNet-101")["nonlocal_units"] == ((3, 22),)
  assert resnet.config_from_name("AA-ResNet-152")["aa_stages"] == (2, 3, 4)
  with pytest.raises(errors.ConfigError, match="depth 34"):
    resnet.config_from_name("AA-ResNet-34")
  x = jnp.zeros((1, 28, 28, 1))
  for bad, match in ((dict(nonlocal_units=((4, 1),)), "no unit 1 in stage 4"),
                     (dict(nonlocal_units=((2, 3),)), "no unit 3 in stage 2"),
                     (dict(aa_stages=(0,)), "stage 0 does not exist"),
                     (dict(aa_stages=(2,), aa_value_fraction=1.5), "aa_value_fraction"),
                     (dict(aa_stages=(2,), aa_value_fraction=0.9), "leaves no convolutional")):
    m = models.get_model("BiT-R26x1", num_classes=10, **SMALL, **bad)
    with pytest.raises(errors.ConfigError, match=match):
      jax.eval_shape(lambda m=m: m.init(jax.random.PRNGKey(0), x))


def test_aa_relative_tables_resize_at_another_image_size(tmp_path, random_variables):
  from vit_jax import npz, pretrained  # pylint: disable=import-outside-toplevel
  kw = dict(num_classes=10, **SMALL, aa_stages=(2,), aa_heads=2, nonlocal_units=((3, 1),))
  m28 = models.get_model("BiT-R26x1", **kw)
  params = jax.device_get(random_variables(m28, jnp.zeros((1, 28, 28, 1)))["params"])
  assert params["block2"]["unit1"]["attn2"]["rel_height"].shape == (27, 3)  # 14x14 after stride
  npz.save_npz(params, str(tmp_path / "w.npz"))
  init = jax.device_get(random_variables(models.get_model("BiT-R26x1", **kw),
                                         jnp.zeros((1, 44, 44, 1)))["params"])
  loaded = pretrained.load_into(str(tmp_path / "w.npz"), init, model="BiT-R26x1")
  for unit in ("unit1", "unit2"):
    assert loaded["block2"][unit]["attn2"]["rel_height"].shape == (43, 3)  # 22x22
    assert loaded["block2"][unit]["attn2"]["rel_width"].shape == (43, 3)
  np.testing.assert_array_equal(loaded["block3"]["nonlocal1"]["theta"]["kernel"],
                                params["block3"]["nonlocal1"]["theta"]["kernel"])
