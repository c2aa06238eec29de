"""Tests for vit_jax/evaluators/fewshot.py: shot sampling, the preprocessing, the ridge solution
against a direct least-squares one, the probe, and the evaluator end to end on images whose pixels
are their class, on the training data set or on a separate (mock TFDS) one through
train.evaluate_all."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from vit_jax import data as data_lib
from vit_jax import train
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


def test_sample_shots_is_a_permutation_per_class_in_class_order():
  # big_vision's draw (fewshot_lsr.py): one generator, classes in order, the first k of each
  # class's permutation.
  labels = np.random.default_rng(9).integers(0, 4, size=80)
  rng = np.random.default_rng(7)
  first = np.stack([rng.permutation(np.flatnonzero(labels == c))[:5] for c in range(4)])
  got = fewshot.sample_shots(labels, (2, 5), 4, seed=7)
  np.testing.assert_array_equal(got[2], np.sort(first[:, :2].reshape(-1)))
  np.testing.assert_array_equal(got[5], np.sort(first.reshape(-1)))


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


def test_preprocess_standardises_with_the_support_statistics_and_appends_the_bias():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 5.0, size=(40, 6)) * np.arange(1, 7)  # scales 5 to 30
  mean, std = fewshot.feature_stats(x)
  np.testing.assert_allclose(mean, x.mean(0, keepdims=True))
  np.testing.assert_allclose(std, np.sqrt(((x - x.mean(0)) ** 2).mean(0, keepdims=True)) + 1e-5)
  z = fewshot.preprocess(x, mean, std)
  assert z.shape == (40, 7) and z.dtype == np.float64
  np.testing.assert_allclose(z[:, :6].mean(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(z[:, :6].std(0), 1.0, atol=1e-5)  # std / (std + 1e-5)
  np.testing.assert_array_equal(z[:, 6], 100.0)
  # Test features use the support's statistics, not their own.
  x_test = rng.normal(size=(3, 6))
  np.testing.assert_allclose(fewshot.preprocess(x_test, mean, std)[:, :6], (x_test - mean) / std)
  # A dimension constant on the support: divided by 1e-5 (as big_vision does).
  x[:, 2] = 4.0
  mean, std = fewshot.feature_stats(x)
  assert std[0, 2] == 1e-5 and fewshot.preprocess(x, mean, std)[0, 2] == 0.0


def _augmented(x, y, num_classes, l2):
  """Independent of fewshot.py: standardised features with a column of 100, and +-1 targets."""
  z = (x - x.mean(0)) / (x.std(0) + 1e-5)
  z = np.concatenate([z, np.full((len(x), 1), 100.0)], axis=1)
  return z, np.where(np.arange(num_classes) == y[:, None], 1.0, -1.0)


@pytest.mark.parametrize("n_per_class,dim,l2", [(25, 16, 2.0 ** 10), (2, 64, 2.0 ** 10),
                                               (25, 16, 1.0), (2, 64, 1.0)])
def test_probe_weights_match_lstsq_of_the_augmented_normal_equations(n_per_class, dim, l2):
  num_classes = 5
  rng = np.random.default_rng(n_per_class * dim)
  y = np.repeat(np.arange(num_classes), n_per_class)
  x = (rng.normal(size=(len(y), dim)) * rng.uniform(0.1, 10, size=dim) + rng.normal(size=dim) * 3
       + 2.0 * np.eye(num_classes, dim)[y]).astype(np.float32)
  w, _, _ = fewshot.fit_linear_probe(x, y, num_classes, l2)
  z, t = _augmented(x.astype(np.float64), y, num_classes, l2)
  normal = np.linalg.lstsq(z.T @ z + l2 * np.eye(dim + 1), z.T @ t, rcond=None)[0]
  stacked = np.linalg.lstsq(np.concatenate([z, np.sqrt(l2) * np.eye(dim + 1)]),
                            np.concatenate([t, np.zeros((dim + 1, num_classes))]), rcond=None)[0]
  np.testing.assert_allclose(w, normal, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(w, stacked, rtol=1e-4, atol=1e-4)
  # Centred columns are orthogonal to the bias column, so the bias (100 w_b) is the targets' mean
  # shrunk by n 100^2 / (n 100^2 + l2): about 1 for l2 = 2^10, i.e. almost unregularised.
  n = len(y)
  np.testing.assert_allclose(100.0 * w[-1], (2 - num_classes) / num_classes * n * 1e4 /
                             (n * 1e4 + l2), rtol=1e-6)


def test_linear_probe_by_hand():
  # Support (1, 0) class 0 and (-1, 0) class 1: mean 0 and std 1 in the first dimension, the
  # second constant (0 after centring), bias column 100: X = [[1, 0, 100], [-1, 0, 100]]. The
  # targets' columns are +-(1, -1), an eigenvector of XX^T + l2 I with eigenvalue 2 + l2, so
  # W = X^T Y / (2 + l2) = [[2, -2], [0, 0], [0, 0]] / (2 + l2): the class is the sign of the
  # first coordinate of the test point.
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
  # "Features": the class pixels, as the model's run_fn would give them. (Every dimension is
  # standardised with the support's statistics, from 5 points at 1 shot, so a pure-noise pixel
  # weighs as much as a class one: with one more, 1-shot accuracy is 0.95 instead of 1.)
  run_fn = lambda params, batch: batch["image"].reshape(len(batch["image"]), -1)[:, :5]
  args = dict(train_split="train", test_split="test", pp="decode", shots=(1, 5), seed=0,
              batch_size=16, gather=np.asarray)
  args.update(kw)
  return fewshot.FewShotEvaluator(run_fn, src, **args)


def test_evaluator_separable_classes():
  src = _class_images({"train": 60, "test": 37})
  out = _evaluator(src).run(params=None)
  assert out == {"fewshot_1shot_accuracy": 1.0, "fewshot_5shot_accuracy": 1.0}


def test_evaluator_defaults_are_big_vision_s():
  ev = fewshot.FewShotEvaluator(None, None, train_split="train", test_split="test", pp="decode",
                                batch_size=8, gather=np.asarray)
  assert (ev.shots, ev.l2_reg, ev.num_trials) == ((1, 5, 10, 25), 1024.0, 3)
  base = common.base_config().fewshot
  assert (base.l2_reg, base.num_trials, base.dataset.name) == (1024.0, 3, None)


def test_evaluator_trials_are_seeded_by_seed_and_trial(monkeypatch):
  src = _class_images({"train": 60, "test": 37})
  seeds = []
  original = fewshot.sample_shots
  monkeypatch.setattr(fewshot, "sample_shots",
                      lambda *a, seed: seeds.append(list(seed)) or original(*a, seed=seed))
  out = _evaluator(src, seed=4).run(None)
  assert seeds == [[4, 0], [4, 1], [4, 2]]
  assert out == _evaluator(src, seed=4).run(None)


def test_evaluator_features_cover_the_split_once():
  src = _class_images({"train": 60, "test": 37})
  x, y = _evaluator(src).features(None, "test[5:30]")
  assert x.shape == (25, 5)
  np.testing.assert_array_equal(y, np.arange(5, 30) % 5)


def test_evaluator_short_train_split_is_an_error():
  src = _class_images({"train": 60, "test": 37})
  with pytest.raises(ValueError, match="larger fewshot.train_split"):
    _evaluator(src, train_split="train[:12]").run(None)
  with pytest.raises(ValueError, match="positive integers"):
    _evaluator(src, shots=(0,))


class _StubRunner:
  """What train.fewshot_evaluator uses of a Runner; the "features" are the flattened pixels."""

  def __init__(self):
    self.shapes = []

  def features(self):
    def run_fn(params, batch):
      self.shapes.append(batch["image"].shape[1:])
      return batch["image"].reshape(len(batch["image"]), -1)
    return run_fn

  def gather_features(self, x):
    return np.asarray(x)


def test_evaluate_all_probes_a_separate_data_set_built_once(monkeypatch):
  train_source = _class_images({"train": 60, "test": 37})
  c = common.base_config()
  c.eval_split = ""  # few-shot only
  c.pp_eval, c.eval_batch_size = "decode|value_range(-1,1)", 32
  c.fewshot.shots, c.fewshot.num_trials = (1, 2), 2
  built = []
  get_source = data_lib.get_source
  monkeypatch.setattr(train.data_lib, "get_source",
                      lambda cfg: built.append(cfg.name) or get_source(cfg))
  runner = _StubRunner()
  # Unset: the training data set (4x4x1 images).
  out = train.evaluate_all(runner, None, train_source, c)
  assert set(out) == {"fewshot_1shot_accuracy", "fewshot_2shot_accuracy"}
  assert set(runner.shapes) == {(4, 4, 1)} and not built
  c.fewshot.dataset.name = "tfds:cifar10"
  c.fewshot.test_split = "test"  # 100 mock images (train[98%:] would be 2): steps of 1/100
  runner.shapes.clear()
  with tfds.testing.mock_data(num_examples=100):
    first = train.evaluate_all(runner, None, train_source, c)
    second = train.evaluate_all(runner, None, train_source, c)
    expected = _probe_by_hand(get_source(ml_collections.ConfigDict(  # unrecorded
        dict(name="tfds:cifar10"))), c)
  assert set(first) == {"fewshot_1shot_accuracy", "fewshot_2shot_accuracy"}
  assert first == second
  # The probe of CIFAR-10's pixels, computed here (ridge regression in its dual form).
  assert first.keys() == expected.keys()
  for k, v in expected.items():
    assert first[k] == pytest.approx(v, abs=1e-9), k
  assert set(runner.shapes) == {(32, 32, 3)}  # CIFAR-10's images, not the training set's
  assert built == ["tfds:cifar10"]  # built once, then reused


def _probe_by_hand(source, c):
  """Few-shot accuracies of flattened pixels on `source`, without the evaluator: shots as
  sample_shots draws them (seed [seed, trial]), features standardised with the support's
  statistics plus a bias column of 100, W = Z^T (Z Z^T + l2 I)^-1 T for +-1 targets, arg-max."""
  def read(split):
    batches = list(data_lib.eval_iterator(source, split=split, pp=c.pp_eval, batch_size=32))
    keep = np.concatenate([b["mask"] for b in batches]) > 0
    x = np.concatenate([b["image"].reshape(len(b["image"]), -1) for b in batches])[keep]
    return x.astype(np.float64), np.concatenate([b["label"].argmax(-1) for b in batches])[keep]
  x, y = read(c.fewshot.train_split)
  x_test, y_test = read(c.fewshot.test_split)
  k_classes, l2 = source.num_classes, float(c.fewshot.l2_reg)
  acc = {}
  for t in range(c.fewshot.num_trials):
    for k, rows in fewshot.sample_shots(y, c.fewshot.shots, k_classes, seed=[c.seed, t]).items():
      z, targets = _augmented(x[rows], y[rows], k_classes, l2)
      w = z.T @ np.linalg.solve(z @ z.T + l2 * np.eye(len(z)), targets)
      std = x[rows].std(0) + 1e-5
      z_test = np.concatenate([(x_test - x[rows].mean(0)) / std,
                               np.full((len(x_test), 1), 100.0)], axis=1)
      acc.setdefault(k, []).append(np.mean((z_test @ w).argmax(-1) == y_test))
  return {f"fewshot_{k}shot_accuracy": float(np.mean(v)) for k, v in acc.items()}
