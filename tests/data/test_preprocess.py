"""Preprocessing ops on batches, and the pp-string parser."""
import numpy as np
import pytest
import tensorflow as tf

from vit_jax.data import preprocess


def _run(pp, images, u=None, channels=1):
  ops = preprocess.parse(pp, channels=channels)
  k = preprocess.num_random(ops)
  if u is None:
    u = np.random.default_rng(0).random((len(images), k), dtype=np.float32)
  return preprocess.apply(ops, tf.constant(images), tf.constant(u, tf.float32)).numpy()


def _images(b=4, h=6, w=5, c=1, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)


def test_value_range_and_float_output():
  x = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
  np.testing.assert_allclose(_run("value_range(-1, 1)", x).ravel(), [-1, 51 / 127.5 - 1, 1],
                             rtol=1e-6)
  np.testing.assert_allclose(_run("value_range(0, 1)", x).ravel(), [0, 0.2, 1], rtol=1e-6)
  assert _run("decode", x).dtype == np.float32


def test_random_crop_is_a_window_of_the_padded_image():
  x = _images()
  u = np.array([[0, 0], [0.999, 0.999], [0.5, 0.2], [0.3, 0.9]], np.float32)
  out = _run("random_crop((6, 5), pad=2)", x, u)
  padded = np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
  # Offsets floor(u * (padded - crop + 1)) = floor(u * 5).
  for i, (uy, ux) in enumerate(u):
    oy, ox = int(uy * 5), int(ux * 5)
    np.testing.assert_array_equal(out[i], padded[i, oy:oy + 6, ox:ox + 5])
  assert oy == 1 and ox == 4  # the last row of u: the offsets differ per example


def test_flip_lr_per_example():
  x = _images()
  out = _run("flip_lr", x, np.array([[0.1], [0.9], [0.49], [0.5]], np.float32))
  np.testing.assert_array_equal(out[0], x[0, :, ::-1])
  np.testing.assert_array_equal(out[1], x[1])
  np.testing.assert_array_equal(out[2], x[2, :, ::-1])
  np.testing.assert_array_equal(out[3], x[3])


def test_central_crop_and_resize():
  x = _images(h=7, w=6)
  np.testing.assert_array_equal(_run("central_crop(4)", x), x[:, 1:5, 1:5])
  np.testing.assert_array_equal(_run("central_crop((3, 2))", x), x[:, 2:5, 2:4])
  out = _run("resize(12)", x)
  assert out.shape == (4, 12, 12, 1)
  np.testing.assert_allclose(_run("resize((7, 6))", x), x)  # same size: identity
  with pytest.raises(tf.errors.InvalidArgumentError, match="smaller than the crop"):
    _run("central_crop(8)", x)


def test_random_resized_crop_full_window_is_identity():
  x = _images(h=8, w=8)
  out = _run("random_resized_crop(8, scale=(1, 1), ratio=(1, 1))", x)
  np.testing.assert_allclose(out, x, atol=1e-4)


def test_random_resized_crop_takes_windows_of_the_right_area():
  # A ramp image: the crop's corners tell where the box was.
  h = w = 64
  ramp = np.broadcast_to(np.arange(w, dtype=np.uint8)[None, :, None], (h, w, 1))
  x = np.stack([ramp] * 64)
  out = _run("random_resized_crop(16, scale=(0.25, 0.25), ratio=(1, 1))", x)
  assert out.shape == (64, 16, 16, 1)
  widths = out[:, 0, -1, 0] - out[:, 0, 0, 0] + 1  # columns spanned by the crop
  np.testing.assert_allclose(widths, 32, atol=1e-3)  # sqrt(0.25 * 64 * 64)
  assert len(np.unique(out[:, 0, 0, 0])) > 10  # positions vary with u


def test_random_resized_crop_falls_back_to_centre():
  # No proposal fits a 40x4 image with ratio in [1, 1] and area >= 0.9: centre crop with the
  # ratio clamped to 1, i.e. the central 4x4.
  x = _images(b=2, h=40, w=4)
  out = _run("random_resized_crop(4, scale=(0.9, 1.0), ratio=(1, 1))", x)
  np.testing.assert_allclose(out, x[:, 18:22], atol=1e-4)


def test_inception_crop_is_random_resized_crop_in_percent():
  x = _images(h=20, w=20)
  u = np.random.default_rng(1).random((4, 22), dtype=np.float32)
  np.testing.assert_array_equal(
      _run("inception_crop(10, area_min=20, area_max=60)", x, u),
      _run("random_resized_crop(10, scale=(0.2, 0.6))", x, u))


def test_decode_png_keeps_one_channel_and_is_a_no_op_for_arrays():
  img = _images(b=1, h=5, w=7)[0]
  png = tf.io.encode_png(img)
  out = _run("decode|value_range(0, 255)", tf.stack([png]).numpy(), np.zeros((1, 0)))
  np.testing.assert_array_equal(out[0], img)
  rgb = _run("decode", tf.stack([png]).numpy(), np.zeros((1, 0)), channels=3)
  assert rgb.shape == (1, 5, 7, 3)


def test_unknown_op_and_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"Unknown pp op 'rotate'.*known ops: central_crop, decode"):
    preprocess.parse("decode|rotate(10)")
  with pytest.raises(ValueError, match=r"Bad arguments for pp op 'resize\(32, foo=1\)'"):
    preprocess.parse("resize(32, foo=1)")
  with pytest.raises(ValueError, match=r"literals only"):
    preprocess.parse("resize(size)")
  with pytest.raises(ValueError, match="start the pp string with 'decode'"):
    preprocess.apply(preprocess.parse("flip_lr"), tf.constant([b"x"]), tf.zeros((1, 1)))


def test_parse_counts_random_numbers():
  ops = preprocess.parse("decode|random_crop(28, pad=2)|flip_lr|inception_crop(24)|value_range")
  assert [op.name for op in ops] == ["decode", "random_crop", "flip_lr", "inception_crop",
                                     "value_range"]
  assert preprocess.num_random(ops) == 2 + 1 + 22


# RandAugment: every op against a reference, rows independent, values in [0, 255].

def _ra_u(names, sign=0.9, centre=(0.5, 0.5)):
  """u rows (one layer each) that pick the named ops."""
  k = len(preprocess.RANDAUGMENT_OPS)
  return np.array([[(preprocess.RANDAUGMENT_OPS.index(n) + 0.5) / k, sign, *centre]
                   for n in names], np.float32)


def _ra(x, u, **kw):
  return preprocess.randaugment(**kw).fn(tf.constant(x), tf.constant(u)).numpy()


def _equalize_ref(x):
  """PIL's ImageOps.equalize, per image and channel, in numpy."""
  out = x.copy()
  for i in range(x.shape[0]):
    for c in range(x.shape[-1]):
      ch = x[i, ..., c]
      hist = np.bincount(ch.ravel(), minlength=256)
      step = (hist.sum() - hist[ch.max()]) // 255
      if step:
        lut = np.concatenate([[0], (np.cumsum(hist) + step // 2) // step])[:256]
        out[i, ..., c] = np.clip(lut, 0, 255)[ch]
  return out


def test_randaugment_pixel_ops_match_references():
  names = ["AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
           "Brightness", "Color", "Contrast", "Sharpness"]
  # 24 x 20 pixels: Equalize leaves images of fewer than 256 pixels as they are (as PIL).
  x = np.random.default_rng(3).integers(30, 220, (len(names), 24, 20, 3), dtype=np.uint8)
  out = _ra(x, _ra_u(names), num_layers=1, magnitude=7)  # factor 1.36, 2 bits, 179, +77
  assert out.dtype == np.uint8
  got = dict(zip(names, out))
  xs = dict(zip(names, x.astype(np.int64)))
  a = xs["AutoContrast"]
  lo, hi = a.min((0, 1)), a.max((0, 1))
  np.testing.assert_array_equal(got["AutoContrast"], (a - lo) * 255 // (hi - lo))
  np.testing.assert_array_equal(got["Equalize"], _equalize_ref(x[1:2])[0])
  np.testing.assert_array_equal(got["Invert"], 255 - xs["Invert"])
  np.testing.assert_array_equal(got["Posterize"], xs["Posterize"] & 0b11000000)
  s = xs["Solarize"]
  np.testing.assert_array_equal(got["Solarize"], np.where(s < 179, s, 255 - s))
  s = xs["SolarizeAdd"]
  np.testing.assert_array_equal(got["SolarizeAdd"], np.where(s < 128, np.minimum(s + 77, 255), s))
  bright = x[names.index("Brightness")].astype(np.float32) * np.float32(0.1 + 1.8 * 0.7)
  np.testing.assert_array_equal(got["Brightness"], np.floor(np.clip(bright, 0, 255)))
  for name in names:
    assert not np.array_equal(got[name], xs[name]), name  # every op changed its image


@pytest.mark.parametrize("magnitude", [3, 7, 10])
def test_randaugment_enhance_ops_match_pil(magnitude):
  pytest.importorskip("PIL")
  from PIL import Image, ImageEnhance  # pylint: disable=g-import-not-at-top
  names = ["Color", "Contrast", "Brightness", "Sharpness"]
  x = np.random.default_rng(6).integers(0, 256, (len(names), 9, 7, 3), dtype=np.uint8)
  out = _ra(x, _ra_u(names), num_layers=1, magnitude=magnitude)
  for name, img, got in zip(names, x, out):
    ref = np.asarray(getattr(ImageEnhance, name)(Image.fromarray(img))
                     .enhance(0.1 + 1.8 * magnitude / 10))
    assert np.abs(got.astype(int) - ref).max() <= 1, name  # the luma's and blend's rounding


def _warp(x, f):
  """out[:, y, x] = x[:, f(y, x)], 128 where f points outside (nearest-neighbour geometry)."""
  out = np.full_like(x, 128)
  h, w = x.shape[1:3]
  for y in range(h):
    for c in range(w):
      yi, xi = f(y, c)
      if 0 <= yi < h and 0 <= xi < w:
        out[:, y, c] = x[:, yi, xi]
  return out


@pytest.mark.parametrize("sign", [0.9, 0.1])  # u >= 0.5: positive magnitude
def test_randaugment_geometric_ops_and_cutout(sign):
  x = np.random.default_rng(4).integers(0, 256, (1, 6, 6, 3), dtype=np.uint8)
  s = 1 if sign > 0.5 else -1
  run = lambda name, **kw: _ra(x, _ra_u([name], sign, centre=(0.5, 0.0)), num_layers=1, **kw)
  # Rotate 30 M/10 degrees: M=30 is a quarter turn (counter-clockwise for a positive sign).
  np.testing.assert_array_equal(run("Rotate", magnitude=30), np.rot90(x, s, axes=(1, 2)))
  # Shear 0.3 M/10: M=100/3 shears by one pixel per row (column).
  np.testing.assert_array_equal(run("ShearX", magnitude=100 / 3),
                                _warp(x, lambda y, c: (y, c + s * y)))
  np.testing.assert_array_equal(run("ShearY", magnitude=100 / 3),
                                _warp(x, lambda y, c: (y + s * c, c)))
  # Translate translate_const M/10 pixels.
  np.testing.assert_array_equal(run("TranslateX", magnitude=10, translate_const=3),
                                _warp(x, lambda y, c: (y, c + 3 * s)))
  np.testing.assert_array_equal(run("TranslateY", magnitude=5, translate_const=4),
                                _warp(x, lambda y, c: (y + 2 * s, c)))
  # Cutout: a square of side 2 int(cutout_const M/10) at the centre (3, 0), clipped; no sign.
  want = x.copy()
  want[:, 1:5, 0:2] = 128
  np.testing.assert_array_equal(run("Cutout", magnitude=10, cutout_const=2), want)


def test_randaugment_rows_independent_deterministic_and_in_range():
  rng = np.random.default_rng(5)
  x = rng.integers(0, 256, (48, 10, 10, 3), dtype=np.uint8)
  ops = preprocess.parse("randaugment(3, 10, translate_const=3, cutout_const=3)")
  assert preprocess.num_random(ops) == 12
  u = rng.random((48, 12), dtype=np.float32)
  picked = {int(v * 16) for v in u[:, [0, 4, 8]].ravel()}
  assert picked == set(range(16))  # every op is picked somewhere
  out = preprocess.apply(ops, tf.constant(x), tf.constant(u)).numpy()
  np.testing.assert_array_equal(preprocess.apply(ops, tf.constant(x), tf.constant(u)).numpy(),
                                out)  # same u, same images
  for i in (0, 7, 31):  # a row alone gives the same result as in the batch
    np.testing.assert_array_equal(
        preprocess.apply(ops, tf.constant(x[i:i + 1]), tf.constant(u[i:i + 1])).numpy(),
        out[i:i + 1])
  assert 0 <= out.min() and out.max() <= 255 and np.array_equal(out, np.round(out))
  assert (out != x).any((1, 2, 3)).mean() > 0.7
  # Float input (after a resize): rounded, clipped, float32 out; the alias is the same op.
  xf = x.astype(np.float32) + rng.uniform(-0.4, 0.4, x.shape).astype(np.float32)
  alias = preprocess.parse("randaug(3, 10, translate_const=3, cutout_const=3)")
  outf = alias[0].fn(tf.constant(xf), tf.constant(u)).numpy()
  assert outf.dtype == np.float32
  np.testing.assert_array_equal(outf, out)
  big = preprocess.randaugment(2, 30).fn(tf.constant(xf * 1.2 - 20), tf.constant(u[:, :8]))
  assert 0 <= big.numpy().min() and big.numpy().max() <= 255
  gray = _run("randaugment(2, 10, translate_const=3)", _images(b=16, h=8, w=8), channels=1)
  assert gray.shape == (16, 8, 8, 1) and 0 <= gray.min() and gray.max() <= 255
  with pytest.raises(ValueError, match="1 or 3 channels"):
    _run("randaugment", _images(c=2))


def test_random_erase_sets_one_rectangle_of_the_stated_area():
  images = np.ones((64, 20, 30, 3), np.float32)
  u = np.random.default_rng(0).uniform(size=(64, 5)).astype(np.float32)
  u[:, 0] = 0.0  # always erase
  out = _run("random_erase(1.0, value=-1.0)", images, u)
  for img in out:
    erased = np.all(img == -1.0, axis=-1)
    ys, xs = np.nonzero(erased)
    box = erased[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert box.all()  # one filled rectangle, all channels
    assert erased.sum() == box.size
    # area in [0.02, 1/3] of the image up to rounding and clipping of the sides
    assert 0.01 * 600 <= erased.sum() <= 0.45 * 600
  np.testing.assert_array_equal(out, _run("random_erase(1.0, value=-1.0)", images, u))
  u[:, 0] = 0.5  # probability 0.25: nothing erased
  np.testing.assert_array_equal(_run("random_erase(0.25)", images, u), images)
  with pytest.raises(ValueError, match="probability must be in"):
    preprocess.parse("random_erase(1.5)")
