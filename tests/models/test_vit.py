"""Tests for vit_jax/models/vit.py and the registry."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import models
from vit_jax.models import layers, vit

# docs/reference.md, "ViT configurations and parameter counts": 224 px, 1000-class head.
PUBLISHED_COUNTS = {
    "ViT-Ti/16": 5_717_416, "ViT-S/16": 22_050_664, "ViT-B/16": 86_567_656,
    "ViT-B/32": 88_224_232, "ViT-L/16": 304_326_632, "ViT-L/32": 306_535_400,
    "ViT-H/14": 632_045_800, "ViT-B/8": 86_576_872, "ViT-S/32": 22_878_952,
}


def count_params(model, size=224, channels=3):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels))))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
  assert count_params(models.get_model(name, num_classes=1000)) == PUBLISHED_COUNTS[name]


def test_b16_with_21k_head_and_pre_logits():
  m = models.get_model("ViT-B/16", num_classes=21843, representation_size=768)
  assert count_params(m) == 103_186_515


def test_published_tree_keys():
  m = models.get_model("ViT-Ti/16", num_classes=10, num_layers=2)
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  flat = {"/".join(k): v.shape for k, v in
          flax.traverse_util.flatten_dict(shapes["params"]).items()}
  block = "Transformer/encoderblock_1/"
  expected = {
      "embedding/kernel": (16, 16, 3, 192), "embedding/bias": (192,), "cls": (1, 1, 192),
      "Transformer/posembed_input/pos_embedding": (1, 5, 192),
      block + "LayerNorm_0/scale": (192,),
      block + "MultiHeadDotProductAttention_1/query/kernel": (192, 3, 64),
      block + "MultiHeadDotProductAttention_1/value/bias": (3, 64),
      block + "MultiHeadDotProductAttention_1/out/kernel": (3, 64, 192),
      block + "LayerNorm_2/bias": (192,),
      block + "MlpBlock_3/Dense_0/kernel": (192, 768),
      block + "MlpBlock_3/Dense_1/kernel": (768, 192),
      "Transformer/encoder_norm/scale": (192,), "head/kernel": (192, 10), "head/bias": (10,),
  }
  for k, shape in expected.items():
    assert flat[k] == shape, k
  assert len(flat) == 6 + 2 * 16 + 2  # top level + 16 leaves per block + encoder_norm


def test_unknown_name_lists_known():
  with pytest.raises(ValueError, match=r"Unknown model name 'ViT-X'.*ViT-B/<patch>"):
    models.get_model("ViT-X")
  with pytest.raises(ValueError, match=r"Unknown ViT variant 'Q'.*Ti, S, B"):
    models.get_model("ViT-Q/16")
  with pytest.raises(ValueError, match=r"Unknown option\(s\) \['num_clases'\].*num_classes"):
    models.get_model("ViT-B/16", num_clases=10)


@pytest.fixture(scope="module")
def small():
  """A 3-layer ViT-Ti/8 on 32x32 images with non-trivial weights."""
  model = models.get_model("ViT-Ti/8", num_classes=10, num_layers=3)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  # Heads init to zero: perturb every leaf so logits depend on every parameter.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params, x


def test_scan_matches_unrolled_and_converts_back(small):
  model, params, x = small
  scanned = model.clone(scan=True)
  ref = model.apply({"params": params}, x)
  sparams = vit.unrolled_to_scan(params)
  assert sparams["Transformer"]["encoderblock"]["block"]["LayerNorm_0"]["scale"].shape == (3, 192)
  # The scanned model's own init has the same tree as the converted params.
  init_shapes = jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(0), x)["params"])
  assert (jax.tree_util.tree_structure(init_shapes) == jax.tree_util.tree_structure(sparams))
  np.testing.assert_allclose(scanned.apply({"params": sparams}, x), ref, atol=2e-5, rtol=1e-5)
  back = vit.scan_to_unrolled(sparams)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_matches_plain_logits_and_grads(small, scan):
  model, params, x = small
  if scan:
    params = vit.unrolled_to_scan(params)
  plain = model.clone(scan=scan)
  remat = model.clone(scan=scan, remat_policy="nothing_saveable")
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)
  np.testing.assert_allclose(remat.apply({"params": params}, x),
                             plain.apply({"params": params}, x), atol=1e-6)
  g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)


def test_unknown_remat_policy(small):
  model, params, x = small
  with pytest.raises(ValueError, match="Unknown remat_policy 'fast'.*dots_saveable"):
    model.clone(remat_policy="fast").apply({"params": params}, x)


def test_bfloat16_compute_float32_params(small):
  model, params, x = small
  bf = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf.init(jax.random.PRNGKey(0), x)["params"])
  assert {l.dtype for l in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  ref = model.apply({"params": params}, x)
  out = bf.apply({"params": params}, x)
  assert out.dtype == jnp.float32
  # bfloat16 has an 8-bit mantissa: ~3 significant digits through 3 blocks.
  scale = float(jnp.abs(ref).max())
  assert float(jnp.abs(out - ref).max()) < 0.05 * scale
  assert float(jnp.abs(out - ref).max()) > 0  # it really computed in bfloat16


def test_attention_weights_and_tokens_are_exposed(small):
  model, params, x = small
  logits, state = model.apply({"params": params}, x, mutable=["intermediates"])
  inter = state["intermediates"]["Transformer"]
  w = inter["encoderblock_2"]["MultiHeadDotProductAttention_1"]["attention_weights"][0]
  assert w.shape == (2, 3, 17, 17)  # (B, H, 1 + 4*4 tokens, ...)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  assert inter["encoderblock_0"]["tokens"][0].shape == (2, 17, 192)
  # The explicit path (taken when weights are requested) equals the fused path.
  np.testing.assert_allclose(logits, model.apply({"params": params}, x), atol=1e-5)


def test_attention_explicit_equals_fused_with_bias():
  att = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  bias = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 5, 5))
  v = att.init(jax.random.PRNGKey(2), x)
  fused = att.apply(v, x, bias=bias)
  explicit, st = att.apply(v, x, bias=bias, mutable=["intermediates"])
  np.testing.assert_allclose(fused, explicit, atol=1e-5)
  # Independent numpy computation.
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  q = np.einsum("bnd,dhk->bnhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bnd,dhk->bnhk", x, p["key"]["kernel"]) + p["key"]["bias"]
  vv = np.einsum("bnd,dhk->bnhk", x, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(4) + np.asarray(bias)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  y = np.einsum("bhqs,bshk->bqhk", w, vv)
  out = np.einsum("bqhk,hkd->bqd", y, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(fused, out, atol=1e-5)


@pytest.mark.parametrize("classifier", ["gap", "map"])
def test_classifiers_and_feature_extractor(classifier):
  m = models.get_model("ViT-Ti/8", num_classes=0, num_layers=1, classifier=classifier,
                       posemb="sincos2d", representation_size=64)
  x = jnp.ones((2, 32, 32, 3))
  v = m.init(jax.random.PRNGKey(0), x)
  assert "cls" not in v["params"] and "head" not in v["params"]
  assert "posembed_input" not in v["params"]["Transformer"]
  assert ("MAPHead_0" in v["params"]) == (classifier == "map")
  out = m.apply(v, x)
  assert out.shape == (2, 64)
  # The representation layer: tanh of a Dense layer on the pooled tokens (the same model without
  # it returns those).
  rest = {k: p for k, p in v["params"].items() if k != "pre_logits"}
  pooled = np.asarray(m.clone(representation_size=None).apply({"params": rest}, x), np.float64)
  pre = v["params"]["pre_logits"]
  np.testing.assert_allclose(out, np.tanh(pooled @ pre["kernel"] + pre["bias"]), atol=1e-5)


def test_sincos_posemb_values():
  pe = np.asarray(layers.posemb_sincos_2d(2, 3, 8))[0]
  assert pe.shape == (6, 8)
  # Token (row 1, col 2): x-part uses col 2, y-part row 1; omega = [1, 1e-4] for width/4 = 2.
  omega = np.array([1.0, 1e-4])
  expected = np.concatenate([np.sin(2 * omega), np.cos(2 * omega),
                             np.sin(1 * omega), np.cos(1 * omega)])
  np.testing.assert_allclose(pe[5], expected, atol=1e-6)


def test_stochastic_depth_and_dropout_train_mode(small):
  model, params, x = small
  m = model.clone(droppath_rate=0.5, dropout_rate=0.1)
  rng = {"dropout": jax.random.PRNGKey(0)}
  a = m.apply({"params": params}, x, train=True, rngs=rng)
  b = m.apply({"params": params}, x, train=True, rngs=rng)
  c = m.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-4
  # Eval mode ignores both.
  np.testing.assert_allclose(m.apply({"params": params}, x), model.apply({"params": params}, x))


def test_droppath_rate_zero_is_identity_and_scales_survivors():
  dp = layers.DropPath(0.5)
  x = jnp.ones((1000, 3))
  y = dp.apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, 0] != 0)
  assert 400 < kept.sum() < 600
  np.testing.assert_allclose(np.asarray(y)[kept], 2.0)
  np.testing.assert_array_equal(layers.DropPath(0.0).apply({}, x, False), x)


def test_scanned_train_mode_without_droppath_draws_no_randomness(small):
  """No stochastic depth and no dropout: a scanned train-mode pass needs no 'dropout' rng and
  equals eval mode (a traced zero rate once drew masks in every layer, costing ~30% of a step)."""
  model, params, x = small
  scanned = model.clone(scan=True)
  sparams = vit.unrolled_to_scan(params)
  train = scanned.apply({"params": sparams}, x, train=True)  # raises if it asks for an rng
  np.testing.assert_allclose(train, scanned.apply({"params": sparams}, x), atol=1e-6)
  jaxpr = str(jax.make_jaxpr(lambda p: scanned.apply(
      {"params": p}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))(sparams))
  assert "random_bits" not in jaxpr and "threefry" not in jaxpr
  # With a rate, the scanned model does drop paths.
  with_dp = model.clone(scan=True, droppath_rate=0.5).apply(
      {"params": sparams}, x, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
  assert float(jnp.abs(with_dp - train).max()) > 1e-4


def test_patch_embed_equals_strided_conv():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 30, 29, 3))  # 30x29: VALID drops the rest
  conv = flax.linen.Conv(8, (7, 7), strides=(7, 7), padding="VALID")
  v = conv.init(jax.random.PRNGKey(1), x)
  v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # non-zero bias
  ours = layers.PatchEmbed(8, (7, 7)).apply(v, x)
  assert ours.shape == (2, 4, 4, 8)
  np.testing.assert_allclose(ours, conv.apply(v, x), atol=1e-5)


# ------------------------------------------------- relative positions: posemb relbias / rope2d.
def _first_layer_log_weights(model, variables, images):
  _, state = model.apply(variables, images, mutable=["intermediates"])
  w = state["intermediates"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  return np.log(np.asarray(w["attention_weights"][0], np.float64))  # (B, heads, N, N)


@pytest.mark.parametrize("posemb,relative", [("relbias", True), ("rope2d", True),
                                             ("learn", False), ("sincos2d", False)])
def test_relative_posembs_make_patch_logits_depend_on_offsets_only(random_variables, posemb,
                                                                   relative):
  """Content moved down by one patch row: with relative positions alone the first layer's
  logits between two patches move with it (compared within a query's row, which removes the
  softmax's normaliser); absolute embeddings break that."""
  m = models.get_model("ViT-Mu/7", num_classes=10, num_layers=1, hidden_size=32, mlp_dim=64,
                       num_heads=4, classifier="gap", posemb=posemb)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 35, 35, 1))  # a 5x5 grid of 7-px patches
  shifted = jnp.roll(x, 7, axis=1)  # patch (r, c) -> (r + 1, c); the last row wraps to the top
  variables = random_variables(m, x)
  a = np.arange(20)  # patches of rows 0-3, whose shifted copies are rows 1-4 (a + 5)
  la = _first_layer_log_weights(m, variables, x)[0][:, a][:, :, a]
  lb = _first_layer_log_weights(m, variables, shifted)[0][:, a + 5][:, :, a + 5]
  da, db = la - la[..., :1], lb - lb[..., :1]
  assert np.abs(da).max() > 1e-2  # the logits do vary
  if relative:
    np.testing.assert_allclose(da, db, atol=1e-4)
  else:
    assert np.abs(da - db).max() > 1e-3


def test_rope_turns_logits_into_functions_of_the_offset():
  grid, d = (3, 4), 8
  rng = np.random.default_rng(0)
  q0, k0 = rng.normal(size=(2, d))
  n = grid[0] * grid[1]
  q = jnp.asarray(np.broadcast_to(q0, (1, 1 + n, 1, d)))  # one class token in front
  k = jnp.asarray(np.broadcast_to(k0, (1, 1 + n, 1, d)))
  qr, kr = layers.rope_2d_axial(q, k, grid=grid, num_prefix_tokens=1)
  np.testing.assert_array_equal(qr[:, 0], q[:, 0])  # the class token is not rotated
  np.testing.assert_allclose(np.linalg.norm(qr, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
  logits = np.einsum("qd,kd->qk", np.asarray(qr[0, 1:, 0]), np.asarray(kr[0, 1:, 0]))
  pos = [(i // grid[1], i % grid[1]) for i in range(n)]
  by_offset = {}
  for i, (yi, xi) in enumerate(pos):
    for j, (yj, xj) in enumerate(pos):
      by_offset.setdefault((yj - yi, xj - xi), []).append(logits[i, j])
  assert len(by_offset) == (2 * grid[0] - 1) * (2 * grid[1] - 1)
  for values in by_offset.values():
    np.testing.assert_allclose(values, values[0], rtol=1e-5, atol=1e-5)
  distinct = {round(float(v[0]), 4) for v in by_offset.values()}
  assert len(distinct) > 10  # ... and not a constant: the offset matters
  # Half of the pairs turn with the column, half with the row (RoPE-ViT's axial order).
  angles = layers.rope_axial_angles(*grid, d)
  np.testing.assert_allclose(angles[:, :2] / angles[1, :2], np.outer([p[1] for p in pos], [1, 1]))


def test_relative_position_bias_reads_the_table_by_offset():
  mod = vit.RelativePositionBias(num_heads=2, grid=(2, 3), num_prefix_tokens=1)
  rng = np.random.default_rng(0)
  table = rng.normal(size=(3, 5, 2)).astype(np.float32)
  cls = rng.normal(size=(3, 2)).astype(np.float32)
  bias = np.asarray(mod.apply({"params": {"grid_bias": table, "cls_bias": cls}}))[0]
  assert bias.shape == (2, 7, 7)
  np.testing.assert_array_equal(bias[:, 0, 1:], np.broadcast_to(cls[0][:, None], (2, 6)))
  np.testing.assert_array_equal(bias[:, 1:, 0], np.broadcast_to(cls[1][:, None], (2, 6)))
  np.testing.assert_array_equal(bias[:, 0, 0], cls[2])
  for i in range(6):
    for j in range(6):  # query (yi, xi), key (yj, xj): table[yi - yj + 1, xi - xj + 2]
      (yi, xi), (yj, xj) = divmod(i, 3), divmod(j, 3)
      np.testing.assert_array_equal(bias[:, 1 + i, 1 + j], table[yi - yj + 1, xi - xj + 2])


# BEiT-B (Bao et al. 2022, model table: 86M) is ViT-B/16 without the absolute position embedding
# (197 x 768) plus, per layer, a (27 x 27 + 3) x 12 bias table; with rotary embeddings only the
# absolute embedding goes. docs/reference.md, "Relative positions and attention in ResNets".
RELATIVE_COUNTS = {"relbias": 86_567_656 - 197 * 768 + 12 * (27 * 27 + 3) * 12,
                   "rope2d": 86_567_656 - 197 * 768}


@pytest.mark.parametrize("posemb", sorted(RELATIVE_COUNTS))
def test_relative_posemb_parameter_counts(posemb):
  n = count_params(models.get_model("ViT-B/16", num_classes=1000, posemb=posemb))
  assert n == RELATIVE_COUNTS[posemb]
  assert n // 1_000_000 == 86  # BEiT-B's published 86M
  assert RELATIVE_COUNTS["relbias"] == 86_521_768


def test_rope_needs_head_dims_divisible_by_4():
  m = models.get_model("ViT-Mu/7", num_classes=10, num_layers=1, hidden_size=24, mlp_dim=16,
                       num_heads=4, posemb="rope2d")
  with pytest.raises(errors.ConfigError, match="divisible by 4"):
    jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))


@pytest.mark.parametrize("scan", [False, True])
def test_relbias_tables_resize_bicubically_at_another_image_size(tmp_path, random_variables,
                                                                 scan):
  from vit_jax import npz, pretrained  # pylint: disable=import-outside-toplevel
  kw = dict(num_classes=10, num_layers=2, hidden_size=32, mlp_dim=64, num_heads=4,
            posemb="relbias", scan=scan)
  m28 = models.get_model("ViT-Mu/7", **kw)
  params = random_variables(m28, jnp.zeros((1, 28, 28, 1)))["params"]
  # A table constant along the offsets stays that constant; another one changes shape only.
  key = ("Transformer", "encoderblock", "block") if scan else ("Transformer", "encoderblock_0")
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  table = flat[key + ("RelativePositionBias", "grid_bias")]
  flat[key + ("RelativePositionBias", "grid_bias")] = np.ones_like(table) * np.arange(
      table.shape[-1], dtype=table.dtype)
  params = flax.traverse_util.unflatten_dict(flat)
  npz.save_npz(params, str(tmp_path / "w.npz"))
  m42 = models.get_model("ViT-Mu/7", **kw)
  init42 = jax.device_get(random_variables(m42, jnp.zeros((1, 42, 42, 1)))["params"])
  loaded = pretrained.load_into(str(tmp_path / "w.npz"), init42, model="ViT-Mu/7")
  lflat = flax.traverse_util.flatten_dict(loaded)
  grid = lflat[key + ("RelativePositionBias", "grid_bias")]
  assert grid.shape[-3:] == (11, 11, 4)  # a 6x6 grid's offsets
  np.testing.assert_allclose(grid, np.ones_like(grid) * np.arange(4), atol=1e-5)
  np.testing.assert_array_equal(lflat[key + ("RelativePositionBias", "cls_bias")],
                                flat[key + ("RelativePositionBias", "cls_bias")])
  other = ("Transformer", "encoderblock", "block") if scan else ("Transformer", "encoderblock_1")
  assert lflat[other + ("RelativePositionBias", "grid_bias")].shape[-3:] == (11, 11, 4)
  same = pretrained.load_into(str(tmp_path / "w.npz"), jax.device_get(params), model="ViT-Mu/7")
  np.testing.assert_array_equal(
      flax.traverse_util.flatten_dict(same)[key + ("RelativePositionBias", "grid_bias")],
      flat[key + ("RelativePositionBias", "grid_bias")])
