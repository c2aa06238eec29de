"""Shared fakes for the data tests (fixture `fakes`): sources whose images carry their index."""
import contextlib
import re
import types

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import catalog
from vit_jax.data import sources

# Sizes of the fake TFDS cifar10 splits.
FAKE_TFDS_SIZES = {"train": 200, "test": 50}


def indexed_images(n: int, shape=(8, 8, 1), split_id: int = 0) -> np.ndarray:
  """uint8 images whose first pixels spell (index % 256, index // 256, split_id)."""
  rng = np.random.default_rng(split_id)
  images = rng.integers(0, 256, size=(n,) + tuple(shape), dtype=np.uint8)
  flat = images.reshape(n, -1)
  flat[:, 0], flat[:, 1], flat[:, 2] = np.arange(n) % 256, np.arange(n) // 256, split_id
  return images


def ids_of(images: np.ndarray) -> np.ndarray:
  """Inverse of indexed_images for float batches that kept raw values ("decode" only)."""
  flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
  return (flat[:, 0] + 256 * flat[:, 1]).round().astype(np.int64)


def keys_of(images: np.ndarray) -> np.ndarray:
  """(split id, index) of each image as one number: split_id * 100_000 + index."""
  flat = images.reshape(len(images), int(np.prod(images.shape[1:])))
  return flat[:, 2].round().astype(np.int64) * 100_000 + ids_of(images)


def keys_of_parts(parts) -> np.ndarray:
  """The keys of resolved split parts (split ids number the sorted split names)."""
  names = sorted({"train", "test"})
  return np.concatenate([names.index(b) * 100_000 + i for b, i in parts])


def array_source(sizes=None, shape=(8, 8, 1), num_classes=10) -> sources.ArraySource:
  sizes = sizes or {"train": 100, "test": 37}
  data = {name: (indexed_images(n, shape, k), np.arange(n) % num_classes)
          for k, (name, n) in enumerate(sorted(sizes.items()))}
  return sources.ArraySource("indexed", data, class_names=[str(i) for i in range(num_classes)],
                             image_shape=shape, encoded=False)


@contextlib.contextmanager
def fake_tfds():
  """tfds.testing.mock_data whose reader honours absolute slices `split[lo:hi]` and yields
  cifar10-like examples (PNG-encoded when decoding is skipped) that carry their index."""
  data = {s: indexed_images(n, (32, 32, 3), k) for k, (s, n) in
          enumerate(sorted(FAKE_TFDS_SIZES.items()))}

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del self, read_config, shuffle_files
    m = re.fullmatch(r"(\w+)(\[(\d*):(\d*)\])?", split)
    images = data[m.group(1)]
    lo, hi = int(m.group(3) or 0), int(m.group(4) or len(images))
    images, labels = images[lo:hi], np.arange(lo, hi) % 10
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    if decoders and isinstance(decoders.get("image"), tfds.decode.SkipDecoding):
      ds = ds.map(lambda ex: {"image": tf.io.encode_png(ex["image"]), "label": ex["label"]})
    return ds

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


@pytest.fixture
def fakes():
  return types.SimpleNamespace(indexed_images=indexed_images, ids_of=ids_of, keys_of=keys_of,
                               keys_of_parts=keys_of_parts,
                               array_source=array_source, fake_tfds=fake_tfds,
                               tfds_sizes=FAKE_TFDS_SIZES, sorted_per_shard=SORTED_PER_SHARD)


@pytest.fixture
def tfds_source():
  with fake_tfds():
    yield catalog.get_source({"name": "tfds:cifar10"})


# A real TFDS data set on disk (TFRecord shards): 64 files of 8 examples sorted by class (file s
# holds class s * 10 // 64), images indexed_images(512, (8, 8, 1)).
SORTED_SHARDS, SORTED_PER_SHARD = 64, 8


@pytest.fixture(scope="session")
def sorted_tfds_dir(tmp_path_factory):
  from benchmarks import data_order  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("tfds"))
  n = SORTED_SHARDS * SORTED_PER_SHARD
  data_order.write_tfds(root, indexed_images(n), np.arange(n) // SORTED_PER_SHARD * 10 //
                        SORTED_SHARDS, SORTED_SHARDS, 10)
  return root


@pytest.fixture
def sorted_tfds(sorted_tfds_dir):
  """TfdsSource(**kw) of that data set (shard of example i: i // SORTED_PER_SHARD)."""
  return lambda **kw: sources.TfdsSource("sorted_shards", data_dir=sorted_tfds_dir, **kw)
