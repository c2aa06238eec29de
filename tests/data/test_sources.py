"""Sources: Debian's Fashion-MNIST files, TFDS (mocked, and a small one on disk), image folders,
and their errors."""
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.data import sources
from vit_jax.data import splits

FMNIST_FILES = os.path.join(sources.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(FMNIST_FILES),
    reason=f"{sources.FASHION_MNIST_DIR} missing: `sudo apt-get install dataset-fashion-mnist`")


@needs_fmnist
def test_fashion_mnist_reads_debian_files():
  src = data.get_source(ml_collections.ConfigDict({"name": "fashion_mnist"}))
  assert isinstance(src, sources.ArraySource)
  assert (src.num_classes, src.image_shape) == (10, (28, 28, 1))
  assert src.num_examples("train") == 60000 and src.num_examples("test") == 10000
  assert src.num_examples("train[:10%]") == 6000
  for split, per_class in (("train", 6000), ("test", 1000)):  # Fashion-MNIST is balanced.
    images, labels = src._data[split]  # pylint: disable=protected-access
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    assert images.max() == 255 and images.min() == 0


def test_fashion_mnist_missing_directory_names_it_and_the_fix(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError,
                     match=f"{missing}.*apt-get install dataset-fashion-mnist"):
    data.get_source({"name": "fashion_mnist", "data_dir": missing, "tfds_fallback": False})


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path))  # Debian's files missing
  with tfds.testing.mock_data(num_examples=12):
    src = data.get_source({"name": "fashion_mnist"})
    assert isinstance(src, sources.TfdsSource) and src.name == "fashion_mnist"
    assert (src.num_classes, src.image_shape, src.num_examples("test")) == (10, (28, 28, 1), 12)
    # A directory the user named is not replaced by a download: its absence is the error.
    with pytest.raises(FileNotFoundError, match=f"not found in {tmp_path / 'mine'}"):
      data.get_source({"name": "fashion_mnist", "data_dir": str(tmp_path / "mine")})


def test_corrupt_idx_file_is_named(tmp_path):
  for images_file, labels_file in sources.FASHION_MNIST_FILES.values():
    for name in (images_file, labels_file):
      (tmp_path / name).write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
    data.get_source({"name": "fashion_mnist", "data_dir": str(tmp_path)})


def test_tfds_with_plain_mock_data():
  with tfds.testing.mock_data(num_examples=24):
    src = data.get_source({"name": "tfds:mnist"})
    assert (src.num_classes, src.image_shape, src.num_examples("train")) == (10, (28, 28, 1), 24)
    batches = list(data.eval_iterator(src, split="test", pp="decode|value_range(-1, 1)",
                                      batch_size=10, process_index=0, process_count=1))
  assert [b["image"].shape for b in batches] == [(10, 28, 28, 1)] * 3
  assert [b["mask"].sum() for b in batches] == [10, 10, 4]
  assert batches[0]["image"].min() >= -1 and batches[0]["image"].max() <= 1


def test_tfds_split_sizes_and_unknown_names(tfds_source, fakes):
  assert tfds_source.num_examples("train") == fakes.tfds_sizes["train"]
  assert tfds_source.num_examples("train[:10%]@seeded(7, seed=1)") == 7
  with pytest.raises(ValueError, match="has no data set 'no_such_set'"):
    data.get_source({"name": "tfds:no_such_set"})


def test_unknown_source_lists_known_ones():
  with pytest.raises(ValueError, match="Unknown data source 'mnist'.*fashion_mnist, tfds:<name>"):
    data.get_source({"name": "mnist"})


def _write_folder(root, sizes):
  """root/<split>/<class>/*.png with given (h, w) per image."""
  rng = np.random.default_rng(0)
  for (split, cls), shapes in sizes.items():
    os.makedirs(root / split / cls, exist_ok=True)
    for i, (h, w) in enumerate(shapes):
      img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      (root / split / cls / f"{i}.png").write_bytes(tf.io.encode_png(img).numpy())


def test_image_folder_classes_sorted_across_splits(tmp_path):
  _write_folder(tmp_path, {("train", "zebra"): [(6, 6)] * 2, ("train", "ant"): [(5, 7)],
                           ("val", "moth"): [(4, 4)] * 3})
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
  src = data.get_source({"name": "image_folder", "data_dir": str(tmp_path)})
  assert src.class_names == ("ant", "moth", "zebra") and src.num_classes == 3
  assert src.num_examples("train") == 3 and src.num_examples("val") == 3
  assert src.image_shape == (None, None, 3)
  labels = src._data["train"][1]  # pylint: disable=protected-access
  np.testing.assert_array_equal(labels, [0, 2, 2])


def test_image_folder_missing_directory_is_named(tmp_path):
  missing = str(tmp_path / "images")
  with pytest.raises(FileNotFoundError, match=f"Image folder {missing} does not exist"):
    data.get_source({"name": "image_folder", "data_dir": missing})
  with pytest.raises(ValueError, match="needs cfg.data_dir"):
    data.get_source({"name": "image_folder"})


def test_tfds_preparation_failure_is_one_plain_message(tmp_path, monkeypatch):
  """A data set that cannot be prepared (no network here) gives a short FileNotFoundError that
  says what to do, not the download error's many lines."""
  def fail(self, **kwargs):
    raise ConnectionError("Failed to reach host\n" + "\n".join(f"  frame {i}" for i in range(70)))
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(FileNotFoundError) as e:
    data.get_source({"name": "tfds:mnist", "data_dir": str(tmp_path)})
  message = str(e.value)
  assert "\n" not in message and len(message) < 600
  assert "'mnist' is not prepared" in message and "Failed to reach host" in message
  assert "tfds build" in message and "data_dir" in message


def _epoch_ids(fakes, reader, epoch):
  """Indices of the examples of `reader`'s epoch, in order."""
  images = [tf.io.decode_png(ex["image"]).numpy() for ex in
            reader(tf.constant(epoch, tf.int64)).as_numpy_iterator()]
  return fakes.ids_of(np.stack(images).astype(np.float32))


def test_tfds_epoch_reader_permutes_files_per_epoch(sorted_tfds, fakes):
  """The file order is a function of (key, epoch): each epoch its own, the same every time."""
  src = sorted_tfds()
  parts = src.resolve("train")
  reader = src.epoch_reader(parts, key=7)
  epochs = [_epoch_ids(fakes, reader, e) for e in (0, 1, 0)]
  np.testing.assert_array_equal(epochs[0], epochs[2])
  assert not np.array_equal(epochs[0], epochs[1])
  for ids in epochs[:2]:
    np.testing.assert_array_equal(np.sort(ids), np.arange(512))
    assert len(set(ids[:16] // fakes.sorted_per_shard)) == 16  # 16 files, one record each
  assert not np.array_equal(_epoch_ids(fakes, src.epoch_reader(parts, key=8), 0), epochs[0])
  # One file at a time: whole files, in a permuted order.
  whole = _epoch_ids(fakes, sorted_tfds(file_interleave=1).epoch_reader(parts, key=7), 0)
  files = whole.reshape(64, fakes.sorted_per_shard)
  np.testing.assert_array_equal(files, files[:, :1] + np.arange(fakes.sorted_per_shard))
  assert sorted(files[:, 0]) == list(range(0, 512, 8)) and list(files[:, 0]) != sorted(files[:, 0])
  # shuffle_files=False: the files in order, one at a time (host_dataset), every epoch.
  fixed = sorted_tfds(shuffle_files=False).epoch_reader(parts, key=7)
  np.testing.assert_array_equal(_epoch_ids(fakes, fixed, 1), np.arange(512))


def test_tfds_epoch_reader_reads_a_hosts_part_with_holes(sorted_tfds, fakes):
  """Pieces of files: a host's part starts and ends inside files; a seeded subset has holes."""
  src = sorted_tfds()
  for split in ("train[13:301]", "train[:400]@seeded(100, seed=3)+train[500:]"):
    parts = src.resolve(split)
    for p in range(2):
      chunk = splits.host_chunk(parts, p, 2)
      ids = _epoch_ids(fakes, src.epoch_reader(chunk, key=p), 0)
      np.testing.assert_array_equal(np.sort(ids), np.concatenate([i for _, i in chunk]))


def test_tfds_epoch_reader_without_files_reads_in_order(tfds_source, fakes):
  """Readers without files (tfds.testing.mock_data) read the part in order, every epoch."""
  parts = tfds_source.resolve("train[10:30]")
  reader = tfds_source.epoch_reader(parts, key=7)
  for epoch in range(2):
    np.testing.assert_array_equal(_epoch_ids(fakes, reader, epoch), np.arange(10, 30))
