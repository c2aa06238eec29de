"""Tests for vit_jax/checkpoint.py: published .npz import/export and orbax training checkpoints.

The .npz files are built here with numpy from the key list in docs/reference.md (not from our
model), and the loaded model is checked against a numpy re-implementation of the ViT forward pass.
"""
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import checkpoint
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
  glob = checkpoint.load_npz(write_npz(tmp_path / "g.npz", published_params(GLOBAL)))
  per_class = checkpoint.load_npz(write_npz(tmp_path / "c.npz", published_params(PER_CLASS)))
  assert sorted(glob["Transformer"]["encoderblock_0"]) == sorted(GLOBAL)
  assert_trees_equal(per_class, glob)


def test_load_npz_squeezes_groupnorm(tmp_path):
  rng = np.random.default_rng(0)
  f = {"conv_root/kernel": rng.standard_normal((7, 7, 3, 8)).astype(np.float32),
       "gn_root/scale": rng.standard_normal((1, 1, 1, 8)).astype(np.float32),
       "block1/unit1/gn1/bias": rng.standard_normal((1, 1, 1, 8)).astype(np.float32)}
  p = checkpoint.load_npz(write_npz(tmp_path / "r.npz", f))
  assert p["conv_root"]["kernel"].shape == (7, 7, 3, 8)
  np.testing.assert_array_equal(p["gn_root"]["scale"], f["gn_root/scale"].reshape(8))
  np.testing.assert_array_equal(p["block1"]["unit1"]["gn1"]["bias"],
                                f["block1/unit1/gn1/bias"].reshape(8))


# --------------------------------------------------------------------------- load_pretrained.
def test_new_resolution_and_classes_match_numpy_reference(tmp_path):
  f = published_params(GLOBAL, image_size=16, pre_logits=True)
  model = make_model(num_classes=5)  # no pre_logits, 5 classes, 24x24 -> 6x6 grid
  init = init_params(model, 24)
  logs = []
  params = checkpoint.load_pretrained(write_npz(tmp_path / "g.npz", f), init, log=logs.append)

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
  params = checkpoint.load_pretrained(write_npz(tmp_path / "p.npz", f),
                                      init_params(model, 16))
  assert_trees_equal(params, checkpoint.load_npz(tmp_path / "p.npz"))

  glob = published_params(GLOBAL, image_size=16, pre_logits=True)
  x = images(16)
  rep_ref = reference_forward(glob, x, glob["Transformer/posembed_input/pos_embedding"], True)
  logits = apply(model, params, x)
  np.testing.assert_allclose(logits, rep_ref @ glob["head/kernel"] + glob["head/bias"],
                             rtol=1e-4, atol=1e-4)


def test_per_class_params_tree_is_accepted(tmp_path):
  model = make_model(num_classes=K, representation_size=R)
  init = init_params(model, 16)
  from_file = checkpoint.load_pretrained(
      write_npz(tmp_path / "g.npz", published_params(GLOBAL)), init)
  tree = {}  # a per-class params tree instead of a path
  for key, value in published_params(PER_CLASS).items():
    *path, leaf = key.split("/")
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  assert_trees_equal(checkpoint.load_pretrained(tree, init), from_file)


def test_head_reinit_rules(tmp_path):
  with_pre_logits = write_npz(tmp_path / "a.npz", published_params(pre_logits=True))
  plain_file = published_params(pre_logits=False)
  plain = write_npz(tmp_path / "b.npz", plain_file)
  init = init_params(make_model(num_classes=K), 16)
  load = lambda path, **kw: checkpoint.load_pretrained(path, init, **kw)["head"]["kernel"]
  # Same class count: kept, unless it sat on the dropped pre_logits or reinit_head=True.
  np.testing.assert_array_equal(load(plain), plain_file["head/kernel"])
  np.testing.assert_array_equal(load(with_pre_logits), init["head"]["kernel"])
  np.testing.assert_array_equal(load(plain, reinit_head=True), init["head"]["kernel"])
  np.testing.assert_array_equal(load(with_pre_logits, reinit_head=False),
                                published_params(pre_logits=True)["head/kernel"])
  # Another class count and reinit_head=False: a shape error, not a silent re-init.
  with pytest.raises(ValueError, match=r"mis-shaped: head/kernel: checkpoint \(32, 10\)"):
    checkpoint.load_pretrained(plain, init_params(make_model(num_classes=5), 16),
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
  with pytest.raises(ValueError) as e:
    checkpoint.load_pretrained(path, init)
  msg = str(e.value)
  assert "missing from the checkpoint: Transformer/encoderblock_0/LayerNorm_2/bias" in msg
  assert "unexpected in the checkpoint: Transformer/encoderblock_1/Extra_0/kernel" in msg
  assert ("mis-shaped: Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel: "
          f"checkpoint ({D}, 48) vs model ({D}, {M})") in msg
  assert "strict=False" in msg


def test_strict_false_keeps_initialised_values(tmp_path):
  f, path = _broken(tmp_path)
  init = init_params(make_model(num_classes=K, representation_size=R), 16)
  logs = []
  params = checkpoint.load_pretrained(path, init, strict=False, log=logs.append)
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
  out = checkpoint.resize_posemb(grid, 16, prefix_old=0, prefix_new=0)  # 5x5 -> 4x4
  ref = bilinear_align_corners(grid[0].reshape(5, 5, 8).astype(np.float64), 4)
  np.testing.assert_allclose(out[0], ref.reshape(16, 8), atol=1e-6)
  with pytest.raises(ValueError, match="not a square"):
    checkpoint.resize_posemb(grid, 11, prefix_old=0, prefix_new=0)


# ------------------------------------------------------------------------------- save_npz.
def test_save_npz_round_trips_bitwise(tmp_path):
  src = write_npz(tmp_path / "src.npz", published_params(GLOBAL))
  params = checkpoint.load_npz(src)
  out = tmp_path / "out" / "vit.npz"
  checkpoint.save_npz(params, out)
  checkpoint.save_npz(params, out)  # overwriting an existing file works too
  assert os.listdir(tmp_path / "out") == ["vit.npz"]  # no temporary file left behind
  with np.load(src) as a, np.load(out) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
  assert_trees_equal(checkpoint.load_npz(out), params)


def test_scanned_model_load_and_save(tmp_path):
  f = published_params(GLOBAL, image_size=16, pre_logits=False)
  path = write_npz(tmp_path / "g.npz", f)
  unrolled_model, scanned_model = make_model(5), make_model(5, scan=True)
  unrolled = checkpoint.load_pretrained(path, init_params(unrolled_model, 24))
  scanned = checkpoint.load_pretrained(path, init_params(scanned_model, 24))
  stacked = scanned["Transformer"]["encoderblock"]["block"]
  assert stacked["MlpBlock_3"]["Dense_0"]["kernel"].shape == (L, D, M)
  np.testing.assert_array_equal(stacked["LayerNorm_2"]["scale"][1],
                                f["Transformer/encoderblock_1/LayerNorm_2/scale"])
  x = images(24)
  np.testing.assert_allclose(apply(scanned_model, scanned, x),
                             apply(unrolled_model, unrolled, x), atol=1e-5)

  checkpoint.save_npz(scanned, tmp_path / "scanned.npz")
  checkpoint.save_npz(unrolled, tmp_path / "unrolled.npz")
  with np.load(tmp_path / "scanned.npz") as a, np.load(tmp_path / "unrolled.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)


# -------------------------------------------------------------------- training checkpoints.
def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), names)


@jax.jit
def train_state(step=7):
  """{params, opt_state, step, rng} with a kernel sharded over 8 devices, after one update."""
  shard = NamedSharding(_mesh((8,), ("data",)), P("data"))
  params = {"dense": {"kernel": jax.lax.with_sharding_constraint(
                          jnp.arange(64.).reshape(16, 4) / 64, shard),
                      "bias": jnp.linspace(0., 1., 4)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.cos(p) + step, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32),
          "rng": jax.random.key(step)}


def _assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(unkey(x)), np.asarray(unkey(y)))


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_into_another_sharding(tmp_path, async_save):
  state = train_state()
  with checkpoint.TrainCheckpointer(tmp_path, async_save=async_save) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state)
    ckpt.wait()
    assert not ckpt.save(7, state, force=True)  # a step that exists is never overwritten
    assert not ckpt.save(6, state)  # nor, without force, is an older one saved
  mesh = _mesh((2, 4), ("a", "b"))
  kernel_sharding = NamedSharding(mesh, P("b", "a"))
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          state)
  abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                                               sharding=kernel_sharding)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 7
    restored = ckpt.restore(abstract)
  _assert_states_equal(restored, state)
  kernel = restored["params"]["dense"]["kernel"]
  assert kernel.sharding == kernel_sharding
  assert kernel.addressable_shards[0].data.shape == (4, 2)
  assert restored["opt_state"][1].hyperparams["learning_rate"] == np.float32(1e-3)


def test_max_to_keep(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 5):
      ckpt.save(step, train_state(step))
    assert ckpt.all_steps() == [3, 4]
    abstract = jax.eval_shape(train_state)
    assert int(ckpt.restore(abstract)["step"]) == 4
    assert int(ckpt.restore(abstract, step=3)["step"]) == 3
    with pytest.raises(FileNotFoundError, match=r"available steps: \[3, 4\]"):
      ckpt.restore(abstract, step=1)
  assert sorted(os.listdir(ckpt.directory)) == ["3", "4"]


def test_partial_tmp_directory_is_ignored(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  partial = ckpt.directory / "5.orbax-checkpoint-tmp-1700000000" / "default"
  partial.mkdir(parents=True)
  (partial / "half_written").write_text("x")
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 1
    ckpt.save(2, train_state(2))
    assert ckpt.all_steps() == [1, 2]
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 2


def test_shape_mismatch_names_the_key(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state())
    abstract = jax.eval_shape(train_state)
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((16, 5), jnp.float32)
    abstract["params"]["extra"] = jax.ShapeDtypeStruct((3,), jnp.float32)
    with pytest.raises(ValueError) as e:
      ckpt.restore(abstract)
  msg = str(e.value)
  assert "params/dense/kernel: checkpoint (16, 4) vs expected (16, 5)" in msg
  assert "missing from the checkpoint: params/extra (3,)" in msg


def test_restore_without_checkpoint(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      ckpt.restore(jax.eval_shape(train_state))


def test_max_to_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    checkpoint.TrainCheckpointer(tmp_path, max_to_keep=0)


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # `--workdir=workdirs/demo`, as the Makefile's demo passes it
  with checkpoint.TrainCheckpointer("workdirs/demo") as ckpt:
    ckpt.save(7, train_state(7))
    assert int(ckpt.restore(jax.eval_shape(train_state))["step"]) == 7
  assert os.listdir(tmp_path / "workdirs" / "demo" / "checkpoints") == ["7"]


# ------------------------------------------------ integrity: manifests, damage, full disks.
def _step_dir(ckpt, step):
  return os.path.join(str(ckpt.directory), str(step))


@pytest.mark.parametrize("async_save", [False, True])
def test_every_finished_save_gets_a_manifest(tmp_path, async_save):
  with checkpoint.TrainCheckpointer(tmp_path, async_save=async_save) as ckpt:
    ckpt.save(1, train_state(1))
    ckpt.wait()
    path = os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST)
    files = json.load(open(path))["files"]
  assert "default/_METADATA" in files and "_CHECKPOINT_METADATA" in files
  size, sha = files["default/_METADATA"]
  assert size == os.path.getsize(os.path.join(_step_dir(ckpt, 1), "default", "_METADATA"))
  assert len(sha) == 64
  assert checkpoint.verify_step(_step_dir(ckpt, 1)) is None
  assert not [f for f in os.listdir(_step_dir(ckpt, 1)) if ".tmp" in f]


def _biggest_data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
           if os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def test_verify_step_names_what_is_wrong(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  path = _biggest_data_file(step_dir)
  rel = os.path.relpath(path, step_dir)
  data = open(path, "rb").read()
  open(path, "wb").write(data[:10] + bytes([data[10] ^ 1]) + data[11:])
  assert checkpoint.verify_step(step_dir) == (f"{rel} does not match its checksum (bytes changed "
                                              "on disk)")
  open(path, "wb").write(data[:-5])
  assert checkpoint.verify_step(step_dir) == (f"{rel} has {len(data) - 5} bytes, {len(data)} were "
                                              "written (cut short or appended to)")
  os.remove(path)
  assert checkpoint.verify_step(step_dir) == f"{rel} is missing"
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))  # no manifest: structure only
  assert checkpoint.verify_step(step_dir) is None
  os.remove(os.path.join(step_dir, "default", "_METADATA"))
  assert "default/_METADATA is missing" in checkpoint.verify_step(step_dir)


def test_a_damaged_latest_step_is_moved_aside_and_the_previous_restored(tmp_path, caplog):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, train_state(step))
  for step in (2, 3):
    os.truncate(_biggest_data_file(_step_dir(ckpt, step)), 3)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.all_steps() == [1]
    _assert_states_equal(ckpt.restore(jax.eval_shape(train_state)), train_state(1))
    ckpt.save(2, train_state(2))  # the run goes on and saves step 2 again
    assert ckpt.all_steps() == [1, 2]
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert any(f"{_step_dir(ckpt, 3)} is damaged" in w and "step 1 instead" in w for w in warnings)
  assert sorted(os.listdir(ckpt.directory)) == ["1", "2", "2.corrupt", "3.corrupt"]


def test_an_explicitly_requested_damaged_step_is_an_error(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
    ckpt.save(2, train_state(2))
  os.remove(_biggest_data_file(_step_dir(ckpt, 1)))
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=r"checkpoints/1 is damaged: .* is missing\. Delete it"):
      ckpt.restore(jax.eval_shape(train_state), step=1)


def test_no_intact_checkpoint_is_an_error_naming_the_directories(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  open(os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST), "w").write("{")
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CorruptCheckpointError,
                       match=rf"No intact checkpoint .* step 1: {checkpoint.MANIFEST} is damaged\. "
                             rf".*rm -r {_step_dir(ckpt, 1)}"):
      ckpt.latest_step()


def test_unfinished_saves_of_a_killed_run_are_deleted(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  leftover = ckpt.directory / "2.orbax-checkpoint-tmp-1700000000" / "default"
  leftover.mkdir(parents=True)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1  # reading leaves it (it may be a running trainer's save)
    assert len(os.listdir(ckpt.directory)) == 2
    ckpt.save(2, train_state(2))
    assert sorted(os.listdir(ckpt.directory)) == ["1", "2"]


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
  import errno
  from etils import epath
  cls = type(epath.Path("/"))
  original = cls.write_text

  def full(self, *args, **kwargs):
    if "/2.orbax-checkpoint-tmp" in str(self):
      raise OSError(errno.ENOSPC, "No space left on device", str(self))
    return original(self, *args, **kwargs)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
    monkeypatch.setattr(cls, "write_text", full)
    with pytest.raises(checkpoint.DiskFullError,
                       match=r"The disk is full: saving the checkpoint of step 2 .* The previous "
                             r"checkpoint \(step 1\) is intact") as e:
      ckpt.save(2, train_state(2))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(cls, "write_text", original)
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    _assert_states_equal(ckpt.restore(jax.eval_shape(train_state)), train_state(1))


def test_disk_full_is_recognised_through_wrapping_errors():
  wrapped = ValueError('RESOURCE_EXHAUSTED: Failed writing "x": No space left on device '
                       "[os_error_code='28']")
  assert checkpoint._is_disk_full(wrapped)
  try:
    try:
      raise OSError(28, "disk")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert checkpoint._is_disk_full(outer)
  assert not checkpoint._is_disk_full(ValueError("shape mismatch"))


# ------------------------------------- manifests: per-process parts, off the training thread.
def test_save_returns_before_hashing_and_wait_waits_for_it(tmp_path, monkeypatch):
  """Issue 34, item 10: the manifest's hashing runs on a background thread; `save()` returns while
  it is blocked, `wait()` returns once it is done, with a manifest that verifies."""
  original, caller = checkpoint._sha256, threading.current_thread()
  started, release, on_caller = threading.Event(), threading.Event(), []

  def blocking_sha256(path):
    if threading.current_thread() is caller:
      on_caller.append(str(path))  # the old behaviour: hashing on the training thread
    else:
      started.set()
      assert release.wait(60)
    return original(path)
  monkeypatch.setattr(checkpoint, "_sha256", blocking_sha256)
  ckpt = checkpoint.TrainCheckpointer(tmp_path)
  try:
    assert ckpt.save(1, train_state(1))
    assert on_caller == [], "save() hashed the files on the caller's thread"
    assert started.wait(30), "no background thread hashed the files"
    manifest = os.path.join(_step_dir(ckpt, 1), checkpoint.MANIFEST)
    assert not os.path.exists(manifest)
    waiter = threading.Thread(target=ckpt.wait)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "wait() returned while the manifest was being written"
    release.set()
    waiter.join(60)
    assert not waiter.is_alive() and on_caller == []
    assert os.path.exists(manifest) and checkpoint.verify_step(_step_dir(ckpt, 1)) is None
  finally:
    release.set()
    ckpt.close()


PROCESS_1_FILES = ("default/array_metadatas/process_1", "default/ocdbt.process_1/manifest.ocdbt",
                   "default/ocdbt.process_1/d/88bc599dd9ce3186d5183d4280e99645")


def _two_process_step(tmp_path):
  """A step directory laid out as a 2-process save is (orbax 0.12.8; measured): a real
  1-process save, plus the files that process 1 writes in its own directories."""
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  for i, rel in enumerate(PROCESS_1_FILES):
    os.makedirs(os.path.dirname(os.path.join(step_dir, rel)), exist_ok=True)
    with open(os.path.join(step_dir, rel), "wb") as f:
      f.write(bytes(range(256)) * (i + 1))
  return step_dir


def _all_files(step_dir):
  return {os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir)
          for f in fs if not f.startswith("vit_jax_manifest")}


def test_each_process_hashes_and_lists_only_its_own_files(tmp_path, monkeypatch):
  """Issue 34, item 10: with 2 processes, each one's manifest part lists exactly the files it
  wrote (process 0: the shared metadata and its shards); verification splits along the parts."""
  step_dir = _two_process_step(tmp_path)
  hashed = {}
  original = checkpoint._sha256
  monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.setdefault(
      jax.process_index(), []).append(os.path.relpath(str(p), step_dir)) or original(p))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for p in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    checkpoint.write_manifest(step_dir)
  monkeypatch.undo()
  parts = {p: json.load(open(os.path.join(step_dir, name)))
           for p, name in ((0, checkpoint.MANIFEST), (1, "vit_jax_manifest.process1.json"))}
  everything = _all_files(step_dir)
  assert set(parts[1]["files"]) == set(PROCESS_1_FILES)
  assert set(parts[0]["files"]) == everything - set(PROCESS_1_FILES)
  assert "default/ocdbt.process_0/manifest.ocdbt" in parts[0]["files"]
  assert "_CHECKPOINT_METADATA" in parts[0]["files"]
  assert {p: set(h) for p, h in hashed.items()} == {p: set(parts[p]["files"]) for p in (0, 1)}
  assert [parts[p]["num_processes"] for p in (0, 1)] == [2, 2]
  assert not [f for f in os.listdir(step_dir) if ".tmp" in f]

  assert checkpoint.verify_step(step_dir) is None
  with open(os.path.join(step_dir, PROCESS_1_FILES[2]), "r+b") as f:
    f.write(b"\xff")
  problem = f"{PROCESS_1_FILES[2]} does not match its checksum (bytes changed on disk)"
  assert checkpoint.verify_step(step_dir) == problem  # one process checks every part
  assert checkpoint.verify_step(step_dir, share=(1, 2)) == problem  # process 1's share
  assert checkpoint.verify_step(step_dir, share=(0, 2)) is None  # not in process 0's share


def test_a_missing_manifest_part_falls_back_to_orbax_metadata(tmp_path):
  """A process killed between orbax's final rename and its manifest part: the parts written are
  checked, orbax's rename vouches for the rest (as for a step without any manifest)."""
  step_dir = _two_process_step(tmp_path)
  for p in (0, 1):
    checkpoint.write_manifest(step_dir, process_index=p, process_count=2)
  os.remove(os.path.join(step_dir, "vit_jax_manifest.process1.json"))
  assert checkpoint.verify_step(step_dir) is None
  assert checkpoint.verify_step(step_dir, share=(1, 2)) is None
  # Process 0's part missing: process 1's names the process count; its files are checked, and
  # orbax's metadata, which no part lists now.
  os.remove(os.path.join(step_dir, checkpoint.MANIFEST))
  checkpoint.write_manifest(step_dir, process_index=1, process_count=2)
  assert checkpoint.verify_step(step_dir) is None
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  assert checkpoint.verify_step(step_dir) == ("_CHECKPOINT_METADATA is missing (a half-written "
                                              "or half-copied directory)")
  assert checkpoint.verify_step(step_dir, share=(1, 2)) is None  # process 0's share to see
  os.truncate(os.path.join(step_dir, PROCESS_1_FILES[0]), 3)
  assert "has 3 bytes" in checkpoint.verify_step(step_dir, share=(1, 2))


def test_a_manifest_written_before_there_were_parts_still_verifies(tmp_path):
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, train_state(1))
  step_dir = _step_dir(ckpt, 1)
  path = os.path.join(step_dir, checkpoint.MANIFEST)
  files = json.load(open(path))["files"]
  with open(path, "w") as f:
    json.dump({"version": 1, "files": files}, f)  # the format of vit_jax before issue 34
  assert checkpoint.verify_step(step_dir) is None
  with checkpoint.TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 1
  os.truncate(_biggest_data_file(step_dir), 3)
  assert "has 3 bytes" in checkpoint.verify_step(step_dir)


def test_a_save_that_deletes_a_step_being_hashed_waits_for_it(tmp_path, monkeypatch):
  """max_to_keep=1: saving step 2 deletes step 1, so it waits for step 1's manifest first (else
  the hashing thread would read a directory being deleted)."""
  original = checkpoint._sha256

  def slow(path):
    time.sleep(0.05)
    return original(path)
  monkeypatch.setattr(checkpoint, "_sha256", slow)
  with checkpoint.TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, train_state(step))
  assert os.listdir(ckpt.directory) == ["3"]
  assert checkpoint.verify_step(_step_dir(ckpt, 3)) is None


def test_the_checkpoint_save_benchmark_runs(capsys):
  from benchmarks import checkpoint_save  # pylint: disable=g-import-not-at-top
  results = checkpoint_save.main(["--mib=2", "--rounds=1"])
  assert set(results) == set(checkpoint_save.CONTENDERS)
  assert results["ours"]["hash_s"] > 0 and results["orbax"]["bytes"] > 1 << 20
  assert "| ours_async |" in capsys.readouterr().out
