"""Multi-object Fashion-MNIST canvases: a detection task small enough to train on a CPU.

Canvas `index` of a split is a pure function of (seed, split, index): a numpy Generator seeded with
(seed, split number, index) draws the number of objects (`min_objects`..`max_objects`), and for
each a garment (uniformly from the split's pool of Fashion-MNIST images), a side length
(`min_size`..`max_size` pixels; the 28x28 image is resized bilinearly to a square) and a position
inside the canvas. A position whose box would overlap an earlier one with IoU above `max_iou` is
redrawn (up to 20 times, then the object is dropped), so that objects stay distinguishable.
Garments are pasted with a maximum (overlaps look like overlapping cut-outs, no hard edges).

Boxes are the tight boxes of the pasted garment's non-zero pixels (Fashion-MNIST items do not fill
their 28x28 square), in DETR's format: (cx, cy, w, h) relative to the canvas, padded to
`max_objects` rows with `mask` False. Labels are the Fashion-MNIST classes 0..9.

Splits: "train" draws garments from the first 54,000 Fashion-MNIST training images, "val" from the
last 6,000 (the project's validation carve-out, configs/common.py), "test" from the 10,000 test
images; a split has `num_examples` canvases (the index range is unbounded: any index is a canvas).
Example: {"image": uint8 (128, 128, 1), "boxes": float32 (T, 4), "labels": int32 (T,),
"mask": bool (T,)}, T = max_objects.

`CanvasSource` is the trainer's view of them (`dataset.name="fashion_mnist_canvases"`): base
splits of `SPLIT_SIZES` canvases that vit_jax/data/pipeline.py batches in numpy.
"""
import dataclasses
from typing import Dict, Iterator, Optional, Sequence

import numpy as np

from vit_jax import errors
from vit_jax.data import sources

SPLITS = {"train": 0, "val": 1, "test": 2}  # split -> number mixed into the seed
_POOLS = {"train": ("train", slice(0, 54_000)), "val": ("train", slice(54_000, None)),
          "test": ("test", slice(None))}


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
  """(H, W) uint8 -> (size, size) uint8, bilinear with half-pixel centres (align_corners=False,
  as tf.image.resize and torch's interpolate; no anti-aliasing)."""
  h, w = img.shape

  def coords(n_in, n_out):
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, x - lo

  y0, y1, fy = coords(h, size)
  x0, x1, fx = coords(w, size)
  f = img.astype(np.float32)
  top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx
  bottom = f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx
  out = top * (1 - fy[:, None]) + bottom * fy[:, None]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _iou_xyxy(a, b) -> float:
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
  canvas_size: int = 128
  min_objects: int = 1
  max_objects: int = 6
  min_size: int = 24  # side of a pasted garment, pixels
  max_size: int = 56
  max_iou: float = 0.3

  def check(self):
    if not 1 <= self.min_objects <= self.max_objects:
      raise errors.DataError(
          f"Canvases need 1 <= min_objects <= max_objects, got {self.min_objects}, "
          f"{self.max_objects}.")
    if not 1 <= self.min_size <= self.max_size <= self.canvas_size:
      raise errors.DataError(f"Canvases need 1 <= min_size <= max_size <= canvas_size, got "
                             f"{self.min_size}, {self.max_size}, {self.canvas_size}.")


class FashionMnistCanvases:
  """Canvases of one split, generated on demand from (seed, split, index); see the module doc."""

  def __init__(self, split: str = "train", *, seed: int = 0, num_examples: int = 10_000,
               config: CanvasConfig = CanvasConfig(), data_dir: Optional[str] = None,
               images: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None):
    """`images` (N, 28, 28[, 1]) uint8 and `labels` (N,) replace the Fashion-MNIST pool (tests);
    otherwise it is read from `data_dir` (Debian's directory by default) as vit_jax.data.sources
    reads it."""
    if split not in SPLITS:
      raise errors.DataError(f"Unknown canvas split {split!r}; known: {', '.join(SPLITS)}.")
    config.check()
    self.split, self.seed, self.num_examples, self.config = split, seed, num_examples, config
    if images is None:
      base, part = _POOLS[split]
      # The reader sources.fashion_mnist uses (cached; the IDX checks and errors included).
      data = sources._load_fashion_mnist(  # pylint: disable=protected-access
          data_dir or sources.FASHION_MNIST_DIR)
      images, labels = data[base][0][part], data[base][1][part]
    images = np.asarray(images)
    self.images = images.reshape(images.shape[:3])  # (N, 28, 28)
    self.labels = np.asarray(labels).astype(np.int32)
    if len(self.images) != len(self.labels) or not len(self.images):
      raise errors.DataError(
          f"Canvas pool: {len(self.images)} images and {len(self.labels)} labels; "
          "need the same, non-zero number.")
    self.class_names = sources.FASHION_MNIST_CLASSES
    self.num_classes = len(self.class_names)

  def example(self, index: int) -> Dict[str, np.ndarray]:
    c = self.config
    rng = np.random.default_rng([self.seed, SPLITS[self.split], int(index)])
    canvas = np.zeros((c.canvas_size, c.canvas_size), np.uint8)
    boxes = np.zeros((c.max_objects, 4), np.float32)
    labels = np.zeros((c.max_objects,), np.int32)
    placed = []
    for _ in range(int(rng.integers(c.min_objects, c.max_objects + 1))):
      pick = int(rng.integers(len(self.images)))
      side = int(rng.integers(c.min_size, c.max_size + 1))
      garment = resize_bilinear(self.images[pick], side)
      ys, xs = np.nonzero(garment)
      if not len(ys):  # an empty image: nothing to detect
        continue
      for _ in range(20):
        top = int(rng.integers(0, c.canvas_size - side + 1))
        left = int(rng.integers(0, c.canvas_size - side + 1))
        box = (left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1)
        if all(_iou_xyxy(box, other) <= c.max_iou for other in placed):
          break
      else:
        continue
      region = canvas[top:top + side, left:left + side]
      np.maximum(region, garment, out=region)
      labels[len(placed)] = self.labels[pick]
      placed.append(box)
    mask = np.arange(c.max_objects) < len(placed)
    if placed:
      b = np.asarray(placed, np.float32) / c.canvas_size
      boxes[:len(placed)] = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                                      b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)
    return {"image": canvas[..., None], "boxes": boxes, "labels": labels, "mask": mask}

  def batch(self, indices: Sequence[int]) -> Dict[str, np.ndarray]:
    """Stacked examples; the trainer's image key is `image` (B, H, W, 1), plus `image_mask`
    (B, H, W) all True (canvases have no padding) for DETR's `mask` input."""
    examples = [self.example(i) for i in indices]
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out["image_mask"] = np.ones(out["image"].shape[:3], bool)
    return out

  def batches(self, batch_size: int, *, start: int = 0, epochs: Optional[int] = None,
              shuffle: bool = True) -> Iterator[Dict[str, np.ndarray]]:
    """Batches of `batch_size` canvases from batch number `start` on (resume); each epoch visits
    the split's `num_examples` indices in an order that is a function of (seed, epoch) only. The
    last partial batch of an epoch is dropped when shuffling (training) and kept otherwise."""
    per_epoch = (self.num_examples // batch_size if shuffle
                 else -(-self.num_examples // batch_size))
    if per_epoch < 1:
      raise errors.DataError(f"batch_size {batch_size} exceeds the split's {self.num_examples} "
                             "canvases.")
    step = start
    while epochs is None or step < epochs * per_epoch:
      epoch, i = divmod(step, per_epoch)
      order = (np.random.default_rng([self.seed, SPLITS[self.split], 1 << 20, epoch])
               .permutation(self.num_examples) if shuffle else np.arange(self.num_examples))
      yield self.batch(order[i * batch_size:(i + 1) * batch_size])
      step += 1


# Canvases per base split of CanvasSource: as many as its pool has garments. Any index is a
# canvas; the sizes fix what an epoch and a split such as "val[:1000]" mean.
SPLIT_SIZES = {"train": 54_000, "val": 6_000, "test": 10_000}


class CanvasSource(sources.Source):
  """The canvases as a source of the trainer: base splits "train", "val", "test" of
  `SPLIT_SIZES` canvases, made with seed 0 whatever the training seed (which only orders them),
  so that every run is evaluated on the same canvases. `detection` tells the pipeline to batch
  `example(base, index)` in numpy (vit_jax/data/pipeline.py) instead of reading a table."""
  detection = True

  def __init__(self, *, data_dir: Optional[str] = None, config: CanvasConfig = CanvasConfig(),
               seed: int = 0, sizes: Optional[Dict[str, int]] = None,
               images: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None):
    """`images` and `labels` replace the Fashion-MNIST pool of every split (tests); otherwise
    the files in `data_dir` (Debian's directory by default) are read now, so that missing data
    is an error before anything trains."""
    config.check()
    if images is None:
      sources._load_fashion_mnist(  # pylint: disable=protected-access
          data_dir or sources.FASHION_MNIST_DIR)
    self.name = "fashion_mnist_canvases"
    self.class_names = sources.FASHION_MNIST_CLASSES
    self.num_classes = len(self.class_names)
    self.image_shape = (config.canvas_size, config.canvas_size, 1)
    self.encoded = False
    self.max_objects = config.max_objects
    self._sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    self._make = lambda split: FashionMnistCanvases(
        split, seed=seed, num_examples=self._sizes[split], config=config, data_dir=data_dir,
        images=images, labels=labels)
    self._splits = {}

  def split_size(self, base: str) -> int:
    if base not in self._sizes:
      raise errors.DataError(
          f"Unknown split {base!r} for {self.name}; known: {sorted(self._sizes)}.")
    return self._sizes[base]

  def batch(self, base: str, indices: Sequence[int]) -> Dict[str, np.ndarray]:
    """The canvases `indices` of base split `base`, stacked (FashionMnistCanvases.batch)."""
    if base not in self._splits:
      self.split_size(base)
      self._splits[base] = self._make(base)
    return self._splits[base].batch(indices)
