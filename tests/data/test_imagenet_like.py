"""ImageNet-scale input: decode-and-crop of JPEGs, resize_small, and a TFDS data set built from
local files (which catches TFDS dependencies missing from setup.py)."""
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.data import preprocess
from vit_jax.data import sources

TRAIN_PP = "decode|inception_crop(32)|flip_lr"
# The fused op decodes the same window and samples the same points: with full-resolution chroma
# (4:4:4, and grayscale) the same pixels up to float rounding. With 4:2:0 chroma (most photos)
# libjpeg upsamples the chroma at the window's border rows and columns from the window alone, so
# pixels there differ by some levels (measured up to ~18 of 255).
FLOAT_ATOL = 1e-2


def _photo(h, w, c=3, seed=0):
  """A smooth image plus noise (JPEG-friendly, unlike pure noise)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (1, h // 8 + 2, w // 8 + 2, c)).astype(np.float32)
  img = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
  return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _jpeg(h, w, c=3, seed=0, chroma_420=False) -> bytes:
  return tf.io.encode_jpeg(_photo(h, w, c, seed), quality=90,
                           chroma_downsampling=chroma_420).numpy()


def _u(ops, n, seed=0):
  return np.random.default_rng(seed).random((n, preprocess.num_random(ops)), dtype=np.float32)


def _unfused(pp, channels, monkeypatch):
  with monkeypatch.context() as m:
    m.setattr(preprocess, "FUSE_DECODE_CROP", False)
    return preprocess.parse(pp, channels=channels)


def _one(ops, encoded: bytes, u) -> np.ndarray:
  return preprocess.apply(ops, tf.constant([encoded]), tf.constant(u[None])).numpy()[0]


# ------------------------------------------------------------------------- decode-and-crop.
def test_parse_fuses_decode_with_the_crop_that_follows(monkeypatch):
  names = lambda pp: [op.name for op in preprocess.parse(pp, channels=3)]
  assert names("decode|inception_crop(224)|flip_lr") == ["decode_and_crop", "flip_lr"]
  assert names("decode|random_resized_crop(224)") == ["decode_and_crop"]
  assert names("decode|resize(256)|inception_crop(224)") == ["decode", "resize", "inception_crop"]
  assert names("inception_crop(224)") == ["inception_crop"]
  assert [op.name for op in _unfused("decode|inception_crop(224)", 3, monkeypatch)] == [
      "decode", "inception_crop"]
  fused = preprocess.parse("decode|inception_crop(224)", channels=3)
  plain = _unfused("decode|inception_crop(224)", 3, monkeypatch)
  assert preprocess.num_random(fused) == preprocess.num_random(plain) == 22  # the same u columns


SIZES = {"decode|inception_crop(24)": (24, 24), "decode|inception_crop((20, 28), 30)": (20, 28),
         "decode|random_resized_crop(16, scale=(0.5, 1.0))": (16, 16)}


@pytest.mark.parametrize("pp", list(SIZES))
@pytest.mark.parametrize("h,w,c", [(37, 53, 3), (64, 41, 3), (45, 45, 1), (20, 90, 3)])
def test_decode_and_crop_gives_the_pixels_of_decode_then_crop(pp, h, w, c, monkeypatch):
  fused, plain = preprocess.parse(pp, channels=c), _unfused(pp, c, monkeypatch)
  encoded = _jpeg(h, w, c, seed=h * w)
  u = _u(plain, 12, seed=c)
  u[-1, :-2] = 0.999  # every proposal too large: the fallback (central, ratio clamped) window
  for row in u:
    a, b = _one(fused, encoded, row), _one(plain, encoded, row)
    assert a.shape == b.shape == SIZES[pp] + (c,)
    np.testing.assert_allclose(a, b, atol=FLOAT_ATOL)


def test_decode_and_crop_with_subsampled_chroma_differs_only_at_the_window_edge(monkeypatch):
  pp = "decode|inception_crop(24)"
  fused, plain = preprocess.parse(pp, channels=3), _unfused(pp, 3, monkeypatch)
  encoded = _jpeg(57, 70, seed=1, chroma_420=True)
  diffs = []
  for row in _u(plain, 20, seed=5):
    a, b = _one(fused, encoded, row), _one(plain, encoded, row)
    diffs.append(np.abs(a - b))
    assert diffs[-1].max() <= 32
  assert np.mean(diffs) < 0.5
  assert np.mean(np.array(diffs) <= FLOAT_ATOL) > 0.8  # the rest: the same up to float rounding


def test_only_the_fused_op_decodes_with_decode_and_crop_jpeg(monkeypatch):
  def graph_text(ops):
    fn = tf.function(lambda x, u: preprocess.apply(ops, x, u))
    return str(fn.get_concrete_function(tf.TensorSpec([1], tf.string),
                                        tf.TensorSpec([1, 22], tf.float32)).graph.as_graph_def())
  pp = "decode|inception_crop(8)"
  assert "DecodeAndCropJpeg" in graph_text(preprocess.parse(pp, channels=3))
  assert "DecodeAndCropJpeg" not in graph_text(_unfused(pp, 3, monkeypatch))


def test_png_and_decoded_images_take_the_plain_path(monkeypatch):
  pp = "decode|inception_crop(16)"
  fused, plain = preprocess.parse(pp, channels=3), _unfused(pp, 3, monkeypatch)
  img = _photo(30, 50)
  u = _u(plain, 4)
  png = tf.io.encode_png(img).numpy()
  for row in u:  # PNG: decoded whole, then the plain op: exactly the same
    np.testing.assert_array_equal(_one(fused, png, row), _one(plain, png, row))
  batch = np.stack([img] * 4)  # fixed-shape sources: decoded before the chain, whole batches
  np.testing.assert_array_equal(preprocess.apply(fused, tf.constant(batch), tf.constant(u)),
                                preprocess.apply(plain, tf.constant(batch), tf.constant(u)))


def _write_jpeg_folder(root, n=12, classes=3):
  for i in range(n):
    folder = root / "train" / f"c{i % classes}"
    os.makedirs(folder, exist_ok=True)
    h, w = 40 + 7 * (i % 4), 52 - 5 * (i % 3)
    (folder / f"{i}.jpg").write_bytes(_jpeg(h, w, seed=i))


def test_train_iterator_decode_and_crop_matches_decode_then_crop(tmp_path, monkeypatch):
  _write_jpeg_folder(tmp_path)
  src = data.get_source({"name": "image_folder", "data_dir": str(tmp_path)})
  kw = dict(split="train", pp=TRAIN_PP, batch_size=4, seed=3, process_index=0, process_count=1)
  fused = data.train_iterator(src, **kw)
  with monkeypatch.context() as m:
    m.setattr(preprocess, "FUSE_DECODE_CROP", False)
    plain = data.train_iterator(src, **kw)
  for _ in range(4):  # a whole epoch and a bit: every file, the same rows and crops
    a, b = next(fused), next(plain)
    np.testing.assert_array_equal(a["id"], b["id"])
    assert a["image"].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(a["image"], b["image"], atol=FLOAT_ATOL)


# ---------------------------------------------------------------------------- resize_small.
def test_resize_small_keeps_the_aspect_ratio():
  ops = preprocess.parse("resize_small(256)")
  for (h, w), want in (((300, 400), (256, 341)), ((400, 300), (341, 256)), ((256, 99), (662, 256)),
                       ((128, 128), (256, 256)), ((375, 500), (256, 341))):
    x = np.zeros((2, h, w, 3), np.uint8)
    out = preprocess.apply(ops, tf.constant(x), tf.zeros([2, 0]))
    assert tuple(out.shape) == (2,) + want + (3,) and out.dtype == tf.float32
  x = _photo(30, 45)[None]
  out = preprocess.apply(preprocess.parse("resize_small(20, method='bilinear')"), tf.constant(x),
                         tf.zeros([1, 0])).numpy()
  np.testing.assert_allclose(out, tf.image.resize(x, (20, 30)).numpy())
  np.testing.assert_allclose(  # the default method is big_vision's: area
      preprocess.apply(ops, tf.constant(x), tf.zeros([1, 0])).numpy(),
      tf.image.resize(x, (256, 384), method="area").numpy())
  with pytest.raises(ValueError, match="positive int"):
    preprocess.parse("resize_small((256, 256))")


def test_resize_small_on_unknown_sizes_inside_tf_function():
  ops = preprocess.parse("decode|resize_small(24)|central_crop(20)", channels=3)
  fn = tf.function(lambda x: preprocess.apply(ops, x, tf.zeros([1, 0])),
                   input_signature=[tf.TensorSpec([1], tf.string)])
  for h, w in ((30, 61), (61, 30), (24, 24)):
    out = fn(tf.constant([_jpeg(h, w)])).numpy()
    assert out.shape == (1, 20, 20, 3)
  shape = fn.get_concrete_function().output_shapes
  assert shape.as_list() == [1, 20, 20, 3]


def test_eval_iterator_resize_small_central_crop(tmp_path):
  _write_jpeg_folder(tmp_path, n=5)
  src = data.get_source({"name": "image_folder", "data_dir": str(tmp_path)})
  batches = list(data.eval_iterator(
      src, split="train", pp="decode|resize_small(36)|central_crop(32)|value_range(-1, 1)",
      batch_size=4, process_index=0, process_count=1))
  assert [b["image"].shape for b in batches] == [(4, 32, 32, 3)] * 2
  assert [b["mask"].sum() for b in batches] == [4, 1]


# ------------------------------------------------------------ a TFDS data set from local files.
NUM_TFDS_IMAGES = 10


class DummyImagenetLike(tfds.core.GeneratorBasedBuilder):
  """Tiny JPEGs from the manual_dir (written by the test), "<index>_<c|d>.jpg": train (the first
  8) and validation (the last 2: one cat, one dog)."""
  # As if defined in a package, like every real builder: TFDS then finds the builder's code
  # directory with importlib_resources (what a missing dependency broke), not a plain fallback.
  __module__ = "vit_jax.data.dummy_imagenet_like"
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "The test writes the JPEGs."

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(names=["cat", "dog"]),
    }))

  def _split_generators(self, dl_manager):
    files = sorted(os.listdir(dl_manager.manual_dir))
    return {"train": self._generate_examples(dl_manager.manual_dir, files[:8]),
            "validation": self._generate_examples(dl_manager.manual_dir, files[8:])}

  def _generate_examples(self, folder, files):
    for name in files:
      yield name, {"image": os.path.join(folder, name), "label": int(name[3] == "d")}


def _manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for i in range(NUM_TFDS_IMAGES):
    (manual / f"{i:02d}_{'cd'[i % 2]}.jpg").write_bytes(_jpeg(30 + i, 44 - i, seed=i))
  return str(manual)


def test_tfds_source_prepares_a_data_set_from_local_files(tmp_path):
  """Runs TFDS's real download_and_prepare: an import it lacks (importlib_resources) fails here."""
  cfg = {"name": "tfds:dummy_imagenet_like", "data_dir": str(tmp_path / "tfds"),
         "manual_dir": _manual_dir(tmp_path)}
  src = data.get_source(cfg)
  assert isinstance(src, sources.TfdsSource) and src.builder.is_prepared()
  assert (src.num_classes, src.class_names, src.image_shape) == (2, ("cat", "dog"),
                                                                 (None, None, 3))
  assert src.encoded
  assert src.num_examples("train") == 8 and src.num_examples("validation") == 2
  batch = next(data.train_iterator(src, split="train", pp=TRAIN_PP, batch_size=4, seed=0,
                                   process_index=0, process_count=1))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, 2)
  evals = list(data.eval_iterator(src, split="validation",
                                  pp="decode|resize_small(36)|central_crop(32)", batch_size=2,
                                  process_index=0, process_count=1))
  assert len(evals) == 1 and evals[0]["mask"].tolist() == [1, 1]
  assert sorted(evals[0]["label"].argmax(1).tolist()) == [0, 1]  # 08_c, 09_d
  again = data.get_source(cfg)  # prepared: read as it is
  assert again.num_examples("train") == 8


def _record_preparation(monkeypatch):
  calls = []
  prepare = tfds.core.DatasetBuilder.download_and_prepare

  def recorded(self, **kwargs):
    calls.append("prepare")
    return prepare(self, **kwargs)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", recorded)
  return calls, prepare


def test_tfds_preparation_by_process_0_only(tmp_path, monkeypatch):
  calls, prepare = _record_preparation(monkeypatch)
  data_dir, manual = str(tmp_path / "tfds"), _manual_dir(tmp_path)
  config = tfds.download.DownloadConfig(manual_dir=manual)

  def barrier_while_process_0_prepares(name):  # what process 1 sees: process 0 prepares meanwhile
    calls.append("barrier")
    prepare(tfds.builder("dummy_imagenet_like", data_dir=data_dir), download_config=config)
  monkeypatch.setattr(sources, "_barrier", barrier_while_process_0_prepares)
  src = sources.TfdsSource("dummy_imagenet_like", data_dir=data_dir, manual_dir=manual,
                           process_index=1, process_count=2)
  assert calls == ["barrier"]  # waited, never prepared itself
  assert src.num_examples("train") == 8

  calls.clear()
  monkeypatch.setattr(sources, "_barrier", lambda name: calls.append("barrier"))
  src = sources.TfdsSource("dummy_imagenet_like", data_dir=str(tmp_path / "tfds0"),
                           manual_dir=manual, process_index=0, process_count=2)
  assert calls == ["prepare", "barrier"] and src.num_examples("validation") == 2

  calls.clear()  # process 0 fails: it still reaches the barrier (no one waits forever), then raises
  with pytest.raises(FileNotFoundError, match="is not prepared"):
    sources.TfdsSource("dummy_imagenet_like", data_dir=str(tmp_path / "tfds1"),
                       manual_dir=str(tmp_path / "nothing_here"), process_index=0,
                       process_count=2)
  assert calls == ["prepare", "barrier"]


def test_tfds_one_process_prepares_without_a_barrier(tmp_path, monkeypatch):
  calls, _ = _record_preparation(monkeypatch)
  monkeypatch.setattr(sources, "_barrier", lambda name: calls.append("barrier"))
  sources.TfdsSource("dummy_imagenet_like", data_dir=str(tmp_path / "tfds"),
                     manual_dir=_manual_dir(tmp_path))
  assert calls == ["prepare"]
