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
