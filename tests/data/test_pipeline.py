"""Iterators: resume exactness, once-per-epoch, eval coverage across hosts, errors."""
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.data import sources
from vit_jax.data import splits

AUG = "random_crop(8, pad=2)|flip_lr|value_range(-1, 1)"
TFDS_AUG = "decode|inception_crop(24)|flip_lr|value_range(-1, 1)"


def _take(it, n):
  return list(itertools.islice(it, n))


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _global_ids(fakes, source, split, batch_size, steps, num_p=1, **kw):
  """Example ids of the global batches (host rows concatenated in host order)."""
  per_host = [_take(data.train_iterator(source, split=split, pp="decode", batch_size=batch_size,
                                        seed=1, process_index=p, process_count=num_p, **kw),
                    steps) for p in range(num_p)]
  return np.stack([np.concatenate([fakes.ids_of(h[s]["image"]) for h in per_host])
                   for s in range(steps)])


def test_train_batches_shapes_and_one_hot(fakes):
  src = fakes.array_source()
  batch = next(data.train_iterator(src, split="train", pp=AUG, batch_size=16, seed=0,
                                   process_index=0, process_count=1))
  assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16, 10) and batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"].sum(1), 1)
  assert -1 <= batch["image"].min() < batch["image"].max() <= 1


@pytest.mark.parametrize("batch_size", [20, 32])
def test_every_train_example_once_per_epoch_in_memory(fakes, batch_size):
  src = fakes.array_source({"train": 100})
  steps = -(-300 // batch_size)  # three epochs' worth
  stream = _global_ids(fakes, src, "train", batch_size, steps, num_p=2).ravel()
  for epoch in range(3):
    np.testing.assert_array_equal(np.sort(stream[epoch * 100:(epoch + 1) * 100]), np.arange(100))
  assert not np.array_equal(stream[:100], stream[100:200])  # reshuffled per epoch
  # The global batches do not depend on the number of hosts.
  np.testing.assert_array_equal(stream, _global_ids(fakes, src, "train", batch_size, steps).ravel())


def test_train_on_a_seeded_subset_uses_only_it(fakes):
  src = fakes.array_source({"train": 100})
  [(_, subset)] = src.resolve("train@seeded(30, seed=5)")
  stream = _global_ids(fakes, src, "train@seeded(30, seed=5)", 10, 6).ravel()
  np.testing.assert_array_equal(np.sort(stream[:30]), subset)
  np.testing.assert_array_equal(np.sort(stream[30:]), subset)


def test_train_on_concatenated_splits(fakes):
  src = fakes.array_source({"train": 100, "test": 37})
  split = "train[:20]+test[-10:]"
  it = data.train_iterator(src, split=split, pp="decode", batch_size=10, seed=0,
                           process_index=0, process_count=1)
  keys = np.concatenate([fakes.keys_of(b["image"]) for b in _take(it, 3)])
  np.testing.assert_array_equal(np.sort(keys), np.sort(fakes.keys_of_parts(src.resolve(split))))


@pytest.mark.parametrize("num_p, cutmix", [(1, 0.0), (2, 0.0), (2, 1.0)])
def test_resume_in_memory_is_bitwise(fakes, num_p, cutmix):
  src = fakes.array_source()
  for p in range(num_p):
    kw = dict(split="train", pp=AUG, batch_size=24, seed=7, process_index=p,
              process_count=num_p, mixup=0.4, cutmix=cutmix)
    fresh = _take(data.train_iterator(src, **kw), 7)  # crosses the epoch boundary at step 4
    resumed = _take(data.train_iterator(src, start_step=5, **kw), 2)
    _assert_same(resumed[0], fresh[5])
    _assert_same(resumed[1], fresh[6])
  assert not np.array_equal(fresh[5]["image"], fresh[6]["image"])


def test_augmentations_depend_on_seed_and_vary(fakes):
  src = fakes.array_source()
  kw = dict(split="train", batch_size=100, process_index=0, process_count=1)
  flips = []
  for seed in (0, 1):
    plain = next(data.train_iterator(src, pp="decode", seed=seed, **kw))["image"]
    out = next(data.train_iterator(src, pp="decode|flip_lr", seed=seed, **kw))["image"]
    flips.append(out)  # Same order as `plain`: order and augmentation use separate keys.
    flipped = np.array([np.array_equal(o, x[:, ::-1]) for o, x in zip(out, plain)])
    kept = np.array([np.array_equal(o, x) for o, x in zip(out, plain)])
    assert np.all(flipped ^ kept) and 25 < flipped.sum() < 75
  assert not np.array_equal(flips[0], flips[1])


def test_mixup_mixes_pairs_with_one_lambda(fakes):
  src = fakes.array_source()
  kw = dict(split="train", pp="value_range(0, 1)", batch_size=10, seed=3, process_index=0,
            process_count=1)
  plain = next(data.train_iterator(src, **kw))
  mixed = next(data.train_iterator(src, mixup=1.0, **kw))
  own = plain["label"].argmax(1)
  row = np.flatnonzero(own != np.roll(own, 1))[0]  # a row mixed with a different class
  lam = mixed["label"][row, own[row]]
  assert 0.5 <= lam < 1
  np.testing.assert_allclose(mixed["label"], lam * plain["label"] +
                             (1 - lam) * np.roll(plain["label"], 1, axis=0), atol=1e-6)
  np.testing.assert_allclose(mixed["image"], lam * plain["image"] +
                             (1 - lam) * np.roll(plain["image"], 1, axis=0), atol=1e-5)


@pytest.mark.parametrize("split, num_p, batch_size", [
    ("test", 1, 8), ("test", 2, 8), ("test", 4, 16), ("test[:3]", 4, 4),
    ("train[:9]+test[-5:]", 2, 4)])
def test_eval_counts_every_example_once(fakes, split, num_p, batch_size):
  src = fakes.array_source({"train": 100, "test": 37})
  per_host = [list(data.eval_iterator(src, split=split, pp="decode", batch_size=batch_size,
                                      process_index=p, process_count=num_p))
              for p in range(num_p)]
  assert len({len(h) for h in per_host}) == 1  # same number of batches on every host
  keys, labels = [], []
  for host in per_host:
    for b in host:
      assert b["image"].shape[0] == b["mask"].shape[0] == batch_size // num_p
      real = b["mask"] == 1
      assert set(np.unique(b["mask"])) <= {0.0, 1.0}
      assert not b["image"][~real].any() and not b["label"][~real].any()  # zero padding
      keys.append(fakes.keys_of(b["image"][real]))
      labels.append(b["label"][real].argmax(1))
  keys, labels = np.concatenate(keys), np.concatenate(labels)
  np.testing.assert_array_equal(keys, fakes.keys_of_parts(src.resolve(split)))  # host by host
  np.testing.assert_array_equal(labels, keys % 100_000 % 10)


def test_steps_per_epoch(fakes):
  src = fakes.array_source({"train": 100})
  assert data.steps_per_epoch(src, "train", 32) == 4
  assert data.steps_per_epoch(src, "train[:50%]", 25) == 2


def test_batch_size_must_split_over_processes(fakes):
  with pytest.raises(ValueError, match="multiple of the number of processes 3"):
    data.train_iterator(fakes.array_source(), split="train", pp="decode", batch_size=16, seed=0,
                        process_index=0, process_count=3)


def test_default_process_is_jax_process(fakes):
  src = fakes.array_source()
  a = next(data.train_iterator(src, split="train", pp="decode", batch_size=8, seed=0))
  b = next(data.train_iterator(src, split="train", pp="decode", batch_size=8, seed=0,
                               process_index=0, process_count=1))
  _assert_same(a, b)


# TFDS (mocked reader that honours slices; see conftest.fake_tfds).

def test_tfds_every_example_once_per_host_epoch(tfds_source, fakes):
  split = "train[:60]"
  hosts = []
  for p in range(2):
    it = data.train_iterator(tfds_source, split=split, pp="decode", batch_size=20, seed=0,
                             process_index=p, process_count=2)
    hosts.append(np.concatenate([fakes.ids_of(b["image"]) for b in _take(it, 6)]))
  for p, stream in enumerate(hosts):  # host p owns examples [30p, 30p + 30)
    for epoch in range(2):
      np.testing.assert_array_equal(np.sort(stream[30 * epoch:30 * (epoch + 1)]),
                                    np.arange(30 * p, 30 * (p + 1)))
    assert not np.array_equal(stream[:30], stream[30:])


@pytest.mark.parametrize("split", ["train[:45]", "train@seeded(33, seed=2)"])
def test_tfds_resume_is_bitwise(tfds_source, split):
  kw = dict(split=split, pp=TFDS_AUG, batch_size=8, seed=4,
            process_index=1, process_count=2, mixup=0.2)
  fresh = _take(data.train_iterator(tfds_source, **kw), 8)
  resumed = _take(data.train_iterator(tfds_source, start_step=6, **kw), 2)
  _assert_same(resumed[0], fresh[6])
  _assert_same(resumed[1], fresh[7])


@pytest.mark.parametrize("split", ["test", "train[10%:30%]", "train@seeded(33, seed=2)",
                                   "test[:1]", "train[:9]+test[5:10]"])
def test_tfds_eval_counts_every_example_once_across_hosts(tfds_source, fakes, split):
  expected = fakes.keys_of_parts(tfds_source.resolve(split))
  per_host = [list(data.eval_iterator(tfds_source, split=split,
                                      pp="decode|resize(32)|central_crop(32)", batch_size=8,
                                      process_index=p, process_count=2)) for p in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == -(-(len(expected) - len(expected) // 2) // 4)
  keys = [fakes.keys_of(b["image"][b["mask"] == 1]) for h in per_host for b in h]
  masks = np.concatenate([b["mask"] for h in per_host for b in h])
  assert masks.sum() == len(expected)
  np.testing.assert_array_equal(np.concatenate(keys), expected)  # in order, host after host


# TFDS on disk (conftest.sorted_tfds: 64 TFRecord files of 8 examples, sorted by class).

def _stream(fakes, source, steps, *, epoch=0, batch_size=16, seed=0, split="train", **kw):
  """(ids, class labels) of `steps` batches of host 0 of 1 from the start of `epoch`."""
  n = source.num_examples(split)
  it = data.train_iterator(source, split=split, pp="decode", batch_size=batch_size, seed=seed,
                           start_step=epoch * n // batch_size, process_index=0, process_count=1,
                           **kw)
  batches = _take(it, steps)
  return (np.concatenate([fakes.ids_of(b["image"]) for b in batches]),
          np.concatenate([b["label"].argmax(1) for b in batches]))


def test_tfds_files_are_read_in_a_new_order_each_epoch(sorted_tfds, fakes):
  src = sorted_tfds(shuffle_buffer=20)  # 4% of the data, as 50k of ImageNet's 1.28M
  ids, _ = _stream(fakes, src, 64)  # epochs 0 and 1 (512 examples each)
  shards = ids // fakes.sorted_per_shard
  for epoch in range(2):  # every example once per epoch
    np.testing.assert_array_equal(np.sort(ids[512 * epoch:512 * (epoch + 1)]), np.arange(512))
  assert len(set(shards[:16])) >= 8  # several files at a time (fixed order: 4 or 5)
  first_files = [list(dict.fromkeys(shards[512 * e:512 * e + 64])) for e in range(2)]
  assert set(first_files[0]) != set(first_files[1])  # another order (fixed order: files 0-5)
  assert not set(first_files[0]) <= set(range(16))


@pytest.mark.parametrize("seed", [0, 1])
def test_tfds_first_examples_of_an_epoch_cover_the_classes(sorted_tfds, fakes, seed):
  """Files sorted by class: the first 64 of 512 examples span most classes (fixed file order:
  2 classes, total variation 0.8 from uniform)."""
  src = sorted_tfds(shuffle_buffer=20)
  for epoch in range(2):
    _, labels = _stream(fakes, src, 4, epoch=epoch, seed=seed)
    share = np.bincount(labels, minlength=10) / len(labels)
    assert len(np.unique(labels)) >= 6, np.bincount(labels, minlength=10)
    assert 0.5 * np.abs(share - 0.1).sum() < 0.45, share


def test_tfds_file_order_follows_seed_and_resumes_bitwise(sorted_tfds, fakes):
  """Two hosts, a seeded subset (holes inside files), mixup, random crops: the stream is a
  function of (seed, step); each host's epoch is its own part once."""
  src = sorted_tfds(shuffle_buffer=20)
  split = "train@seeded(300, seed=1)"  # 150 per host: 15 steps of 10 per epoch
  kw = dict(split=split, pp="decode|inception_crop(8)|flip_lr|value_range(-1, 1)",
            batch_size=20, seed=3, process_index=1, process_count=2, mixup=0.2)
  fresh = _take(data.train_iterator(src, **kw), 18)
  resumed = _take(data.train_iterator(src, start_step=14, **kw), 4)  # across epochs 0 and 1
  for a, b in zip(resumed, fresh[14:]):
    _assert_same(a, b)
  _assert_same(next(data.train_iterator(src, **kw)), fresh[0])
  assert not np.array_equal(next(data.train_iterator(src, **dict(kw, seed=4)))["image"],
                            fresh[0]["image"])
  chunk = np.concatenate([i for _, i in splits.host_chunk(src.resolve(split), 1, 2)])
  plain = _take(data.train_iterator(src, **dict(kw, pp="decode", mixup=0.0)), 30)
  ids = np.concatenate([fakes.ids_of(b["image"]) for b in plain])
  for epoch in range(2):
    np.testing.assert_array_equal(np.sort(ids[150 * epoch:150 * (epoch + 1)]), chunk)


# Image folders: variable sizes, per-example path, unreadable files.

def _folder(root, shapes, corrupt=None):
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(shapes):
    cls = "ab"[i % 2]
    os.makedirs(root / "train" / cls, exist_ok=True)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    (root / "train" / cls / f"{i:03d}.png").write_bytes(tf.io.encode_png(img).numpy())
  if corrupt:
    (root / "train" / "b" / corrupt).write_bytes(b"\xff\xd8 definitely not a jpeg")
  return data.get_source({"name": "image_folder", "data_dir": str(root)})


def test_image_folder_train_and_eval(tmp_path):
  src = _folder(tmp_path, [(10 + i % 5, 12 - i % 3) for i in range(12)])
  pp = "decode|inception_crop(8)|flip_lr|value_range(-1, 1)"
  kw = dict(split="train", pp=pp, batch_size=4, seed=0, process_index=0, process_count=1)
  fresh = _take(data.train_iterator(src, **kw), 5)
  assert fresh[0]["image"].shape == (4, 8, 8, 3)
  _assert_same(_take(data.train_iterator(src, start_step=4, **kw), 1)[0], fresh[4])
  labels = np.concatenate([b["label"].argmax(1) for b in fresh[:3]])
  assert np.bincount(labels).tolist() == [6, 6]  # one epoch: 6 images per class
  evals = list(data.eval_iterator(src, split="train", pp="decode|resize(8)", batch_size=5,
                                  process_index=0, process_count=1))
  assert [b["mask"].sum() for b in evals] == [5, 5, 2]
  with pytest.raises(ValueError, match="varying size"):
    data.eval_iterator(src, split="train", pp="decode", batch_size=4, process_index=0,
                       process_count=1)


def test_corrupt_image_error_names_the_file(tmp_path):
  src = _folder(tmp_path, [(8, 8)] * 6, corrupt="zz_broken.jpg")
  bad = str(tmp_path / "train" / "b" / "zz_broken.jpg")
  with pytest.raises(ValueError, match=f"Cannot read image file {bad}"):
    list(data.eval_iterator(src, split="train", pp="decode|resize(8)", batch_size=2,
                            process_index=0, process_count=1))
  with pytest.raises(ValueError, match=f"Cannot read image file {bad}"):
    _take(data.train_iterator(src, split="train", pp="decode|resize(8)", batch_size=7, seed=0,
                              process_index=0, process_count=1), 3)


def test_unknown_pp_op_is_named(fakes):
  with pytest.raises(ValueError, match="Unknown pp op 'onehot'"):
    data.train_iterator(fakes.array_source(), split="train", pp="decode|onehot(10)",
                        batch_size=8, seed=0, process_index=0, process_count=1)


def test_tfds_variable_size_images_go_example_by_example():
  with tfds.testing.mock_data(num_examples=10):  # random image sizes
    src = data.get_source({"name": "tfds:oxford_flowers102"})
    assert src.image_shape == (None, None, 3)
    kw = dict(split="train", pp="decode|inception_crop(16)|flip_lr|value_range(-1, 1)",
              batch_size=4, seed=0, process_index=0, process_count=1)
    fresh = _take(data.train_iterator(src, **kw), 4)
    _assert_same(next(data.train_iterator(src, start_step=3, **kw)), fresh[3])
    assert fresh[0]["image"].shape == (4, 16, 16, 3) and fresh[0]["label"].shape == (4, 102)
    evals = list(data.eval_iterator(src, split="test", pp="decode|resize(16)", batch_size=4,
                                    process_index=0, process_count=1))
    assert [b["mask"].sum() for b in evals] == [4, 4, 2]


@pytest.mark.skipif(not os.path.isdir(sources.FASHION_MNIST_DIR),
                    reason=f"{sources.FASHION_MNIST_DIR} missing: "
                    "`sudo apt-get install dataset-fashion-mnist`")
def test_fashion_mnist_resume_and_eval():
  src = data.get_source({"name": "fashion_mnist"})
  kw = dict(split="train[:1000]", pp="random_crop(28, pad=2)|flip_lr|value_range(-1, 1)",
            batch_size=256, seed=0, process_index=0, process_count=1)
  fresh = _take(data.train_iterator(src, **kw), 5)  # crosses the epoch boundary at step 3
  _assert_same(next(data.train_iterator(src, start_step=4, **kw)), fresh[4])
  assert fresh[0]["image"].shape == (256, 28, 28, 1)
  evals = list(data.eval_iterator(src, split="test", pp="value_range(-1, 1)", batch_size=3000,
                                  process_index=0, process_count=1))
  assert len(evals) == 4 and sum(b["mask"].sum() for b in evals) == 10000
  counts = sum(b["label"].sum(0) for b in evals)
  np.testing.assert_array_equal(counts, [1000] * 10)


# RandAugment and CutMix in the iterators.

RA = "randaugment(1, 9, translate_const=2, cutout_const=2)"  # one layer: quicker to build


def _box_of(mixed, own, partner):
  """The pasted box (y0, y1, x0, x1) of a CutMix batch: where it differs from `own`."""
  diff = (mixed != own).any(axis=(0, 3))
  if not diff.any():
    return 0, 0, 0, 0
  ys, xs = np.flatnonzero(diff.any(1)), np.flatnonzero(diff.any(0))
  return ys[0], ys[-1] + 1, xs[0], xs[-1] + 1


def _assert_cutmix(mixed, plain):
  """mixed is plain with one box of each row's partner (the row before) and labels weighted by
  area; returns the own label's weight."""
  own, partner = plain["image"], np.roll(plain["image"], 1, axis=0)
  y0, y1, x0, x1 = _box_of(mixed["image"], own, partner)
  want = own.copy()
  want[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
  np.testing.assert_array_equal(mixed["image"], want)
  h, w = own.shape[1:3]
  lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
  np.testing.assert_allclose(mixed["label"], lam * plain["label"] +
                             (1 - lam) * np.roll(plain["label"], 1, axis=0), atol=1e-6)
  np.testing.assert_allclose(mixed["label"].sum(1), 1, atol=1e-6)
  return lam


def test_cutmix_pastes_one_box_of_the_partner(fakes):
  src = fakes.array_source()
  kw = dict(split="train", pp="value_range(0, 1)", batch_size=10, seed=3, process_index=0,
            process_count=1)
  plain = _take(data.train_iterator(src, **kw), 8)
  mixed = _take(data.train_iterator(src, cutmix=1.0, **kw), 8)
  lams = [_assert_cutmix(m, p) for m, p in zip(mixed, plain)]
  assert sum(0 < lam < 1 for lam in lams) >= 4 and len(set(lams)) >= 3


def test_mixup_and_cutmix_take_turns_per_batch(fakes):
  src = fakes.array_source()
  kw = dict(split="train", pp="value_range(0, 1)", batch_size=8, seed=2, process_index=0,
            process_count=1)
  plain = _take(data.train_iterator(src, **kw), 16)
  mixed = _take(data.train_iterator(src, mixup=1.0, cutmix=1.0, **kw), 16)
  kinds = []
  for m, p in zip(mixed, plain):
    np.testing.assert_allclose(m["label"].sum(1), 1, atol=1e-6)
    own, partner = p["image"], np.roll(p["image"], 1, axis=0)
    if np.all((m["image"] == own) | (m["image"] == partner)):  # pasted pixels only: CutMix
      _assert_cutmix(m, p)
      kinds.append("cutmix")
    else:  # mixup, with lambda >= 0.5 for the whole batch
      lam = (m["image"] - partner)[own != partner] / (own - partner)[own != partner]
      np.testing.assert_allclose(lam, lam[0], atol=1e-4)
      assert 0.5 <= lam[0] <= 1
      np.testing.assert_allclose(m["label"], lam[0] * p["label"] + (1 - lam[0]) *
                                 np.roll(p["label"], 1, axis=0), atol=1e-4)
      kinds.append("mixup")
  assert 4 <= kinds.count("cutmix") <= 12, kinds  # one of them per batch, each with p = 1/2


def test_randaugment_and_cutmix_same_for_one_and_two_hosts_and_resume(fakes):
  """One process resumed at step 2 yields the rows of two processes' uninterrupted steps 2, 3
  (augmentations, cutmix boxes and partners, mixup), concatenated."""
  src = fakes.array_source()
  kw = dict(split="train", pp=RA, batch_size=12, seed=5, mixup=0.5, cutmix=1.0)
  hosts = [_take(data.train_iterator(src, process_index=p, process_count=2, **kw), 4)
           for p in range(2)]
  one = _take(data.train_iterator(src, process_index=0, process_count=1, start_step=2, **kw), 2)
  for s in (2, 3):
    _assert_same(one[s - 2], {k: np.concatenate([h[s][k] for h in hosts]) for k in one[0]})
  for batch in hosts[0] + hosts[1]:
    assert 0 <= batch["image"].min() and batch["image"].max() <= 255  # before value_range
    np.testing.assert_allclose(batch["label"].sum(1), 1, atol=1e-6)
  assert not np.array_equal(hosts[0][2]["image"], hosts[0][3]["image"])
  with pytest.raises(ValueError, match="cutmix"):
    data.train_iterator(src, split="train", pp="decode", batch_size=12, seed=5, cutmix=-1.0,
                        process_index=0, process_count=1)


def test_tfds_cutmix_resume_is_bitwise(tfds_source):
  kw = dict(split="train[:45]", pp="decode|randaug(2, 10, translate_const=8)|value_range(-1, 1)",
            batch_size=8, seed=4, process_index=1, process_count=2, mixup=0.2, cutmix=1.0)
  fresh = _take(data.train_iterator(tfds_source, **kw), 4)
  _assert_same(next(data.train_iterator(tfds_source, start_step=3, **kw)), fresh[3])
  np.testing.assert_allclose(fresh[3]["label"].sum(1), 1, atol=1e-6)


def test_repeated_augmentation_copies_are_strided_augmented_apart_and_cover_the_data(fakes):
  src = fakes.array_source({"train": 60})
  ids = _global_ids(fakes, src, "train", 12, 15, repeats=3)  # 15 steps of 4 distinct x 3
  for step in ids:
    np.testing.assert_array_equal(step[:4], step[4:8])  # copies B/3 rows apart
    np.testing.assert_array_equal(step[:4], step[8:])
    assert len(set(step[:4])) == 4  # mixup's partner (the previous row) is another example
  # 60 examples in 60 x 3 / 12 = 15 steps: each seen 3 times (once per "epoch" on average).
  np.testing.assert_array_equal(np.sort(ids[:, :4].ravel()), np.arange(60))
  # Per-example (unbatched) chain: the copies get their own crops and flips.
  batch = next(data.train_iterator(src, split="train", pp=AUG, batch_size=12, seed=0,
                                   process_index=0, process_count=1, repeats=3))["image"]
  assert not np.array_equal(batch[:4], batch[4:8])
  # The same global batches with two hosts.
  np.testing.assert_array_equal(ids, _global_ids(fakes, src, "train", 12, 15, num_p=2, repeats=3))
  with pytest.raises(ValueError, match="multiple of repeats=5"):
    next(data.train_iterator(src, split="train", pp="decode", batch_size=12, seed=0, repeats=5))


def test_tfds_repeated_augmentation_strides_copies_and_resumes_bitwise(tfds_source):
  kw = dict(split="train[:45]", pp=TFDS_AUG, batch_size=12, seed=4, process_index=0,
            process_count=1, repeats=3)
  fresh = _take(data.train_iterator(tfds_source, **kw), 5)
  plain = _take(data.train_iterator(tfds_source, **dict(kw, pp="decode|resize(24)")), 5)
  for batch in plain:  # the same example at rows r, r + 4, r + 8
    np.testing.assert_array_equal(batch["label"][:4], batch["label"][4:8])
    np.testing.assert_array_equal(batch["image"][:4], batch["image"][8:])
  assert not np.array_equal(fresh[0]["image"][:4], fresh[0]["image"][4:8])  # own crops
  resumed = _take(data.train_iterator(tfds_source, start_step=4, **kw), 1)
  _assert_same(resumed[0], fresh[4])
