"""Preprocessing ops, written as big_vision-style strings: "decode|resize(32)|value_range(-1, 1)".

Every op works on a batch `(B, H, W, C)` and takes `u`, a `(B, num_random)` float32 tensor of
uniform [0, 1) numbers that the pipeline derives from (seed, example position) with stateless
tf.random ops; so the ops hold no state and the same position always gets the same augmentation.
The pipeline runs the chain on whole batches when the source's image shape is fixed, else on
batches of one example.

Images enter as uint8 (or encoded bytes, which `decode` turns into uint8) in [0, 255]; resizing
ops return float32 in the same range; `value_range` maps [0, 255] to the requested range. The
iterator casts the result to float32 and adds the one-hot label (from the source's class count).
"""
import ast
import dataclasses
import inspect
import math
import re
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Op:
  """One preprocessing op: `fn(images (B, H, W, C), u (B, num_random)) -> images`."""
  name: str
  fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
  num_random: int = 0


def _pair(size) -> Tuple[int, int]:
  if isinstance(size, int):
    return size, size
  if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
    return tuple(size)
  raise ValueError(f"size must be an int or a pair of ints, got {size!r}")


def _hw(x: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(x)
  return shape[1], shape[2]


def _crop(x: tf.Tensor, oy: tf.Tensor, ox: tf.Tensor, h: int, w: int) -> tf.Tensor:
  """Per-example crops of a fixed size at offsets oy, ox (B,) by gathering rows and columns."""
  rows = oy[:, None] + tf.range(h)[None]  # (B, h)
  cols = ox[:, None] + tf.range(w)[None]  # (B, w)
  x = tf.gather(x, rows, axis=1, batch_dims=1)  # (B, h, W, C)
  return tf.gather(x, cols, axis=2, batch_dims=1)  # (B, h, w, C)


def decode(channels: Optional[int] = None) -> Op:
  """Decodes encoded images (PNG/JPEG/...) to uint8 with `channels` channels (default: the
  source's, so grayscale stays one channel); a no-op for images that are already arrays."""
  def fn(x, u):
    del u
    if x.dtype != tf.string:
      return x
    if channels is None:
      raise ValueError("decode needs the channel count (the pipeline passes the source's).")
    # Encoded images come one at a time (batch of one; see the module docstring).
    img = tf.io.decode_image(x[0], channels=channels, expand_animations=False)
    return img[None]
  return Op("decode", fn)


def resize(size, method: str = "bilinear", antialias: bool = False) -> Op:
  """Resizes to `size` (int or (h, w)); float32 output in the input's value range."""
  h, w = _pair(size)
  return Op("resize", lambda x, u: tf.image.resize(x, (h, w), method=method, antialias=antialias))


def central_crop(size) -> Op:
  """Crops the central `size` (int or (h, w)) window."""
  h, w = _pair(size)

  def fn(x, u):
    del u
    ih, iw = _hw(x)
    with tf.control_dependencies([tf.debugging.assert_greater_equal(
        tf.stack([ih, iw]), tf.constant([h, w]),
        message=f"central_crop({h}, {w}): image smaller than the crop; resize first")]):
      oy, ox = (ih - h) // 2, (iw - w) // 2
    out = x[:, oy:oy + h, ox:ox + w, :]
    out.set_shape([x.shape[0], h, w, x.shape[3]])
    return out
  return Op("central_crop", fn)


def random_crop(size, pad: int = 0, mode: str = "constant") -> Op:
  """Pads each side by `pad` (zeros, or mode="reflect"), then crops `size` at a uniformly random
  position: the classic CIFAR / Fashion-MNIST augmentation."""
  h, w = _pair(size)
  if mode not in ("constant", "reflect", "symmetric"):
    raise ValueError(f"random_crop mode must be constant, reflect or symmetric, got {mode!r}")

  def fn(x, u):  # u (B, 2)
    if pad:
      x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode=mode.upper())
    ih, iw = _hw(x)
    with tf.control_dependencies([tf.debugging.assert_greater_equal(
        tf.stack([ih, iw]), tf.constant([h, w]),
        message=f"random_crop({h}, {w}): image (after padding) smaller than the crop")]):
      oy = tf.cast(u[:, 0] * tf.cast(ih - h + 1, tf.float32), tf.int32)
      ox = tf.cast(u[:, 1] * tf.cast(iw - w + 1, tf.float32), tf.int32)
    oy, ox = tf.minimum(oy, ih - h), tf.minimum(ox, iw - w)
    return _crop(x, oy, ox, h, w)
  return Op("random_crop", fn, num_random=2)


def flip_lr() -> Op:
  """Mirrors left-right with probability 1/2."""
  def fn(x, u):  # u (B, 1)
    return tf.where((u[:, 0] < 0.5)[:, None, None, None], tf.reverse(x, axis=[2]), x)
  return Op("flip_lr", fn, num_random=1)


def random_resized_crop(size, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3), attempts: int = 10) -> Op:
  """Crops a random window with area in `scale` (fraction of the image) and aspect ratio (w/h) in
  `ratio` (log-uniform), resized (bilinear) to `size`.

  Sampling as torchvision's RandomResizedCrop: up to `attempts` proposals, the first that fits
  wins; if none fits, the central crop with the ratio clamped to `ratio`. Vectorised over the
  batch with tf.image.crop_and_resize (box corners on pixel centres).
  """
  oh, ow = _pair(size)
  (s0, s1), (r0, r1) = scale, ratio
  if not (0 < s0 <= s1 <= 1 and 0 < r0 <= r1):
    raise ValueError(f"random_resized_crop needs 0 < scale[0] <= scale[1] <= 1 and "
                     f"0 < ratio[0] <= ratio[1], got scale={scale}, ratio={ratio}")
  lr0, lr1 = math.log(r0), math.log(r1)

  def fn(x, u):  # u (B, 2 * attempts + 2)
    ih, iw = _hw(x)
    fh, fw = tf.cast(ih, tf.float32), tf.cast(iw, tf.float32)
    area = fh * fw
    target = area * (s0 + (s1 - s0) * u[:, :attempts])  # (B, attempts)
    ar = tf.exp(lr0 + (lr1 - lr0) * u[:, attempts:2 * attempts])
    cw, ch = tf.round(tf.sqrt(target * ar)), tf.round(tf.sqrt(target / ar))
    ok = (cw > 0) & (ch > 0) & (cw <= fw) & (ch <= fh)
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)  # (B,)
    found = tf.reduce_any(ok, axis=1)
    cw, ch = tf.gather(cw, first, batch_dims=1), tf.gather(ch, first, batch_dims=1)
    # Fallback: whole image with the ratio clamped into [r0, r1], centred.
    in_ratio = fw / fh
    fb_w = tf.where(in_ratio < r0, fw, tf.where(in_ratio > r1, tf.round(fh * r1), fw))
    fb_h = tf.where(in_ratio < r0, tf.round(fw / r0), fh)
    cw, ch = tf.where(found, cw, fb_w), tf.where(found, ch, fb_h)
    y = tf.where(found, tf.floor(u[:, -2] * (fh - ch + 1)), tf.floor((fh - ch) / 2))
    x0 = tf.where(found, tf.floor(u[:, -1] * (fw - cw + 1)), tf.floor((fw - cw) / 2))
    y, x0 = tf.minimum(y, fh - ch), tf.minimum(x0, fw - cw)
    dy, dx = tf.maximum(fh - 1, 1.0), tf.maximum(fw - 1, 1.0)
    boxes = tf.stack([y / dy, x0 / dx, (y + ch - 1) / dy, (x0 + cw - 1) / dx], axis=1)
    b = tf.shape(x)[0]
    return tf.image.crop_and_resize(tf.cast(x, tf.float32), boxes, tf.range(b), (oh, ow))
  return Op("random_resized_crop", fn, num_random=2 * attempts + 2)


def inception_crop(size, area_min: float = 5, area_max: float = 100) -> Op:
  """big_vision's name and arguments (area in percent): random_resized_crop with
  scale=(area_min / 100, area_max / 100) and ratio (3/4, 4/3)."""
  op = random_resized_crop(size, scale=(area_min / 100, area_max / 100))
  return dataclasses.replace(op, name="inception_crop")


def value_range(lo: float = -1.0, hi: float = 1.0, in_min: float = 0.0, in_max: float = 255.0,
                clip_values: bool = False) -> Op:
  """Maps [in_min, in_max] linearly to [lo, hi] (float32)."""
  def fn(x, u):
    del u
    x = tf.cast(x, tf.float32)
    if clip_values:
      x = tf.clip_by_value(x, in_min, in_max)
    return lo + (x - in_min) * ((hi - lo) / (in_max - in_min))
  return Op("value_range", fn)


# The one table of ops; nothing is registered anywhere else.
OPS = {
    "decode": decode,
    "resize": resize,
    "central_crop": central_crop,
    "random_crop": random_crop,
    "flip_lr": flip_lr,
    "random_resized_crop": random_resized_crop,
    "inception_crop": inception_crop,
    "value_range": value_range,
}

_OP_RE = re.compile(r"^(?P<name>\w+)(\((?P<args>.*)\))?$", re.S)


def parse(pp: str, *, channels: Optional[int] = None) -> List[Op]:
  """Parses "op1(args)|op2|..." into Ops. `channels` is the default for `decode`.

  ValueError naming the offending piece for an unknown op (listing the known ones) or bad args.
  """
  ops = []
  for piece in (p.strip() for p in pp.split("|")):
    m = _OP_RE.match(piece)
    if not m:
      raise ValueError(f"Cannot parse pp op {piece!r} in {pp!r}; expected name or name(args).")
    name = m.group("name")
    if name not in OPS:
      raise ValueError(f"Unknown pp op {name!r} in {pp!r}; known ops: {', '.join(sorted(OPS))}. "
                       "(onehot is added by the iterator from the source's class count.)")
    try:
      call = ast.parse(f"f({m.group('args') or ''})", mode="eval").body
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f"Cannot parse the arguments of pp op {piece!r} (literals only): "
                       f"{e}") from None
    if name == "decode" and not args:
      kwargs.setdefault("channels", channels)
    factory = OPS[name]
    try:
      inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
      raise ValueError(f"Bad arguments for pp op {piece!r}: {e}; signature: "
                       f"{name}{inspect.signature(factory)}") from None
    ops.append(factory(*args, **kwargs))
  return ops


def num_random(ops: Sequence[Op]) -> int:
  return sum(op.num_random for op in ops)


def apply(ops: Sequence[Op], images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
  """Runs `ops` on images (B, H, W, C) with u (B, num_random(ops)); returns float32."""
  col = 0
  for op in ops:
    if images.dtype == tf.string and op.name != "decode":
      raise ValueError(f"pp op {op.name!r} got encoded images; start the pp string with 'decode'.")
    images = op.fn(images, u[:, col:col + op.num_random])
    col += op.num_random
  if images.dtype == tf.string:
    raise ValueError("The pp string leaves images encoded; add 'decode'.")
  return tf.cast(images, tf.float32)
