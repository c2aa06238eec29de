"""Tests for vit_jax/data/coco.py: DETR's resize arithmetic, boxes that follow the pixels through
flips, crops and resizes, padding masks, determinism, and the TFDS path under mock_data."""
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import coco

SMALL = coco.CocoAugment(scales=(32, 40, 48), max_size=64, crop_scales=(40, 48), crop_min=24,
                         crop_max=40, eval_scale=48, pad_size=65, max_objects=5)


def _detr_size(h, w, size, max_size):
  """DETR's get_size_with_aspect_ratio (datasets/transforms.py), transcribed."""
  if max_size is not None:
    min_o, max_o = float(min(w, h)), float(max(w, h))
    if max_o / min_o * size > max_size:
      size = int(round(max_size * min_o / max_o))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    return int(size * h / w), size
  return size, int(size * w / h)


@pytest.mark.parametrize("h,w,size,max_size", [(480, 640, 800, 1333), (427, 640, 512, 1333),
                                               (640, 200, 800, 1333), (100, 100, 48, 64),
                                               (30, 90, 32, 64), (333, 500, 600, None)])
def test_resize_shape_is_detrs(h, w, size, max_size):
  oh, ow = coco._size_with_aspect_ratio(h, w, size, max_size)
  assert (int(oh), int(ow)) == _detr_size(h, w, size, max_size)


def _record(h=60, w=80, boxes=((10, 20, 30, 50), (40, 5, 58, 25)), crowd=(False, False)):
  """An image that is 255 inside its objects' boxes (pixel (y0, x0, y1, x1)) and 0 elsewhere."""
  image = np.zeros((h, w, 3), np.uint8)
  for y0, x0, y1, x1 in boxes:
    image[y0:y1, x0:x1] = 255
  # TFDS's layout: relative (ymin, xmin, ymax, xmax).
  bbox = (np.array(boxes) / [h, w, h, w]).astype(np.float32)
  return {"image": tf.constant(image),
          "objects": {"bbox": tf.constant(bbox), "label": tf.constant([3, 7][:len(boxes)],
                                                                      tf.int64),
                      "is_crowd": tf.constant(crowd)}}


def _check_boxes_follow_pixels(out):
  img = out["image"].numpy()
  raw = (img * coco.IMAGENET_STD + coco.IMAGENET_MEAN)[..., 0]  # back to [0, 1]
  mask = out["image_mask"].numpy()
  h, w = mask.any(1).sum(), mask.any(0).sum()
  assert mask[:h, :w].all() and not mask[h:].any() and not mask[:, w:].any()
  assert (img[~mask] == 0).all()  # padding is zeros (after normalisation)
  n = int(out["mask"].numpy().sum())
  for cx, cy, bw, bh in out["boxes"].numpy()[:n]:
    x0, x1 = int(np.ceil((cx - bw / 2) * w)), int(np.floor((cx + bw / 2) * w))
    y0, y1 = int(np.ceil((cy - bh / 2) * h)), int(np.floor((cy + bh / 2) * h))
    # Interior pixels (one pixel in from the edge: resampling blurs it) are the object's.
    if x1 - x0 > 2 and y1 - y0 > 2:
      assert raw[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 0.9
  return n


def test_eval_resize_and_padding_by_hand():
  out = coco.preprocess(_record(), tf.constant([0, 0], tf.int64), train=False, aug=SMALL)
  # 60 x 80 -> shorter side 48: 48 x 64; the boxes keep their relative coordinates.
  assert out["image"].shape == (65, 65, 3)
  assert int(out["image_mask"].numpy().sum()) == 48 * 64
  np.testing.assert_allclose(out["boxes"].numpy()[:2], [[35 / 80, 20 / 60, 30 / 80, 20 / 60],
                                                        [15 / 80, 49 / 60, 20 / 80, 18 / 60]],
                             rtol=1e-5)
  np.testing.assert_array_equal(out["labels"].numpy(), [3, 7, 0, 0, 0])
  np.testing.assert_array_equal(out["mask"].numpy(), [True, True, False, False, False])
  assert _check_boxes_follow_pixels(out) == 2


def test_crowd_objects_are_dropped():
  out = coco.preprocess(_record(crowd=(True, False)), tf.constant([0, 0], tf.int64), train=False,
                        aug=SMALL)
  assert out["mask"].numpy().sum() == 1 and out["labels"].numpy()[0] == 7


def test_training_augmentation_keeps_boxes_on_their_pixels_and_is_deterministic():
  seen_sizes, flips = set(), 0
  record = _record()
  augment = tf.function(lambda ex, seed: coco.preprocess(ex, seed, train=True, aug=SMALL))
  for i in range(24):
    seed = tf.constant([5, i], tf.int64)
    out = augment(record, seed)
    np.testing.assert_array_equal(out["image"].numpy(), augment(record, seed)["image"].numpy())
    _check_boxes_follow_pixels(out)
    mask = out["image_mask"].numpy()
    h, w = int(mask.any(1).sum()), int(mask.any(0).sum())
    assert max(h, w) <= SMALL.max_size + 1 and min(h, w) <= max(SMALL.scales)
    seen_sizes.add((h, w))
    n = int(out["mask"].numpy().sum())
    # The first object (label 3) sits in the left half; flipped, in the right half.
    if n and out["labels"].numpy()[0] == 3 and out["boxes"].numpy()[0, 0] > 0.5:
      flips += 1
  assert len(seen_sizes) > 3 and flips > 0


def test_tfds_path_under_mock_data():
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    train = list(coco.coco_dataset("train", train=True, seed=1, aug=SMALL).take(3))
    other = list(coco.coco_dataset("train", train=True, seed=1, epoch=1, aug=SMALL).take(3))
    val = list(coco.coco_dataset("validation", train=False, aug=SMALL).take(2))
  for ex in train + val:
    assert ex["image"].shape == (65, 65, 3) and ex["boxes"].shape == (5, 4)
    n = int(ex["mask"].numpy().sum())
    b = ex["boxes"].numpy()[:n]
    assert ((b[:, 2:] > 0) & (b[:, 2:] <= 1 + 1e-6)).all()
    assert (ex["labels"].numpy() < 80).all()
  assert any(not np.array_equal(a["image"].numpy(), b["image"].numpy())
             for a, b in zip(train, other))


def test_bad_padding_is_a_clear_error():
  with pytest.raises(ValueError, match="pad_size 64 must be at least max_size \\+ 1 = 65"):
    coco.coco_dataset("train", train=True,
                      aug=coco.CocoAugment(max_size=64, pad_size=64))
