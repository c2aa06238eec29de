"""COCO detection through TFDS (`coco/2017`) with DETR's augmentation and padding masks.

Each record's crowd boxes are dropped (DETR drops `iscrowd` objects for training and evaluation),
boxes go from TFDS's relative (ymin, xmin, ymax, xmax) to pixels, then:

- training (DETR's `make_coco_transforms("train")`): horizontal flip with probability 1/2; then,
  with probability 1/2 each, either a resize of the shorter side to one of `scales` (480, 512,
  ..., 800) with the longer side at most `max_size` (1333), or a resize to one of `crop_scales`
  (400, 500, 600), a random crop of height and width drawn in [`crop_min`, `crop_max`] (384, 600)
  (boxes clipped to it, emptied ones dropped), and the first resize again;
- evaluation: the shorter side to `eval_scale` (800), the longer at most `max_size`.

Randomness is stateless and per example: every draw is a function of (seed, epoch, the example's
position in the split), so a resumed run sees the same augmentations. The image is normalised
with ImageNet's mean and standard deviation (the backbone's pre-training statistics) and padded at
the bottom and right to (`pad_size`, `pad_size`) with `image_mask` True on real pixels; boxes
become (cx, cy, w, h) relative to the unpadded image (DETR's targets), padded to `max_objects` with
`mask`. A shape after a resize is computed as DETR's `get_size_with_aspect_ratio`; its rounding
can make the longer side `max_size + 1`, so `pad_size` must be at least `max_size + 1`.

Example: {"image": float32 (P, P, 3), "image_mask": bool (P, P), "boxes": float32 (T, 4),
"labels": int32 (T,) (TFDS's 80 contiguous classes), "mask": bool (T,)}.
"""
import dataclasses
from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import errors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class CocoAugment:
  scales: Sequence[int] = tuple(range(480, 801, 32))
  max_size: int = 1333
  crop_scales: Sequence[int] = (400, 500, 600)
  crop_min: int = 384
  crop_max: int = 600
  eval_scale: int = 800
  pad_size: int = 1334
  max_objects: int = 100

  def check(self):
    if self.pad_size < self.max_size + 1:
      raise errors.DataError(f"COCO pad_size {self.pad_size} must be at least max_size + 1 = "
                             f"{self.max_size + 1} (a resize can round the longer side up by one).")
    if not 1 <= self.crop_min <= self.crop_max:
      raise errors.DataError(
          f"COCO crop sizes need 1 <= crop_min <= crop_max, got {self.crop_min}, "
          f"{self.crop_max}.")


def _size_with_aspect_ratio(h, w, size, max_size):
  """DETR's get_size_with_aspect_ratio: (h, w) with the shorter side `size` (shrunk so that the
  longer one stays <= max_size, unless that is None), ints as int() truncates."""
  h, w = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  size = tf.cast(size, tf.float32)
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  if max_size is not None:
    size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  oh = tf.where(w < h, tf.floor(size * h / w), size)
  ow = tf.where(w < h, size, tf.floor(size * w / h))
  return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


def _resize(image, boxes, size, max_size):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  oh, ow = _size_with_aspect_ratio(h, w, size, max_size)
  image = tf.image.resize(image, tf.stack([oh, ow]), "bilinear", antialias=True)
  ratio = tf.cast(tf.stack([ow, oh, ow, oh]), tf.float32) / tf.cast(tf.stack([w, h, w, h]),
                                                                       tf.float32)
  return image, boxes * ratio


def _choice(values, seed):
  values = tf.constant(list(values), tf.int32)
  i = tf.random.stateless_uniform([], seed, 0, tf.shape(values)[0], tf.int32)
  return values[i]


def _randint(lo, hi, seed):
  """Uniform integer in [lo, hi] (inclusive, as Python's randint)."""
  return tf.random.stateless_uniform([], seed, lo, hi + 1, tf.int32)


def _crop(image, boxes, labels, seed, crop_min, crop_max):
  """DETR's RandomSizeCrop: size (h, w) in [crop_min, min(side, crop_max)], a uniform position;
  boxes clipped to the crop, those left empty dropped."""
  s = tf.random.experimental.stateless_split(seed, 4)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ch = _randint(tf.minimum(crop_min, h), tf.minimum(h, crop_max), s[0])
  cw = _randint(tf.minimum(crop_min, w), tf.minimum(w, crop_max), s[1])
  top, left = _randint(0, h - ch, s[2]), _randint(0, w - cw, s[3])
  image = image[top:top + ch, left:left + cw]
  off = tf.cast(tf.stack([left, top, left, top]), tf.float32)
  lim = tf.cast(tf.stack([cw, ch, cw, ch]), tf.float32)
  boxes = tf.clip_by_value(boxes - off, 0.0, lim)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return image, tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)


def _objects(ex):
  """Non-crowd objects: boxes in pixels (x0, y0, x1, y1), labels; proper boxes only."""
  image = ex["image"]
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  obj = ex["objects"]
  # Real records have one entry per object in each field; tfds.testing.mock_data draws each
  # field's length independently, so take the common prefix.
  n = tf.reduce_min(tf.stack([tf.shape(obj[k])[0] for k in ("bbox", "label", "is_crowd")]))
  bbox = tf.cast(obj["bbox"][:n], tf.float32)
  labels, crowd = tf.cast(obj["label"][:n], tf.int32), obj["is_crowd"][:n]
  keep = tf.logical_not(crowd)
  bbox, labels = tf.boolean_mask(bbox, keep), tf.boolean_mask(labels, keep)
  boxes = tf.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
  proper = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return tf.cast(image, tf.float32), tf.boolean_mask(boxes, proper), tf.boolean_mask(labels,
                                                                                      proper)


def preprocess(ex, seed, *, train: bool, aug: CocoAugment = CocoAugment()):
  """One TFDS coco record -> a padded example (module docstring); `seed`: a stateless seed (2,)."""
  image, boxes, labels = _objects(ex)
  if train:
    s = tf.random.experimental.stateless_split(seed, 6)
    flip = tf.random.stateless_uniform([], s[0]) < 0.5
    w = tf.cast(tf.shape(image)[1], tf.float32)
    image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
    boxes = tf.cond(flip, lambda: tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                            boxes[:, 3]], axis=1), lambda: boxes)

    def plain():
      i, b = _resize(image, boxes, _choice(aug.scales, s[2]), aug.max_size)
      return i, b, labels

    def cropped():
      i, b = _resize(image, boxes, _choice(aug.crop_scales, s[3]), None)
      i, b, l = _crop(i, b, labels, s[4], aug.crop_min, aug.crop_max)
      i, b = _resize(i, b, _choice(aug.scales, s[5]), aug.max_size)
      return i, b, l

    use_crop = tf.random.stateless_uniform([], s[1]) < 0.5
    image, boxes, labels = tf.cond(use_crop, cropped, plain)
  else:
    image, boxes = _resize(image, boxes, aug.eval_scale, aug.max_size)

  h, w = tf.shape(image)[0], tf.shape(image)[1]
  image = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  p = aug.pad_size
  image = tf.image.pad_to_bounding_box(image, 0, 0, p, p)
  image_mask = tf.pad(tf.ones(tf.stack([h, w]), tf.bool), [[0, p - h], [0, p - w]])
  size = tf.cast(tf.stack([w, h, w, h]), tf.float32)
  b = boxes / size
  cxcywh = tf.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                     b[:, 3] - b[:, 1]], axis=1)[:aug.max_objects]
  n = tf.shape(cxcywh)[0]
  pad = aug.max_objects - n
  return {"image": tf.ensure_shape(image, (p, p, 3)),
          "image_mask": tf.ensure_shape(image_mask, (p, p)),
          "boxes": tf.ensure_shape(tf.pad(cxcywh, [[0, pad], [0, 0]]), (aug.max_objects, 4)),
          "labels": tf.ensure_shape(tf.pad(labels[:aug.max_objects], [[0, pad]]),
                                    (aug.max_objects,)),
          "mask": tf.ensure_shape(tf.range(aug.max_objects) < n, (aug.max_objects,))}


def coco_dataset(split: str, *, train: bool, seed: int = 0, epoch: int = 0,
                 aug: CocoAugment = CocoAugment(), data_dir: Optional[str] = None,
                 name: str = "coco/2017") -> tf.data.Dataset:
  """Unbatched, padded examples of `split` in the split's order (shuffle and batch downstream);
  example i's draws depend on (seed, epoch, i) only."""
  aug.check()
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  base = tf.constant([seed, epoch], tf.int64)

  def fn(i, ex):
    s = tf.random.experimental.stateless_fold_in(base, i)
    return preprocess(ex, s, train=train, aug=aug)
  return ds.enumerate().map(tf.autograph.experimental.do_not_convert(fn),  # as in pipeline.py
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
