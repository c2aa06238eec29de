"""Tests for vit_jax/models/swin.py: sizes, window helpers against hand-derived values, parity with
Hugging Face's torch `SwinForImageClassification`."""
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import swin

# Swin-T: docs/reference.md, "Swin Transformer". S/B/L: what this implementation builds, equal to
# the HF torch models built from the same configs (test_counts_match_hf) and to the closed form
# below.
COUNTS = {"Swin-T": 28_288_354, "Swin-S": 49_606_258, "Swin-B": 87_768_224,
          "Swin-L": 196_532_476}
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, img_size=64)


def param_shapes(model, h=224, w=224):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, 3))))
  return shapes["params"]


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def flat_names(tree):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def closed_form_count(c, depths, heads, window=7, classes=1000, patch=4):
  """Parameters of a Swin, added up by hand from the architecture description."""
  n = patch * patch * 3 * c + c + 2 * c  # patch conv + bias, patch LN
  for i, (depth, h) in enumerate(zip(depths, heads)):
    d = c * 2 ** i
    block = (2 * 2 * d  # norm1, norm2
             + 4 * (d * d + d)  # q, k, v, out
             + (2 * window - 1) ** 2 * h  # bias table
             + d * 4 * d + 4 * d + 4 * d * d + d)  # MLP
    n += depth * block
    if i < len(depths) - 1:
      n += 2 * 4 * d + 4 * d * 2 * d  # merging LN(4d), reduction (no bias)
  d = c * 2 ** (len(depths) - 1)
  return n + 2 * d + d * classes + classes


# ------------------------------------------------------------------ sizes and registry.
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
  assert count(param_shapes(models.get_model(name))) == COUNTS[name]
  dim, depths, heads, _ = swin.VARIANTS[name[-1]]
  assert closed_form_count(dim, depths, heads) == COUNTS[name]


def test_counts_match_hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for name, want in COUNTS.items():
    dim, depths, heads, _ = swin.VARIANTS[name[-1]]
    cfg = transformers.SwinConfig(embed_dim=dim, depths=list(depths), num_heads=list(heads),
                                  window_size=7, image_size=224, num_labels=1000)
    with torch.device("meta"):
      hf = transformers.SwinForImageClassification(cfg)
    assert sum(p.numel() for p in hf.parameters()) == want, name


def test_tree_names_and_shapes():
  flat = {k: v.shape for k, v in flat_names(param_shapes(models.get_model("Swin-T"))).items()}
  assert flat["patch_embed/proj/kernel"] == (4, 4, 3, 96)
  assert flat["patch_embed/norm/scale"] == (96,)
  blk = "layers_2/blocks_5/"
  assert flat[blk + "attn/relative_position_bias_table"] == (169, 12)
  assert flat[blk + "attn/query/kernel"] == (384, 12, 32)
  assert flat[blk + "attn/query/bias"] == (12, 32)
  assert flat[blk + "attn/out/kernel"] == (12, 32, 384)
  assert flat[blk + "mlp/Dense_0/kernel"] == (384, 1536)
  assert flat[blk + "norm1/bias"] == (384,) and flat[blk + "norm2/scale"] == (384,)
  assert flat["layers_0/downsample/norm/scale"] == (384,)
  assert flat["layers_0/downsample/reduction/kernel"] == (384, 192)
  assert "layers_0/downsample/reduction/bias" not in flat
  assert not any(k.startswith("layers_3/downsample") for k in flat)
  assert flat["norm/scale"] == (768,) and flat["head/kernel"] == (768, 1000)


def test_registry_options_and_errors():
  m = models.get_model("Swin-B", window_size=12, img_size=384, num_classes=10)
  assert (m.embed_dim, m.window_size, m.img_size, m.num_classes) == (128, 12, 384, 10)
  assert models.get_model("Swin-T").droppath_rate == 0.2
  with pytest.raises(ValueError, match="Swin-T"):
    models.get_model("Swin-X")
  with pytest.raises(ValueError, match="window_size"):
    models.get_model("Swin-T", windowsize=7)


def test_no_weight_decay_matches_reference_rule():
  # Reference rule: no decay for 1-D params, names ending in bias, and the bias tables.
  flat = flat_names(param_shapes(models.get_model("Swin-T")))
  want = {k for k, v in flat.items()
          if len(v.shape) == 1 or k.endswith("bias") or "relative_position_bias_table" in k}
  got = {k for k in flat if re.fullmatch(swin.NO_WEIGHT_DECAY, k)}
  assert got == want
  assert "layers_0/blocks_1/attn/query/bias" in got  # 2-D (H, d) but a bias
  assert "layers_0/blocks_1/attn/query/kernel" not in got
  assert "layers_0/downsample/reduction/kernel" not in got


# ------------------------------------------------------------------ window helpers.
def test_relative_position_index_window_2_by_hand():
  # tokens (0,0),(0,1),(1,0),(1,1); index = (dy + 1) * 3 + (dx + 1)
  np.testing.assert_array_equal(swin.relative_position_index(2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])


def test_relative_position_index_window_7():
  idx = swin.relative_position_index(7)
  assert idx.shape == (49, 49)
  assert idx.min() == 0 and idx.max() == 168
  assert len(np.unique(idx)) == 169
  np.testing.assert_array_equal(np.diag(idx), 84)
  assert idx[0, 48] == 0 and idx[48, 0] == 168  # (-6,-6) and (+6,+6)


def test_shifted_window_mask_by_hand():
  # 4x4 map, window 2, shift 1: regions per axis [0,2)->0, [2,3)->1, [3,4)->2; label 3*row+col:
  #   0 0 1 2 / 0 0 1 2 / 3 3 4 5 / 6 6 7 8. Windows (row-major) hold [0,0,0,0], [1,2,1,2],
  #   [3,3,6,6], [4,5,7,8].
  m = swin.shifted_window_mask(4, 4, 2, 1)
  x = -100.0
  want = np.array([
      np.zeros((4, 4)),
      [[0, x, 0, x], [x, 0, x, 0], [0, x, 0, x], [x, 0, x, 0]],
      [[0, 0, x, x], [0, 0, x, x], [x, x, 0, 0], [x, x, 0, 0]],
      np.where(np.eye(4), 0, x),
  ])
  np.testing.assert_array_equal(m, want)


def test_mask_at_swin_t_stage_1():
  m = swin.shifted_window_mask(56, 56, 7, 3)
  assert m.shape == (64, 49, 49)
  assert not m[:7].any() and not m[8:15].any()  # windows away from the bottom/right border
  assert set(np.unique(m)) == {0.0, -100.0}
  assert m[63].min() == -100.0 and m[7].min() == -100.0 and m[56].min() == -100.0


def test_partition_reverse_identity():
  x = np.random.RandomState(0).randn(2, 14, 21, 3).astype(np.float32)
  win = swin.window_partition(jnp.asarray(x), 7)
  assert win.shape == (2 * 2 * 3, 7, 7, 3)
  np.testing.assert_array_equal(win[1], x[0, 0:7, 7:14])  # second window of the first row
  np.testing.assert_array_equal(win[3], x[0, 7:14, 0:7])  # first window of the second row
  np.testing.assert_array_equal(win[6], x[1, 0:7, 0:7])  # batch-major
  np.testing.assert_array_equal(swin.window_reverse(win, 7, 14, 21), x)
  with pytest.raises(ValueError, match="multiple of window"):
    swin.window_partition(x, 4)


def test_merge_patches_order():
  x = (10 * np.arange(2)[:, None] + np.arange(2)[None, :]).astype(np.float32)  # x[r, c] = 10r + c
  out = swin.merge_patches(jnp.asarray(x)[None, :, :, None])
  np.testing.assert_array_equal(out[0, 0, 0], [0, 10, 1, 11])  # (0,0), (1,0), (0,1), (1,1)
  # Odd maps are zero-padded at the bottom/right: 3x3 -> 2x2.
  x = (10 * np.arange(3)[:, None] + np.arange(3)[None, :] + 1).astype(np.float32)
  out = swin.merge_patches(jnp.asarray(x)[None, :, :, None])
  assert out.shape == (1, 2, 2, 4)
  np.testing.assert_array_equal(out[0, 1, 1], [23, 0, 0, 0])
  np.testing.assert_array_equal(out[0, 0, 1], [3, 13, 0, 0])


def test_stage_windows_clamp():
  assert swin.stage_windows((224, 224), 4, 4, 7) == (7, 7, 7, 7)
  assert swin.stage_windows((192, 192), 4, 4, 7) == (7, 7, 7, 6)  # stage 4 is 6x6
  assert swin.stage_windows((28, 28), 4, 4, 7) == (7, 4, 2, 1)  # 7, 4, 2, 1
  assert swin.stage_windows((384, 384), 4, 4, 12) == (12, 12, 12, 12)
  flat = flat_names(param_shapes(models.get_model("Swin-T", img_size=192), 192, 192))
  assert flat["layers_3/blocks_0/attn/relative_position_bias_table"].shape == (121, 24)
  assert flat["layers_2/blocks_0/attn/relative_position_bias_table"].shape == (169, 12)


def test_shift_is_off_when_the_map_fits_one_window():
  rng = np.random.RandomState(0)
  x = rng.randn(1, 4, 4, 8).astype(np.float32)
  plain, shifted = swin.SwinBlock(2, 4), swin.SwinBlock(2, 4, shifted=True)
  shapes = jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(1), x, True))
  params = jax.tree_util.tree_map(lambda s: rng.randn(*s.shape).astype(np.float32), shapes)
  run = lambda m, x: jax.jit(lambda p, x: m.apply(p, x, True))(params, x)
  np.testing.assert_array_equal(run(plain, x), run(shifted, x))
  x = rng.randn(1, 8, 8, 8).astype(np.float32)
  assert np.abs(run(plain, x) - run(shifted, x)).max() > 1e-3


def test_droppath_linspace_over_all_blocks():
  model = models.get_model("Swin-T")
  rates = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, swin.SwinBlock) and context.method_name == "__call__":
      rates.append(context.module.droppath_rate)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    param_shapes(model)
  np.testing.assert_allclose(rates, np.linspace(0, 0.2, 12))


# ------------------------------------------------------------------ model behaviour.
def random_params(model, seed=0):
  """Random params of the model's shapes (cheaper than compiling `init`)."""
  rng = np.random.RandomState(seed)
  def fill(path, s):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.randn(*s.shape), jnp.float32)
    std = 1.0 if name == "relative_position_bias_table" else 0.1
    return jnp.asarray(std * rng.randn(*s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, param_shapes(model, 64, 64))


@pytest.fixture(scope="module")
def tiny():
  model = swin.SwinTransformer(num_classes=10, droppath_rate=0.5, **TINY)
  return model, {"params": random_params(model)}, jax.jit(model.apply, static_argnames="train")


def test_tiny_forward_train_and_features(tiny):
  model, params, apply = tiny
  x = np.random.RandomState(1).randn(4, 50, 70, 3).astype(np.float32)  # pads in the stages
  y = apply(params, x)
  assert y.shape == (4, 10) and y.dtype == jnp.float32
  a = apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  b = apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(y)).max() > 1e-4
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply(params, x, train=True))  # no "dropout" rng
  features = swin.SwinTransformer(num_classes=0, **TINY)
  no_head = {"params": {k: v for k, v in params["params"].items() if k != "head"}}
  f = jax.jit(features.apply)(no_head, x)
  assert f.shape == (4, 32)
  head = params["params"]["head"]
  np.testing.assert_allclose(f @ head["kernel"] + head["bias"], y, atol=1e-5)


def test_bfloat16(tiny):
  model, params, apply = tiny
  m16 = swin.SwinTransformer(num_classes=10, dtype=jnp.bfloat16, **TINY)
  x = np.random.RandomState(1).randn(4, 50, 70, 3).astype(np.float32)
  y16, y32 = jax.jit(m16.apply)(params, x), apply(params, x)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, atol=0.1 * float(np.abs(y32).max()))


def test_bad_input_rank(tiny):
  model, params, _ = tiny
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    model.apply(params, jnp.zeros((64, 64, 3)))


# ------------------------------------------------------------------ window resize.
def test_resize_bias_table_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  table = np.random.RandomState(0).randn(169, 3).astype(np.float32)
  for window in (12, 6, 7):
    got = swin.resize_relative_position_bias_table(table, window)
    s = 2 * window - 1
    want = torch.nn.functional.interpolate(
        torch.from_numpy(table).T.reshape(1, 3, 13, 13), size=(s, s), mode="bicubic",
        align_corners=False).reshape(3, s * s).T.numpy()
    assert got.shape == (s * s, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_resize_bias_tables_tree(tiny):
  _, params, _ = tiny
  target = swin.SwinTransformer(num_classes=10, **{**TINY, "window_size": 6, "img_size": 96})
  target_shapes = param_shapes(target, 96, 96)
  new = swin.resize_bias_tables(params["params"], target_shapes)
  assert jax.tree_util.tree_map(np.shape, new) == jax.tree_util.tree_map(
      lambda s: s.shape, target_shapes)
  key = ("layers_0", "blocks_1", "attn", "relative_position_bias_table")
  old = params["params"]
  for k in key:
    old = old[k]
  np.testing.assert_allclose(flax.traverse_util.flatten_dict(new)[key],
                             swin.resize_relative_position_bias_table(old, 6))
  assert jax.jit(target.apply)({"params": new}, jnp.zeros((1, 96, 96, 3))).shape == (1, 10)


# ------------------------------------------------------------------ parity with HF torch.
def _hf_model(seed, **kw):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.SwinConfig(**kw, attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.SwinForImageClassification(cfg).eval()
  with torch.no_grad():  # random weights of a useful scale (HF zero-inits the bias tables)
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif "relative_position_bias_table" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return model


def _check_parity(hf, ours, sizes, batch, atol):
  """Max-abs logit difference per input size; all must be below `atol`."""
  torch = pytest.importorskip("torch")
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = swin.from_hf_state_dict(sd)
  expected = jax.eval_shape(lambda: ours.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(
      lambda s: s.shape, expected["params"])
  apply = jax.jit(lambda p, x: ours.apply({"params": p}, x))
  errors = {}
  for h, w in sizes:
    x = np.random.RandomState(h * w).randn(batch, 3, h, w).astype(np.float32)
    with torch.no_grad():
      want = hf(torch.from_numpy(x)).logits.numpy()
    got = np.asarray(apply(params, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert np.abs(want).max() > 0.5  # logits of order 1, so `atol` is a meaningful bound
    errors[(h, w)] = float(np.abs(got - want).max())
  assert max(errors.values()) < atol, errors
  return errors


def test_parity_small_config():
  # 64: windows 4 with shifts in both stages; 28x44: 7x11 padded to 8x12 with a shift, then 4x6
  # padded to 4x8 where the shift is switched off (the map is no taller than the window).
  hf = _hf_model(0, image_size=64, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                 num_labels=10)
  ours = swin.SwinTransformer(num_classes=10, **TINY)
  # Measured max-abs differences 2.4e-7 (64x64) and 4.8e-7 (28x44), float32 on CPU.
  _check_parity(hf, ours, [(64, 64), (28, 44)], batch=2, atol=2e-6)


def test_legacy_hf_names():
  hf = _hf_model(0, image_size=32, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=2,
                 num_labels=3)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  # Names of older Hub checkpoints (transformers' conversion_mapping.py, "swin").
  legacy = (("attention.relative_position_bias.", "attention.self."),
            ("attention.q_proj", "attention.self.query"),
            ("attention.k_proj", "attention.self.key"),
            ("attention.v_proj", "attention.self.value"),
            ("attention.o_proj", "attention.output.dense"),
            ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))
  old = {}
  for k, v in sd.items():
    for new_name, old_name in legacy:
      k = k.replace(new_name, old_name)
    old[k] = v
  old["swin.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = np.zeros(16)
  assert "swin.encoder.layers.1.blocks.1.output.dense.weight" in old
  a, b = swin.from_hf_state_dict(sd), swin.from_hf_state_dict(old)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  with pytest.raises(ValueError, match="Unconverted"):
    swin.from_hf_state_dict({**sd, "swin.embeddings.position_embeddings": np.zeros((1, 64, 8))})
  del sd["swin.layernorm.weight"]
  with pytest.raises(ValueError, match="swin.layernorm|'layernorm.weight'"):
    swin.from_hf_state_dict(sd)


@pytest.mark.slow
def test_parity_swin_t():
  hf = _hf_model(0, image_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                 window_size=7, num_labels=1000)
  # 200x256: maps 50x64, 25x32, 13x16, 7x8, none a multiple of 7; stage 4 fits one window row.
  # Measured max-abs differences 3.6e-6 (224x224) and 3.3e-6 (200x256), float32 on CPU, logits
  # up to ~3 in size; other seeds gave at most 3.6e-6 too.
  errors = _check_parity(hf, models.get_model("Swin-T"), [(224, 224), (200, 256)], batch=1,
                         atol=1e-5)
  print("Swin-T parity max-abs errors:", errors)
