r"""How well does the TFDS training stream mix a data set whose files are sorted by class?

  python -m benchmarks.data_order                  # 64 shards x 1000 examples, 10 classes
  python -m benchmarks.data_order --shards=64 --per_shard=200 --first=2000 --window=200

Writes a TFDS data set (TFRecord shards and TFDS metadata, read back with `tfds.builder`) of
`--shards` files whose examples are sorted by class (shard s holds class s * classes // shards),
as ImageNet's would be if its files followed the class folders. It reads the first `--first`
examples of epochs 0 and 1 of host 0's training stream (`data.train_iterator`, pp "decode") in two
orders:

  fixed     the files in order, one at a time (`TfdsSource(shuffle_files=False)`: the order before
            issue 34, item 8), then the shuffle buffer;
  per_epoch each epoch's file order drawn from (seed, epoch), `--file_interleave` files read at a
            time, then the same shuffle buffer (the default).

The buffer is ImageNet's ratio: 50_000 of 1_281_167 examples, scaled to the data set's size
(`--buffer` overrides it). A third row, `uniform`, is a global uniform permutation of the split
(numpy), the ideal. One JSON line per (order, epoch) and one per order for the overlap:

  classes_per_window_min / _mean  distinct classes in each window of `--window` examples
  shards                          distinct files among the first `--first` examples
  tv_from_uniform                 total-variation distance of their class histogram from uniform
                                  (0: balanced; 1 - 1/classes: one class only)
  overlap                         |first(epoch 0) & first(epoch 1)| / first (uniform: first / n)

No timing is taken.
"""
import argparse
import os
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from benchmarks import harness
from vit_jax import data as data_lib
from vit_jax.data import sources

IMAGENET_TRAIN, IMAGENET_BUFFER = 1_281_167, 50_000
NAME = "sorted_shards"


def write_tfds(root: str, images: np.ndarray, labels: np.ndarray, num_shards: int,
               num_classes: int, name: str = NAME, split: str = "train") -> str:
  """Writes uint8 `images` (N, H, W, C) and `labels` as the TFDS data set `name` 1.0.0 under
  `root` (PNG images, a ClassLabel), `num_shards` TFRecord files of consecutive examples;
  `tfds.builder(name, data_dir=root)` reads it. Returns the data set's directory."""
  directory = os.path.join(root, name, "1.0.0")
  os.makedirs(directory, exist_ok=True)
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=images.shape[1:]),
      "label": tfds.features.ClassLabel(num_classes=num_classes)})
  bounds = np.linspace(0, len(images), num_shards + 1).astype(int)
  pngs = [tf.io.encode_png(image).numpy() for image in images]
  for s in range(num_shards):
    path = os.path.join(directory, f"{name}-{split}.tfrecord-{s:05d}-of-{num_shards:05d}")
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(bounds[s], bounds[s + 1]):
        writer.write(features.serialize_example({"image": pngs[i], "label": int(labels[i])}))
  split_info = tfds.core.SplitInfo(name=split, shard_lengths=np.diff(bounds).tolist(),
                                   num_bytes=0)
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, split_infos=[split_info],
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  return directory


def sorted_by_class(num_shards: int, per_shard: int, num_classes: int):
  """(images (N, 4, 4, 1) whose first two pixels spell the index, labels): shard s's examples
  are all of class s * num_classes // num_shards."""
  n = num_shards * per_shard
  images = np.zeros((n, 4, 4, 1), np.uint8)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
  return images, np.arange(n) // per_shard * num_classes // num_shards


def read_first(source, n: int, first: int, batch: int, epoch: int, seed: int):
  """(indices, labels) of the first `first` examples of `epoch` of the one-host stream."""
  if n % batch or first % batch:
    raise ValueError(f"--first ({first}) and the split's size ({n}) must be multiples of the "
                     f"batch ({batch}).")
  it = data_lib.train_iterator(source, split="train", pp="decode", batch_size=batch, seed=seed,
                               start_step=epoch * n // batch, process_index=0, process_count=1)
  ids, labels = [], []
  for _ in range(first // batch):
    b = next(it)
    flat = b["image"].reshape(batch, -1)
    ids.append((flat[:, 0] + 256 * flat[:, 1]).round().astype(np.int64))
    labels.append(b["label"].argmax(1))
  return np.concatenate(ids), np.concatenate(labels)


def quality(ids, labels, per_shard: int, num_classes: int, window: int) -> dict:
  per_window = [len(np.unique(labels[i:i + window])) for i in range(0, len(labels), window)]
  share = np.bincount(labels, minlength=num_classes) / len(labels)
  return dict(classes_per_window_min=int(min(per_window)),
              classes_per_window_mean=round(float(np.mean(per_window)), 2),
              shards=int(len(np.unique(ids // per_shard))),
              tv_from_uniform=round(float(0.5 * np.abs(share - 1 / num_classes).sum()), 4))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shards", type=int, default=64)
  parser.add_argument("--per_shard", type=int, default=1000)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--first", type=int, default=10_000)
  parser.add_argument("--window", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=500)
  parser.add_argument("--buffer", type=int, default=0, help="0: ImageNet's ratio")
  parser.add_argument("--file_interleave", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  n = args.shards * args.per_shard
  buffer = args.buffer or max(1, round(IMAGENET_BUFFER * n / IMAGENET_TRAIN))
  sources.hide_accelerators()
  with tempfile.TemporaryDirectory() as root:
    write_tfds(root, *sorted_by_class(args.shards, args.per_shard, args.classes),
               args.shards, args.classes)
    firsts = {}
    for order, shuffle_files in (("fixed", False), ("per_epoch", True)):
      source = sources.TfdsSource(NAME, data_dir=root, shuffle_buffer=buffer,
                                  shuffle_files=shuffle_files,
                                  file_interleave=args.file_interleave)
      firsts[order] = [read_first(source, n, args.first, args.batch, e, args.seed) for e in (0, 1)]
    rng = np.random.default_rng(args.seed)
    labels_of = sorted_by_class(args.shards, args.per_shard, args.classes)[1]
    uniform = [rng.permutation(n)[:args.first] for _ in range(2)]
    firsts["uniform"] = [(ids, labels_of[ids]) for ids in uniform]
  common = dict(examples=n, shards_in_split=args.shards, classes=args.classes, first=args.first,
                buffer=buffer, file_interleave=args.file_interleave, seed=args.seed)
  for order, epochs in firsts.items():
    for epoch, (ids, labels) in enumerate(epochs):
      harness.emit(dict(order=order, epoch=epoch, **quality(ids, labels, args.per_shard,
                                                            args.classes, args.window), **common))
    overlap = len(np.intersect1d(epochs[0][0], epochs[1][0])) / args.first
    harness.emit(dict(order=order, overlap=round(overlap, 4), **common))


if __name__ == "__main__":
  main()
