"""Tests for vit_jax/npz.py: published .npz parameters read, adapted to a model and written.

The .npz files are built here with numpy from the key list in docs/reference.md (not from our
model), and the loaded model is checked against a numpy re-implementation of the ViT forward pass.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import errors
from vit_jax import npz
from vit_jax.models import vit

# A tiny ViT: width 32, 2 heads, MLP 64, 2 layers, patch 4, representation 32, 10 classes.
D, H, M, L, PATCH, R, K = 32, 2, 64, 2, 4, 32, 10
GLOBAL = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
PER_CLASS = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")


# ------------------------------------------------------------------------- published layout.
def published_params(numbering=GLOBAL, image_size=16, pre_logits=True, seed=0) -> dict:
  """Flat {'/'-joined name: float32 array} in the published layout; same values for any
  numbering with the same seed."""
  rng = np.random.default_rng(seed)
  w = lambda *shape, s=0.2: (rng.standard_normal(shape) * s).astype(np.float32)
  n = (image_size // PATCH) ** 2 + 1
  f = {"embedding/kernel": w(PATCH, PATCH, 3, D), "embedding/bias": w(D), "cls": w(1, 1, D),
       "Transformer/posembed_input/pos_embedding": w(1, n, D)}
  ln0, mha, ln1, mlp = numbering
  for i in range(L):
    b = f"Transformer/encoderblock_{i}/"
    for ln in (ln0, ln1):
      f[f"{b}{ln}/scale"], f[f"{b}{ln}/bias"] = 1 + w(D, s=0.1), w(D, s=0.1)
    for name in ("query", "key", "value"):
      f[f"{b}{mha}/{name}/kernel"], f[f"{b}{mha}/{name}/bias"] = w(D, H, D // H), w(H, D // H)
    f[f"{b}{mha}/out/kernel"], f[f"{b}{mha}/out/bias"] = w(H, D // H, D), w(D)
    f[f"{b}{mlp}/Dense_0/kernel"], f[f"{b}{mlp}/Dense_0/bias"] = w(D, M), w(M)
    f[f"{b}{mlp}/Dense_1/kernel"], f[f"{b}{mlp}/Dense_1/bias"] = w(M, D), w(D)
  f["Transformer/encoder_norm/scale"], f["Transformer/encoder_norm/bias"] = 1 + w(D, s=0.1), w(D)
  if pre_logits:
    f["pre_logits/kernel"], f["pre_logits/bias"] = w(D, R), w(R)
  f["head/kernel"], f["head/bias"] = w(R if pre_logits else D, K), w(K)
  return f


def write_npz(path, flat):
  np.savez(path, **flat)
  return str(path)


def bilinear_align_corners(grid, new):
  """(g, g, C) -> (new, new, C); output index i samples input coordinate i * (g-1) / (new-1)."""
  g = grid.shape[0]
  c = np.arange(new) * (g - 1) / (new - 1)
  i0 = np.floor(c).astype(int)
  i1 = np.minimum(i0 + 1, g - 1)
  t = c - i0
  rows = grid[i0] * (1 - t)[:, None, None] + grid[i1] * t[:, None, None]
  return rows[:, i0] * (1 - t)[None, :, None] + rows[:, i1] * t[None, :, None]


def _ln(x, f, prefix):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * f[prefix + "/scale"] + f[prefix + "/bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_forward(f, images, posemb, pre_logits):
  """Float64 ViT forward from the flat published (global-numbering) dict -> representation."""
  f = {k: v.astype(np.float64) for k, v in f.items()}
  b, s = images.shape[:2]
  g = s // PATCH
  x = images.astype(np.float64).reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, g * g, PATCH * PATCH * 3) @ f["embedding/kernel"].reshape(-1, D)
  x = x + f["embedding/bias"]
  x = np.concatenate([np.broadcast_to(f["cls"], (b, 1, D)), x], axis=1) + posemb
  for i in range(L):
    p = f"Transformer/encoderblock_{i}/"
    y = _ln(x, f, p + "LayerNorm_0")
    a = p + "MultiHeadDotProductAttention_1/"
    q, k, v = (np.einsum("bnd,dhk->bnhk", y, f[a + n + "/kernel"]) + f[a + n + "/bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(D // H)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", att, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, f[a + "out/kernel"]) + f[a + "out/bias"]
    y = _ln(x, f, p + "LayerNorm_2")
    m = p + "MlpBlock_3/"
    y = _gelu_tanh(y @ f[m + "Dense_0/kernel"] + f[m + "Dense_0/bias"])
    x = x + y @ f[m + "Dense_1/kernel"] + f[m + "Dense_1/bias"]
  x = _ln(x, f, "Transformer/encoder_norm")[:, 0]
  if pre_logits:
    x = np.tanh(x @ f["pre_logits/kernel"] + f["pre_logits/bias"])
  return x


def make_model(num_classes, representation_size=None, scan=False):
  return vit.VisionTransformer(num_classes=num_classes, patch_size=(PATCH, PATCH), hidden_size=D,
                               mlp_dim=M, num_heads=H, num_layers=L,
                               representation_size=representation_size, scan=scan)


def init_params(model, image_size):
  """Stands in for `model.init(...)["params"]` (compiling init takes seconds on CPU): the model's
  param tree, filled with random values."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3)))["params"]
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def apply(model, params, x):
  return jax.jit(model.apply)({"params": params}, x)


def images(image_size, seed=2):
  return np.random.default_rng(seed).standard_normal((2, image_size, image_size, 3)).astype(
      np.float32)


def flat(tree, prefix=""):
  """Nested dicts -> {'/'-joined name: numpy array}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------------- load_npz.
def test_load_npz_per_class_numbering_equals_global(tmp_path):
  glob = npz.load_npz(write_npz(tmp_path / "g.npz", published_params(GLOBAL)))
  per_class = npz.load_npz(write_npz(tmp_path / "c.npz", published_params(PER_CLASS)))
  assert sorted(glob["Transformer"]["encoderblock_0"]) == sorted(GLOBAL)
  assert_trees_equal(per_class, glob)


def test_load_npz_squeezes_groupnorm(tmp_path):
  rng = np.random.default_rng(0)
  f = {"conv_root/kernel": rng.standard_normal((7, 7, 3, 8)).astype(np.float32),
       "gn_root/scale": rng.standard_normal((1, 1, 1, 8)).astype(np.float32),
       "block1/unit1/gn1/bias": rng.standard_normal((1, 1, 1, 8)).astype(np.float32)}
  p = npz.load_npz(write_npz(tmp_path / "r.npz", f))
  assert p["conv_root"]["kernel"].shape == (7, 7, 3, 8)
  np.testing.assert_array_equal(p["gn_root"]["scale"], f["gn_root/scale"].reshape(8))
  np.testing.assert_array_equal(p["block1"]["unit1"]["gn1"]["bias"],
                                f["block1/unit1/gn1/bias"].reshape(8))


def test_a_damaged_or_missing_file_is_named(tmp_path):
  path = write_npz(tmp_path / "g.npz", published_params(GLOBAL))
  with open(path, "rb") as f:
    data = f.read()
  with open(tmp_path / "cut.npz", "wb") as f:
    f.write(data[:len(data) // 2])  # a download cut short
  with pytest.raises(errors.CheckpointError, match=r"cut\.npz cannot be read as an \.npz .* "
                                                   r"Download or export it again"):
    npz.load_npz(tmp_path / "cut.npz")
  np.savez(tmp_path / "empty.npz")
  with pytest.raises(errors.CheckpointError, match=r"empty\.npz (holds no arrays|cannot be read)"):
    npz.load_npz(tmp_path / "empty.npz")
  with pytest.raises(errors.MissingFileError, match=r"nothing\.npz does not exist"):
    npz.load_npz(tmp_path / "nothing.npz")


# --------------------------------------------------------------------------- load_pretrained.
def test_new_resolution_and_classes_match_numpy_reference(tmp_path):
  f = published_params(GLOBAL, image_size=16, pre_logits=True)
  model = make_model(num_classes=5)  # no pre_logits, 5 classes, 24x24 -> 6x6 grid
  init = init_params(model, 24)
  logs = []
  params = npz.load_pretrained(write_npz(tmp_path / "g.npz", f), init, log=logs.append)

  assert "pre_logits" not in params
  np.testing.assert_array_equal(params["head"]["kernel"], init["head"]["kernel"])
  assert params["head"]["kernel"].shape == (D, 5)
  pe_file = f["Transformer/posembed_input/pos_embedding"]
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe.shape == (1, 37, D)
  np.testing.assert_array_equal(pe[:, :1], pe_file[:, :1])  # the cls slot is kept
  pe_ref = bilinear_align_corners(pe_file[0, 1:].reshape(4, 4, D).astype(np.float64), 6)
  np.testing.assert_allclose(pe[0, 1:], pe_ref.reshape(36, D), rtol=0, atol=1e-6)
  assert any("head" in m for m in logs) and any("pre_logits" in m for m in logs)

  x = images(24)
  posemb = np.concatenate([pe_file[:, :1], pe_ref.reshape(1, 36, D)], axis=1)
  rep_ref = reference_forward(f, x, posemb, pre_logits=False)
  body = {k: v for k, v in params.items() if k != "head"}
  rep = apply(model.clone(num_classes=0), body, x)
  np.testing.assert_allclose(rep, rep_ref, rtol=1e-4, atol=1e-5)

  rng = np.random.default_rng(3)
  head = {"kernel": rng.standard_normal((D, 5)).astype(np.float32),
          "bias": rng.standard_normal(5).astype(np.float32)}
  logits = apply(model, {**params, "head": head}, x)
  np.testing.assert_allclose(logits, rep_ref @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("numbering", [GLOBAL, PER_CLASS], ids=["global", "per_class"])
def test_same_model_loads_everything(tmp_path, numbering):
  f = published_params(numbering, image_size=16, pre_logits=True)
  model = make_model(num_classes=K, representation_size=R)
  params = npz.load_pretrained(write_npz(tmp_path / "p.npz", f),
                                      init_params(model, 16))
  assert_trees_equal(params, npz.load_npz(tmp_path / "p.npz"))

  glob = published_params(GLOBAL, image_size=16, pre_logits=True)
  x = images(16)
  rep_ref = reference_forward(glob, x, glob["Transformer/posembed_input/pos_embedding"], True)
  logits = apply(model, params, x)
  np.testing.assert_allclose(logits, rep_ref @ glob["head/kernel"] + glob["head/bias"],
                             rtol=1e-4, atol=1e-4)


def test_per_class_params_tree_is_accepted(tmp_path):
  model = make_model(num_classes=K, representation_size=R)
  init = init_params(model, 16)
  from_file = npz.load_pretrained(
      write_npz(tmp_path / "g.npz", published_params(GLOBAL)), init)
  tree = {}  # a per-class params tree instead of a path
  for key, value in published_params(PER_CLASS).items():
    *path, leaf = key.split("/")
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  assert_trees_equal(npz.load_pretrained(tree, init), from_file)


def test_head_reinit_rules(tmp_path):
  with_pre_logits = write_npz(tmp_path / "a.npz", published_params(pre_logits=True))
  plain_file = published_params(pre_logits=False)
  plain = write_npz(tmp_path / "b.npz", plain_file)
  init = init_params(make_model(num_classes=K), 16)
  load = lambda path, **kw: npz.load_pretrained(path, init, **kw)["head"]["kernel"]
  # Same class count: kept, unless it sat on the dropped pre_logits or reinit_head=True.
  np.testing.assert_array_equal(load(plain), plain_file["head/kernel"])
  np.testing.assert_array_equal(load(with_pre_logits), init["head"]["kernel"])
  np.testing.assert_array_equal(load(plain, reinit_head=True), init["head"]["kernel"])
  np.testing.assert_array_equal(load(with_pre_logits, reinit_head=False),
                                published_params(pre_logits=True)["head/kernel"])
  # Another class count and reinit_head=False: a shape error, not a silent re-init.
  with pytest.raises(ValueError, match=r"mis-shaped: head/kernel: checkpoint \(32, 10\)"):
    npz.load_pretrained(plain, init_params(make_model(num_classes=5), 16),
                               reinit_head=False)


def _broken(tmp_path):
  f = published_params(GLOBAL, image_size=16, pre_logits=True)
  del f["Transformer/encoderblock_0/LayerNorm_2/bias"]
  f["Transformer/encoderblock_1/Extra_0/kernel"] = np.ones((3, 3), np.float32)
  f["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"] = np.ones((D, 48), np.float32)
  return f, write_npz(tmp_path / "broken.npz", f)


def test_mismatches_are_named_in_one_error(tmp_path):
  _, path = _broken(tmp_path)
  init = init_params(make_model(num_classes=K, representation_size=R), 16)
  with pytest.raises(errors.CheckpointError) as e:  # a ValueError too
    npz.load_pretrained(path, init)
  msg = str(e.value)
  assert isinstance(e.value, ValueError)
  assert msg.startswith(f"Checkpoint {path} does not match the model")
  assert "missing from the checkpoint: Transformer/encoderblock_0/LayerNorm_2/bias" in msg
  assert "unexpected in the checkpoint: Transformer/encoderblock_1/Extra_0/kernel" in msg
  assert ("mis-shaped: Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel: "
          f"checkpoint ({D}, 48) vs model ({D}, {M})") in msg
  assert "strict=False" in msg


def test_strict_false_keeps_initialised_values(tmp_path):
  f, path = _broken(tmp_path)
  init = init_params(make_model(num_classes=K, representation_size=R), 16)
  logs = []
  params = npz.load_pretrained(path, init, strict=False, log=logs.append)
  blocks = params["Transformer"]
  np.testing.assert_array_equal(blocks["encoderblock_0"]["LayerNorm_2"]["bias"],
                                init["Transformer"]["encoderblock_0"]["LayerNorm_2"]["bias"])
  np.testing.assert_array_equal(
      blocks["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"],
      init["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"])
  assert "Extra_0" not in blocks["encoderblock_1"]
  np.testing.assert_array_equal(blocks["encoderblock_0"]["LayerNorm_2"]["scale"],
                                f["Transformer/encoderblock_0/LayerNorm_2/scale"])
  assert jax.tree.structure(params) == jax.tree.structure(init)
  assert any("Extra_0" in m and "LayerNorm_2/bias" in m for m in logs)


def test_resize_posemb_without_prefix_and_downsizing():
  grid = np.random.default_rng(0).standard_normal((1, 25, 8)).astype(np.float32)
  out = npz.resize_posemb(grid, 16, prefix_old=0, prefix_new=0)  # 5x5 -> 4x4
  ref = bilinear_align_corners(grid[0].reshape(5, 5, 8).astype(np.float64), 4)
  np.testing.assert_allclose(out[0], ref.reshape(16, 8), atol=1e-6)
  with pytest.raises(errors.CheckpointError, match="not a square"):
    npz.resize_posemb(grid, 11, prefix_old=0, prefix_new=0)


def test_a_deit_position_embedding_keeps_both_prefix_rows():
  """[cls, dist, 4x4 grid] -> [cls, dist, 6x6 grid]: the two prefix rows kept, the grid alone
  resized (bilinear, corner to corner)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  deit = lambda size: jax.tree.map(np.asarray, models.get_model(
      "DeiT-Ti/16-distilled", num_classes=3, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16,
      patch_size=(4, 4)).init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"])
  small, big = deit(16), deit(24)
  posemb = small["Transformer"]["posembed_input"]["pos_embedding"]  # (1, 2 + 16, 8)
  params = npz.load_pretrained(small, big, log=lambda _: None)
  out = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert out.shape == (1, 2 + 36, 8)
  np.testing.assert_array_equal(out[:, :2], posemb[:, :2])
  ref = bilinear_align_corners(posemb[0, 2:].reshape(4, 4, 8).astype(np.float64), 6)
  np.testing.assert_allclose(out[0, 2:], ref.reshape(36, 8), atol=1e-6)


# ------------------------------------------------------------------------------- save_npz.
def test_save_npz_round_trips_bitwise(tmp_path):
  src = write_npz(tmp_path / "src.npz", published_params(GLOBAL))
  params = npz.load_npz(src)
  out = tmp_path / "out" / "vit.npz"
  npz.save_npz(params, out)
  npz.save_npz(params, out)  # overwriting an existing file works too
  assert os.listdir(tmp_path / "out") == ["vit.npz"]  # no temporary file left behind
  with np.load(src) as a, np.load(out) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  assert_trees_equal(npz.load_npz(out), params)


def test_scanned_model_load_and_save(tmp_path):
  f = published_params(GLOBAL, image_size=16, pre_logits=False)
  path = write_npz(tmp_path / "g.npz", f)
  unrolled_model, scanned_model = make_model(5), make_model(5, scan=True)
  unrolled = npz.load_pretrained(path, init_params(unrolled_model, 24))
  scanned = npz.load_pretrained(path, init_params(scanned_model, 24))
  stacked = scanned["Transformer"]["encoderblock"]["block"]
  assert stacked["MlpBlock_3"]["Dense_0"]["kernel"].shape == (L, D, M)
  np.testing.assert_array_equal(stacked["LayerNorm_2"]["scale"][1],
                                f["Transformer/encoderblock_1/LayerNorm_2/scale"])
  x = images(24)
  np.testing.assert_allclose(apply(scanned_model, scanned, x),
                             apply(unrolled_model, unrolled, x), atol=1e-5)

  npz.save_npz(scanned, tmp_path / "scanned.npz")
  npz.save_npz(unrolled, tmp_path / "unrolled.npz")
  with np.load(tmp_path / "scanned.npz") as a, np.load(tmp_path / "unrolled.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)
