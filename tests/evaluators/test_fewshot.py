"""Tests for vit_jax/evaluators/fewshot.py: shot sampling, the ridge solution, the probe, and the
evaluator end to end on images whose pixels are their class."""
import numpy as np
import pytest

from vit_jax import data as data_lib
from vit_jax.data import sources
from vit_jax.evaluators import fewshot


def test_sample_shots_exactly_k_per_class_nested_and_seeded():
  labels = np.arange(200) % 10
  a = fewshot.sample_shots(labels, (1, 5, 10), 10, seed=3)
  for k, rows in a.items():
    assert len(rows) == len(set(rows)) == 10 * k
    np.testing.assert_array_equal(np.bincount(labels[rows], minlength=10), np.full(10, k))
  assert set(a[1]) <= set(a[5]) <= set(a[10])
  b = fewshot.sample_shots(labels, (1, 5, 10), 10, seed=3)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  c = fewshot.sample_shots(labels, (5,), 10, seed=4)
  assert not np.array_equal(a[5], c[5])


def test_sample_shots_names_the_short_class():
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
  with pytest.raises(ValueError, match="Class 1 has 2 examples.*3-shot"):
    fewshot.sample_shots(labels, (1, 3), 3, seed=0)


@pytest.mark.parametrize("n,d", [(30, 8), (6, 20)])  # primal and dual form
def test_ridge_solve_matches_lstsq_of_the_augmented_system(n, d):
  rng = np.random.default_rng(0)
  x, y, lam = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 0.7
  # min |XW - Y|^2 + lam |W|^2  ==  least squares of [X; sqrt(lam) I] W = [Y; 0].
  expected = np.linalg.lstsq(np.concatenate([x, np.sqrt(lam) * np.eye(d)]),
                             np.concatenate([y, np.zeros((d, 3))]), rcond=None)[0]
  np.testing.assert_allclose(fewshot.ridge_solve(x, y, lam), expected, atol=1e-10)
  np.testing.assert_allclose(fewshot.ridge_solve(x, y, 0.0),
                             np.linalg.lstsq(x, y, rcond=None)[0], atol=1e-10)


def test_linear_probe_by_hand():
  # Support (1, 0) class 0 and (-1, 0) class 1: mean 0, unit norm already, bias column 1, so
  # X = [[1, 0, 1], [-1, 0, 1]], XX^T = 2I and W = X^T Y / (2 + l2) = [[2, -2], 0, 0] / (2 + l2):
  # the class is the sign of the first coordinate of the test point.
  x, y = np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([0, 1])
  x_test = np.array([[0.5, 3.0], [-0.1, 1.0], [2.0, -5.0]])
  for l2 in (0.1, 1024.0):
    assert fewshot.linear_probe_accuracy(x, y, x_test, np.array([0, 1, 0]), 2, l2) == 1.0
    np.testing.assert_allclose(
        fewshot.linear_probe_accuracy(x, y, x_test, np.array([0, 1, 1]), 2, l2), 2 / 3)


def test_assemble_restores_split_order_across_hosts():
  src = _class_images({"train": 23})
  per_host = []
  for p in range(2):  # Two simulated hosts, each with its padded part of the split.
    batches = list(data_lib.eval_iterator(src, split="train", pp="decode", batch_size=8,
                                          process_index=p, process_count=2))
    per_host.append([np.concatenate([b[k] for b in batches]) for k in ("image", "label", "mask")])
  feats = np.stack([h[0].reshape(len(h[0]), -1)[:, 4:6] for h in per_host])  # (2, rows, 2)
  labels = np.stack([np.argmax(h[1], -1) for h in per_host])
  x, y = fewshot.assemble(feats, labels, np.stack([h[2] for h in per_host]))
  np.testing.assert_array_equal(x[:, 1], np.arange(23))  # pixel 5 holds the example's index
  np.testing.assert_array_equal(y, np.arange(23) % 5)


def _class_images(sizes, num_classes=5):
  """4x4 images, flattened: pixel c = 100 + noise for class c (< 5), pixel 5 = the example's
  index, the others noise in [0, 20)."""
  data = {}
  for k, (name, n) in enumerate(sorted(sizes.items())):
    rng = np.random.default_rng(k)
    labels = np.arange(n) % num_classes
    images = rng.integers(0, 20, size=(n, 4, 4, 1)).astype(np.uint8)
    flat = images.reshape(n, 16)
    flat[np.arange(n), labels] += 100
    flat[:, 5] = np.arange(n)
    data[name] = (images, labels)
  return sources.ArraySource("classes", data, class_names=[str(i) for i in range(num_classes)],
                             image_shape=(4, 4, 1), encoded=False)


def _evaluator(src, **kw):
  # "Features": the class pixels and two noise pixels, as the model's run_fn would give them.
  run_fn = lambda params, batch: batch["image"].reshape(len(batch["image"]), -1)[:, [0, 1, 2, 3,
                                                                                   4, 6, 7]]
  args = dict(train_split="train", test_split="test", pp="decode", shots=(1, 5), l2_reg=1.0,
              num_trials=2, seed=0, batch_size=16, gather=np.asarray)
  args.update(kw)
  return fewshot.FewShotEvaluator(run_fn, src, **args)


def test_evaluator_separable_classes():
  src = _class_images({"train": 60, "test": 37})
  out = _evaluator(src).run(params=None)
  assert out == {"fewshot_1shot_accuracy": 1.0, "fewshot_5shot_accuracy": 1.0}


def test_evaluator_features_cover_the_split_once():
  src = _class_images({"train": 60, "test": 37})
  x, y = _evaluator(src).features(None, "test[5:30]")
  assert x.shape == (25, 7)
  np.testing.assert_array_equal(y, np.arange(5, 30) % 5)


def test_evaluator_short_train_split_is_an_error():
  src = _class_images({"train": 60, "test": 37})
  with pytest.raises(ValueError, match="larger fewshot.train_split"):
    _evaluator(src, train_split="train[:12]").run(None)
  with pytest.raises(ValueError, match="positive integers"):
    _evaluator(src, shots=(0,))
