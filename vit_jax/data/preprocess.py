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
import functools
import inspect
import math
import re
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf

from vit_jax import errors


@dataclasses.dataclass(frozen=True)
class Op:
  """One preprocessing op: `fn(images (B, H, W, C), u (B, num_random)) -> images`."""
  name: str
  fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
  num_random: int = 0
  # Crop ops whose window is known before decoding: `(encoded (1,), u (1, num_random), channels)
  # -> images (1, h, w, C)`, the same result as decode then `fn`. `parse` fuses "decode|<op>" into
  # one op with it, so that JPEGs decode only the crop (tf.image.decode_and_crop_jpeg).
  decode_and_crop: Optional[Callable[[tf.Tensor, tf.Tensor, int], tf.Tensor]] = None


def _pair(size) -> Tuple[int, int]:
  if isinstance(size, int):
    return size, size
  if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
    return tuple(size)
  raise errors.ConfigError(f"size must be an int or a pair of ints, got {size!r}")


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
  source's, so grayscale stays one channel); a no-op for images that are already arrays.
  Followed by inception_crop or random_resized_crop, `parse` fuses the two ("decode_and_crop"):
  JPEGs then decode only the crop's window."""
  def fn(x, u):
    del u
    if x.dtype != tf.string:
      return x
    if channels is None:
      raise errors.ConfigError("decode needs the channel count (the pipeline passes the source's).")
    # Encoded images come one at a time (batch of one; see the module docstring).
    img = tf.io.decode_image(x[0], channels=channels, expand_animations=False)
    return img[None]
  return Op("decode", fn)


def _decode_window(x, u, channels, window, crop_fn, size) -> tf.Tensor:
  """Decode then crop_fn, for one encoded image x (1,); JPEGs decode only `window(h, w, u)`.

  The window comes from the JPEG header's size, so it is the one crop_fn picks on the decoded
  image; resizing the decoded window corner to corner samples the same points as crop_fn's box.
  Other formats (PNG, ...) and already-decoded images go through crop_fn unchanged.
  """
  if x.dtype != tf.string:
    return crop_fn(x, u)
  if channels is None:
    raise errors.ConfigError("decode needs the channel count (the pipeline passes the source's).")
  data = x[0]

  def jpeg():
    hwc = tf.image.extract_jpeg_shape(data)
    y, x0, ch, cw = window(tf.cast(hwc[0], tf.float32), tf.cast(hwc[1], tf.float32), u)
    crop = tf.cast(tf.stack([y[0], x0[0], ch[0], cw[0]]), tf.int32)
    img = tf.image.decode_and_crop_jpeg(data, crop, channels=channels)
    # Corner to corner (crop_and_resize's box [0, 0, 1, 1] can overshoot the last pixel by an ulp
    # and sample its zero extrapolation); the caller leaves sizes of 1 unfused.
    return tf.raw_ops.ResizeBilinear(images=img[None], size=size, align_corners=True,
                                     half_pixel_centers=False)

  def other():
    img = tf.io.decode_image(data, channels=channels, expand_animations=False)
    return crop_fn(img[None], u)
  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def resize(size, method: str = "bilinear", antialias: bool = False) -> Op:
  """Resizes to `size` (int or (h, w)); float32 output in the input's value range."""
  h, w = _pair(size)
  return Op("resize", lambda x, u: tf.image.resize(x, (h, w), method=method, antialias=antialias))


def resize_small(size: int, method: str = "area", antialias: bool = False) -> Op:
  """big_vision's resize_small: resizes so that the shorter side is `size`, keeping the aspect
  ratio (the other side rounded), e.g. "decode|resize_small(256)|central_crop(224)" for eval.
  Default method "area" as big_vision's; float32 output in the input's value range."""
  if not isinstance(size, int) or size <= 0:
    raise errors.ConfigError(f"resize_small needs a positive int size, got {size!r}")

  def new_size(h, w):
    ratio = size / tf.minimum(h, w)
    return (tf.cast(tf.round(h * ratio), tf.int32), tf.cast(tf.round(w * ratio), tf.int32))

  def fn(x, u):
    del u
    if x.shape[1] is not None and x.shape[2] is not None:  # fixed shapes: a static output shape
      h, w = x.shape[1], x.shape[2]
      hw = (round(h * size / min(h, w)), round(w * size / min(h, w)))
    else:
      ih, iw = _hw(x)
      hw = new_size(tf.cast(ih, tf.float64), tf.cast(iw, tf.float64))
    return tf.image.resize(x, hw, method=method, antialias=antialias)
  return Op("resize_small", fn)


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
    raise errors.ConfigError(
        f"random_crop mode must be constant, reflect or symmetric, got {mode!r}")

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
  batch with tf.image.crop_and_resize (box corners on pixel centres). After `decode`, JPEGs
  decode only the window (see `Op.decode_and_crop`): the same window and output pixels.
  """
  oh, ow = _pair(size)
  (s0, s1), (r0, r1) = scale, ratio
  if not (0 < s0 <= s1 <= 1 and 0 < r0 <= r1):
    raise errors.ConfigError(f"random_resized_crop needs 0 < scale[0] <= scale[1] <= 1 and "
                             f"0 < ratio[0] <= ratio[1], got scale={scale}, ratio={ratio}")
  lr0, lr1 = math.log(r0), math.log(r1)

  def window(fh, fw, u):  # image height, width (float32 scalars), u (B, 2 * attempts + 2)
    """The crop (y, x, h, w) of each example: float32 (B,) whole numbers inside the image."""
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
    return tf.minimum(y, fh - ch), tf.minimum(x0, fw - cw), ch, cw

  def fn(x, u):  # u (B, 2 * attempts + 2)
    ih, iw = _hw(x)
    fh, fw = tf.cast(ih, tf.float32), tf.cast(iw, tf.float32)
    y, x0, ch, cw = window(fh, fw, u)
    dy, dx = tf.maximum(fh - 1, 1.0), tf.maximum(fw - 1, 1.0)
    boxes = tf.stack([y / dy, x0 / dx, (y + ch - 1) / dy, (x0 + cw - 1) / dx], axis=1)
    b = tf.shape(x)[0]
    return tf.image.crop_and_resize(tf.cast(x, tf.float32), boxes, tf.range(b), (oh, ow))

  def decode_and_crop(x, u, channels):
    return _decode_window(x, u, channels, window, fn, (oh, ow))
  return Op("random_resized_crop", fn, num_random=2 * attempts + 2,  # size 1: the box's centre
            decode_and_crop=decode_and_crop if min(oh, ow) > 1 else None)


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


# RandAugment (Cubuk et al. 2019, https://arxiv.org/abs/1909.13719). The op list, its order and
# the magnitude mapping are those of big_vision's pp/autoaugment.py
# (`distort_image_with_randaugment`: 16 ops, each layer applies one chosen uniformly, always, at
# the fixed magnitude M on a 0..10 scale). Pixel semantics follow PIL's ImageOps/ImageEnhance.
RANDAUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")
_RA_RANDOM = 4  # uniforms per layer: the op, the sign of signed magnitudes, cutout's centre y, x
_RA_FILL = 128.0  # what geometric ops and Cutout put where there is no image


def _ra_blend(degenerate, x, factor: float):
  """PIL's ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 255], truncated
  to integers (as a uint8 cast)."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (x - degenerate), 0.0, 255.0))


def _ra_gray(x):
  """PIL's convert("L") (ITU-R 601-2 luma, rounded) as (n, H, W, 1); grayscale as it is."""
  if x.shape[-1] == 1:
    return x
  return tf.floor(tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True) + 0.5)


def _ra_transform(x, transforms):
  """Per-example projective transforms (n, 8), output pixel -> input pixel; nearest neighbour,
  _RA_FILL outside the image."""
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=x, transforms=transforms, output_shape=tf.shape(x)[1:3],
      fill_value=tf.constant(_RA_FILL), interpolation="NEAREST", fill_mode="CONSTANT")


def _ra_autocontrast(x):
  lo = tf.reduce_min(x, axis=[1, 2], keepdims=True)
  hi = tf.reduce_max(x, axis=[1, 2], keepdims=True)
  # Divided last: exact where the quotient is a whole number (the top value maps to 255).
  scaled = tf.floor(tf.clip_by_value((x - lo) * 255.0 / tf.maximum(hi - lo, 1.0), 0.0, 255.0))
  return tf.where(hi > lo, scaled, x)


def _ra_equalize(x):
  """PIL's ImageOps.equalize per example and channel: a lookup table from the histogram."""
  n, h, w, c = tf.shape(x)[0], tf.shape(x)[1], tf.shape(x)[2], tf.shape(x)[3]
  flat = tf.reshape(tf.transpose(tf.cast(x, tf.int32), [0, 3, 1, 2]), [n * c, h * w])
  hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)  # (n * c, 256)
  last = tf.gather(hist, tf.reduce_max(flat, axis=1), batch_dims=1)  # count of the top value
  step = (h * w - last) // 255  # (n * c,)
  safe = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(hist, axis=1) + step[:, None] // 2) // safe
  lut = tf.clip_by_value(tf.concat([tf.zeros_like(lut[:, :1]), lut[:, :-1]], 1), 0, 255)
  out = tf.where((step > 0)[:, None], tf.gather(lut, flat, batch_dims=1), flat)
  return tf.transpose(tf.reshape(tf.cast(out, tf.float32), [n, c, h, w]), [0, 2, 3, 1])


def _ra_sharpness(x, factor: float):
  """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (borders kept)."""
  c = x.shape[-1]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")
  smooth = tf.floor(tf.clip_by_value(smooth, 0.0, 255.0) + 0.5)
  pad = [[0, 0], [1, 1], [1, 1], [0, 0]]
  inner = tf.pad(tf.ones_like(smooth), pad) > 0
  return _ra_blend(tf.where(inner, tf.pad(smooth, pad), x), x, factor)


def _ra_cutout(x, centre, pad: int):
  """A (2 pad)-sided square of _RA_FILL centred at a uniform pixel (clipped at the borders)."""
  h, w = tf.shape(x)[1], tf.shape(x)[2]
  cy = tf.minimum(tf.cast(centre[:, 0] * tf.cast(h, tf.float32), tf.int32), h - 1)
  cx = tf.minimum(tf.cast(centre[:, 1] * tf.cast(w, tf.float32), tf.int32), w - 1)
  ys, xs = tf.range(h)[None], tf.range(w)[None]
  in_y = (ys >= cy[:, None] - pad) & (ys < cy[:, None] + pad)  # (n, H)
  in_x = (xs >= cx[:, None] - pad) & (xs < cx[:, None] + pad)  # (n, W)
  mask = in_y[:, :, None, None] & in_x[:, None, :, None]
  return tf.where(mask, _RA_FILL, x)


def random_erase(probability: float = 0.25, area: Sequence[float] = (0.02, 1 / 3),
                 aspect: Sequence[float] = (0.3, 1 / 0.3), value: float = 0.0) -> Op:
  """Random erasing (Zhong et al. 2020), as DeiT trains with it (probability 0.25): with
  `probability`, a rectangle with a uniform fraction `area` of the image and a log-uniform aspect
  ratio (h/w) in `aspect` is set to `value`, at a uniform position where it fits (its sides
  clipped to the image). `value` is in the range the images have at this point of the chain:
  after value_range(-1,1), 0 is mid-grey (timm's "const" mode; DeiT's "pixel" mode fills with
  per-pixel noise instead)."""
  lo, hi = float(area[0]), float(area[1])
  if not 0.0 <= probability <= 1.0:
    raise errors.ConfigError(f"random_erase probability must be in [0, 1], got {probability}")
  if not 0.0 < lo <= hi <= 1.0:
    raise errors.ConfigError(f"random_erase area must be 0 < min <= max <= 1, got {area!r}")
  log_a0, log_a1 = math.log(aspect[0]), math.log(aspect[1])

  def fn(x, u):  # u (B, 5): apply?, area, aspect, y, x
    h, w = _hw(x)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    target = (lo + u[:, 1] * (hi - lo)) * hf * wf
    ratio = tf.exp(log_a0 + u[:, 2] * (log_a1 - log_a0))
    eh = tf.clip_by_value(tf.round(tf.sqrt(target * ratio)), 1.0, hf)
    ew = tf.clip_by_value(tf.round(tf.sqrt(target / ratio)), 1.0, wf)
    oy = tf.floor(u[:, 3] * (hf - eh + 1.0))
    ox = tf.floor(u[:, 4] * (wf - ew + 1.0))
    ys = tf.range(hf)[None]
    xs = tf.range(wf)[None]
    in_y = (ys >= oy[:, None]) & (ys < (oy + eh)[:, None])
    in_x = (xs >= ox[:, None]) & (xs < (ox + ew)[:, None])
    mask = in_y[:, :, None, None] & in_x[:, None, :, None] & (
        u[:, 0] < probability)[:, None, None, None]
    return tf.where(mask, tf.cast(value, x.dtype), x)
  return Op("random_erase", fn, num_random=5)


def randaugment(num_layers: int = 2, magnitude: float = 10, translate_const: float = 100,
                cutout_const: float = 40) -> Op:
  """RandAugment: `num_layers` times, each example gets one of RANDAUGMENT_OPS chosen uniformly,
  at `magnitude` M (0..10 is the paper's range; more is allowed).

  Magnitude mapping (big_vision's pp/autoaugment.py; "+-": a random sign per example):
  Rotate +-30 M/10 degrees; ShearX/Y +-0.3 M/10; TranslateX/Y +-translate_const M/10 pixels
  (100 as in big_vision's RandAugment, sized for 224px images; set it for small images);
  Color, Contrast, Brightness, Sharpness factor 0.1 + 1.8 M/10; Posterize to int(4 M/10) bits;
  Solarize above int(256 M/10); SolarizeAdd int(110 M/10) below 128; Cutout a square of side
  2 int(cutout_const M/10); AutoContrast, Equalize, Invert take none. Empty pixels are 128.

  Input in [0, 255] (uint8, or float from a resize: rounded first); every op returns integers in
  [0, 255], uint8 for uint8 input, else float32. Each example depends only on its own u row (4
  per layer): the batch is split by chosen op (tf.dynamic_partition), each op runs on its part
  and the parts are stitched back. Images need 1 or 3 channels (Color and Contrast use the luma
  of RGB; on grayscale, Color is the identity).
  """
  if not (isinstance(num_layers, int) and num_layers >= 0 and magnitude >= 0):
    raise errors.ConfigError(f"randaugment needs an int num_layers >= 0 and magnitude >= 0, got "
                             f"num_layers={num_layers!r}, magnitude={magnitude!r}")
  m = magnitude / 10.0
  degrees, shear, pixels = 30.0 * m, 0.3 * m, float(translate_const) * m
  factor = 0.1 + 1.8 * m
  bits = min(max(int(4 * m), 0), 8)
  threshold, addition, pad = int(256 * m), int(110 * m), int(cutout_const * m)
  post = float(2 ** (8 - bits))

  def shift(x, s, dx, dy):  # output (x, y) <- input (x + dx s, y + dy s)
    one, zero = tf.ones_like(s), tf.zeros_like(s)
    return _ra_transform(x, tf.stack([one, zero, dx * s, zero, one, dy * s, zero, zero], 1))

  def shear_op(x, s, along_x):
    one, zero = tf.ones_like(s), tf.zeros_like(s)
    row = [one, s, zero, zero, one, zero] if along_x else [one, zero, zero, s, one, zero]
    return _ra_transform(x, tf.stack(row + [zero, zero], 1))

  def rotate(x, sign):  # counter-clockwise by sign * degrees about the image centre
    h, w = tf.cast(tf.shape(x)[1], tf.float32), tf.cast(tf.shape(x)[2], tf.float32)
    a = sign * (degrees * math.pi / 180.0)
    cos, sin, zero = tf.cos(a), tf.sin(a), tf.zeros_like(a)
    ox = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2
    oy = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2
    return _ra_transform(x, tf.stack([cos, -sin, ox, sin, cos, oy, zero, zero], 1))

  table = {  # name -> fn(x (n, H, W, C) float, sign (n,), centre (n, 2))
      "AutoContrast": lambda x, s, c: _ra_autocontrast(x),
      "Equalize": lambda x, s, c: _ra_equalize(x),
      "Invert": lambda x, s, c: 255.0 - x,
      "Rotate": lambda x, s, c: rotate(x, s),
      "Posterize": lambda x, s, c: tf.floor(x / post) * post if bits < 8 else x,
      "Solarize": lambda x, s, c: tf.where(x < threshold, x, 255.0 - x),
      "Color": lambda x, s, c: _ra_blend(_ra_gray(x), x, factor),
      "Contrast": lambda x, s, c: _ra_blend(
          tf.floor(tf.reduce_mean(_ra_gray(x), axis=[1, 2, 3], keepdims=True) + 0.5), x, factor),
      "Brightness": lambda x, s, c: _ra_blend(0.0, x, factor),
      "Sharpness": lambda x, s, c: _ra_sharpness(x, factor),
      "ShearX": lambda x, s, c: shear_op(x, s * shear, True),
      "ShearY": lambda x, s, c: shear_op(x, s * shear, False),
      "TranslateX": lambda x, s, c: shift(x, s * pixels, 1.0, 0.0),
      "TranslateY": lambda x, s, c: shift(x, s * pixels, 0.0, 1.0),
      "Cutout": lambda x, s, c: _ra_cutout(x, c, pad),
      "SolarizeAdd": lambda x, s, c: tf.where(x < 128.0, tf.minimum(x + addition, 255.0), x),
  }
  fns = [table[name] for name in RANDAUGMENT_OPS]
  k = len(fns)

  @tf.autograph.experimental.do_not_convert  # plain graph code; autograph only slows tracing
  def fn(x, u):  # u (B, 4 * num_layers)
    if x.shape[-1] not in (1, 3):
      raise errors.ConfigError(
          f"randaugment needs images with 1 or 3 channels, got shape {x.shape}")
    dtype = x.dtype
    out = tf.clip_by_value(tf.round(tf.cast(x, tf.float32)), 0.0, 255.0)
    rows = tf.range(tf.shape(out)[0])
    for layer in range(num_layers):
      v = u[:, _RA_RANDOM * layer:_RA_RANDOM * (layer + 1)]
      which = tf.minimum(tf.cast(v[:, 0] * k, tf.int32), k - 1)
      sign = tf.where(v[:, 1] < 0.5, -1.0, 1.0)
      parts = zip(*(tf.dynamic_partition(t, which, k) for t in (out, sign, v[:, 2:], rows)))
      outs, where = [], []
      for f, (xi, si, ci, ri) in zip(fns, parts):
        outs.append(f(xi, si, ci))
        where.append(ri)
      out = tf.ensure_shape(tf.dynamic_stitch(where, outs), x.shape)
    return tf.cast(out, tf.uint8) if dtype == tf.uint8 else out
  return Op("randaugment", fn, num_random=_RA_RANDOM * num_layers)


def randaug(num_layers: int = 2, magnitude: float = 10, translate_const: float = 100,
            cutout_const: float = 40) -> Op:
  """big_vision's name for randaugment."""
  return dataclasses.replace(randaugment(num_layers, magnitude, translate_const, cutout_const),
                             name="randaug")


# The one table of ops; nothing is registered anywhere else.
OPS = {
    "decode": decode,
    "resize": resize,
    "resize_small": resize_small,
    "central_crop": central_crop,
    "random_crop": random_crop,
    "flip_lr": flip_lr,
    "random_resized_crop": random_resized_crop,
    "inception_crop": inception_crop,
    "value_range": value_range,
    "randaugment": randaugment,
    "randaug": randaug,
    "random_erase": random_erase,
}

# parse fuses "decode|<crop op with decode_and_crop>" into one op; False turns that off (the
# benchmark's decode-then-crop baseline).
FUSE_DECODE_CROP = True

_OP_RE = re.compile(r"^(?P<name>\w+)(\((?P<args>.*)\))?$", re.S)


def parse(pp: str, *, channels: Optional[int] = None) -> List[Op]:
  """Parses "op1(args)|op2|..." into Ops. `channels` is the default for `decode`.

  ValueError naming the offending piece for an unknown op (listing the known ones) or bad args.
  "decode" directly followed by a crop op that can crop while decoding (inception_crop,
  random_resized_crop) becomes one op "decode_and_crop" (see `Op.decode_and_crop`).
  """
  ops = []
  decode_channels = channels
  for piece in (p.strip() for p in pp.split("|")):
    m = _OP_RE.match(piece)
    if not m:
      raise errors.ConfigError(
          f"Cannot parse pp op {piece!r} in {pp!r}; expected name or name(args).")
    name = m.group("name")
    if name not in OPS:
      raise errors.ConfigError(
          f"Unknown pp op {name!r} in {pp!r}; known ops: {', '.join(sorted(OPS))}. "
          "(onehot is added by the iterator from the source's class count.)")
    try:
      call = ast.parse(f"f({m.group('args') or ''})", mode="eval").body
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise errors.ConfigError(f"Cannot parse the arguments of pp op {piece!r} (literals only): "
                               f"{e}") from None
    if name == "decode" and not args:
      kwargs.setdefault("channels", channels)
    factory = OPS[name]
    try:
      inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
      raise errors.ConfigError(f"Bad arguments for pp op {piece!r}: {e}; signature: "
                               f"{name}{inspect.signature(factory)}") from None
    op = factory(*args, **kwargs)
    if name == "decode":
      decode_channels = inspect.signature(factory).bind(*args, **kwargs).arguments.get("channels")
    elif (op.decode_and_crop is not None and FUSE_DECODE_CROP and ops and
          ops[-1].name == "decode"):
      fused = functools.partial(op.decode_and_crop, channels=decode_channels)
      ops[-1] = Op("decode_and_crop", lambda x, u, fused=fused: fused(x, u), op.num_random)
      continue
    ops.append(op)
  return ops


def num_random(ops: Sequence[Op]) -> int:
  return sum(op.num_random for op in ops)


def apply(ops: Sequence[Op], images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
  """Runs `ops` on images (B, H, W, C) with u (B, num_random(ops)); returns float32."""
  col = 0
  for op in ops:
    if images.dtype == tf.string and op.name not in ("decode", "decode_and_crop"):
      raise errors.ConfigError(
          f"pp op {op.name!r} got encoded images; start the pp string with 'decode'.")
    images = op.fn(images, u[:, col:col + op.num_random])
    col += op.num_random
  if images.dtype == tf.string:
    raise errors.ConfigError("The pp string leaves images encoded; add 'decode'.")
  return tf.cast(images, tf.float32)


def output_shape(pp: str, image_shape: Sequence[Optional[int]], *, encoded: bool
                 ) -> Tuple[int, int, int]:
  """(H, W, C) of the images `pp` makes from a source's images of `image_shape` (None where
  sizes vary; `encoded`: the source stores encoded bytes), found by running the ops on blank
  images. Sizes that vary must be fixed by the ops: two input sizes giving two output shapes
  raise ValueError."""
  channels = int(image_shape[-1])
  ops = parse(pp, channels=channels)
  sizes = [(image_shape[0], image_shape[1])] if None not in image_shape[:2] else [
      (375, 500), (480, 320)]  # ImageNet-like sizes for a data set whose sizes vary
  shapes = set()
  for h, w in sizes:
    x = tf.zeros((h, w, channels), tf.uint8)
    images = tf.io.encode_png(x)[None] if encoded else x[None]
    u = tf.fill((1, num_random(ops)), 0.5)
    shapes.add(tuple(int(d) for d in apply(ops, images, u).shape[1:]))
  if len(shapes) > 1:
    raise errors.ConfigError(
        f"The pp string {pp!r} leaves the image size to the data "
        f"(outputs {sorted(shapes)} from two input sizes): add a resize or crop op.")
  return shapes.pop()
