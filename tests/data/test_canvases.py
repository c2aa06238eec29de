"""Tests for vit_jax/data/canvases.py: determinism, boxes that are the garments' tight boxes,
labels, padding, the resize against TensorFlow's, and resumable batches."""
import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import canvases


def _pool():
  """Ten synthetic 28x28 'garments': class k is a 10x16 block of value 20 * (k + 1) in a margin."""
  images = np.zeros((10, 28, 28), np.uint8)
  for k in range(10):
    images[k, 6:16, 4:20] = 20 * (k + 1)
  return images, np.arange(10)


def test_resize_matches_tensorflow_bilinear():
  img = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
  for size in (21, 28, 56):
    want = tf.image.resize(img[..., None].astype(np.float32), (size, size), "bilinear",
                           antialias=False).numpy()[..., 0]
    got = canvases.resize_bilinear(img, size)
    assert np.abs(got.astype(np.float32) - want).max() <= 0.5 + 1e-3


def test_canvases_are_deterministic_in_seed_split_and_index():
  images, labels = _pool()
  make = lambda split="train", seed=0: canvases.FashionMnistCanvases(
      split, seed=seed, images=images, labels=labels)
  a, b = make().example(7), make().example(7)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], make().example(8)["image"])
  assert not np.array_equal(a["image"], make(seed=1).example(7)["image"])
  assert not np.array_equal(a["image"], make(split="test").example(7)["image"])


def test_boxes_are_tight_and_labels_right():
  images, labels = _pool()
  cfg = canvases.CanvasConfig(max_iou=0.0, min_objects=2, max_objects=5)
  ds = canvases.FashionMnistCanvases("train", seed=3, images=images, labels=labels, config=cfg)
  counts = []
  for index in range(40):
    ex = ds.example(index)
    assert ex["image"].shape == (128, 128, 1) and ex["image"].dtype == np.uint8
    assert ex["boxes"].shape == (5, 4) and ex["mask"].shape == (5,)
    n = int(ex["mask"].sum())
    counts.append(n)
    assert (ex["mask"][:n]).all() and not ex["mask"][n:].any()  # real objects first
    assert (ex["boxes"][n:] == 0).all()
    img = ex["image"][..., 0]
    covered = np.zeros_like(img, bool)
    for (cx, cy, w, h), label in zip(ex["boxes"][:n] * 128, ex["labels"][:n]):
      x0, y0, x1, y1 = (int(round(v)) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
      assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
      region = img[y0:y1, x0:x1]
      # Tight: every border row and column of the box has a non-zero pixel.
      assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
      # The right class: boxes do not overlap (max_iou=0), so the block's value names it.
      assert region.max() == 20 * (label + 1)
      covered[y0:y1, x0:x1] = True
    assert not img[~covered].any()  # nothing outside the boxes
  assert min(counts) >= 1 and max(counts) <= 5 and len(set(counts)) > 1


def test_real_fashion_mnist_pool_and_splits():
  ds = canvases.FashionMnistCanvases("val", seed=0)
  assert len(ds.images) == 6000 and ds.num_classes == 10
  ex = ds.example(0)
  n = int(ex["mask"].sum())
  assert 1 <= n <= 6 and (ex["labels"][:n] < 10).all()
  w, h = ex["boxes"][:n, 2], ex["boxes"][:n, 3]
  assert ((w > 0) & (w <= 56 / 128) & (h > 0) & (h <= 56 / 128)).all()
  with pytest.raises(ValueError, match="Unknown canvas split 'validation'; known: train, val"):
    canvases.FashionMnistCanvases("validation")
  with pytest.raises(ValueError, match="min_objects <= max_objects"):
    canvases.FashionMnistCanvases("train", config=canvases.CanvasConfig(min_objects=3,
                                                                         max_objects=2))


def test_batches_resume_and_cover_each_epoch_once():
  images, labels = _pool()
  ds = canvases.FashionMnistCanvases("train", seed=1, num_examples=12, images=images,
                                     labels=labels)
  run = list(ds.batches(4, epochs=2))
  assert len(run) == 6 and run[0]["image"].shape == (4, 128, 128, 1)
  assert run[0]["image_mask"].shape == (4, 128, 128) and run[0]["image_mask"].all()
  resumed = list(ds.batches(4, start=4, epochs=2))
  for a, b in zip(run[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Each epoch is a permutation of the 12 canvases: every canvas exactly once.
  epoch = np.concatenate([b["image"] for b in run[:3]])
  every = np.stack([ds.example(i)["image"] for i in range(12)])
  assert sorted(x.tobytes() for x in epoch) == sorted(x.tobytes() for x in every)
  ordered = list(ds.batches(5, epochs=1, shuffle=False))
  assert [len(b["image"]) for b in ordered] == [5, 5, 2]


def test_source_batches_resume_split_over_hosts_and_pad_evaluation():
  """CanvasSource through vit_jax.data's iterators: the pp runs on the images, a resumed stream
  and every host's rows equal the uninterrupted single-host batches, evaluation pads with
  invalid rows."""
  from vit_jax.data import pipeline
  images, labels = _pool()
  src = canvases.CanvasSource(images=images, labels=labels, sizes={"train": 20, "val": 10})
  assert src.detection and src.num_examples("val[:7]") == 7 and src.image_shape == (128, 128, 1)
  it = lambda **kw: pipeline.train_iterator(src, split="train", pp="value_range(-1,1)",
                                            batch_size=8, seed=0, **kw)
  run = [next(b) for b in [it(process_index=0, process_count=1)] for _ in range(4)]
  assert set(run[0]) == {"image", "image_mask", "boxes", "labels", "mask"}
  assert run[0]["image"].dtype == np.float32 and run[0]["image"].min() == -1.0
  assert run[0]["boxes"].shape == (8, 6, 4) and run[0]["image_mask"].all()
  resumed = next(it(start_step=3, process_index=0, process_count=1))
  host1 = next(it(start_step=3, process_index=1, process_count=2))
  np.testing.assert_array_equal(resumed["boxes"], run[3]["boxes"])
  np.testing.assert_array_equal(host1["image"], run[3]["image"][4:])
  ev = list(pipeline.eval_iterator(src, split="val[:7]", pp="value_range(-1,1)", batch_size=4,
                                   process_index=0, process_count=1))
  assert [e["valid"].tolist() for e in ev] == [[True] * 4, [True] * 3 + [False]]
  want = src.batch("val", [6])
  np.testing.assert_array_equal(ev[1]["labels"][2], want["labels"][0])
  np.testing.assert_allclose(ev[1]["image"][2], want["image"][0] / 127.5 - 1, atol=1e-6)
