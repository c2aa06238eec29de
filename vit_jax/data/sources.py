"""Data sources: TFDS by name, Debian's Fashion-MNIST files, and folders of images.

`vit_jax.data.catalog.get_source(cfg)` (also `vit_jax.data.get_source`) picks one from `cfg.name`:
  "fashion_mnist"  /usr/share/datasets/fashion-mnist (or cfg.data_dir), read into memory as uint8;
                   if the files are missing, TFDS `fashion_mnist` (cfg.tfds_data_dir), unless
                   cfg.tfds_fallback is False; if both fail, an error naming the directory and the
                   apt command.
  "tfds:<name>"    any TFDS data set ("tfds:cifar10", "tfds:imagenet2012:5.1.0"); cfg.data_dir is
                   TFDS's data_dir, cfg.manual_dir its manual_dir; cfg.image_key / cfg.label_key
                   ("image", "label") and cfg.shuffle_buffer (50_000 encoded records per host);
                   cfg.shuffle_files (True) and cfg.file_interleave (16), if set: how training
                   reads the files (`TfdsSource.epoch_reader`).
  "image_folder"   cfg.data_dir/<split>/<class>/*.{jpg,jpeg,png}; classes are the sorted union of
                   the class folders of all splits (a class may lack a split's folder: labels
                   still agree between splits; a class folder without an image in any split is an
                   error). cfg.channels (3) is what every image decodes to: grey ones are repeated
                   to RGB, RGBA ones lose their alpha (channels=1: RGB ones become luma). An
                   unreadable or truncated file is an error naming it.
  "fashion_mnist_canvases"  multi-object detection canvases made from Fashion-MNIST garments
                   (vit_jax/data/canvases.py; cfg.data_dir as for "fashion_mnist", Debian's files
                   only): examples carry boxes and labels, not a class (`Source.detection`).

A source answers `num_examples(split)` after split arithmetic (`vit_jax.data.splits`). In-memory
sources (`ArraySource`) give random access by index, so the pipeline can shuffle globally; TFDS
sources (`TfdsSource`) give each host a stream of its own contiguous part of the split; for
training, epoch by epoch, its files in an order drawn per epoch and several read at a time.
"""
import functools
import gzip
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import errors
from vit_jax.data import splits as splits_lib

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
KNOWN_NAMES = ("fashion_mnist", "tfds:<name>", "image_folder", "fashion_mnist_canvases")


def hide_accelerators():
  """Keeps TensorFlow (used here for input pipelines only) off the GPUs that JAX uses."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices (then it was hidden before).
    pass


class Source:
  """What the pipeline needs to know about a data set."""
  name: str
  num_classes: int
  image_shape: Tuple[Optional[int], Optional[int], int]  # (H, W, C); None where sizes vary.
  class_names: Tuple[str, ...]
  encoded: bool  # True: images come as encoded bytes, False: as uint8 arrays.
  # True: examples are detection targets (boxes, labels, object mask; vit_jax/data/canvases.py)
  # and the pipeline builds their batches in numpy instead of tf.data.
  detection: bool = False

  def split_size(self, base: str) -> int:
    """Examples in base split `base`; ValueError listing the splits for an unknown one."""
    raise NotImplementedError

  def resolve(self, split: str) -> splits_lib.Parts:
    """[(base split, sorted indices into it), ...] selected by `split` (see splits.py)."""
    bases = {spec.base for spec in splits_lib.parse(split)}
    return splits_lib.resolve(split, {base: self.split_size(base) for base in bases})

  def num_examples(self, split: str) -> int:
    """Examples `split` selects, over all hosts."""
    return splits_lib.num_examples(self.resolve(split))

  def __repr__(self):
    return (f"{type(self).__name__}({self.name!r}, num_classes={self.num_classes}, "
            f"image_shape={self.image_shape})")


class ArraySource(Source):
  """Examples in memory, per base split: uint8 images (N, H, W, C), or file paths (N,) as bytes
  when `encoded`; int labels (N,). Random access by index into the concatenation of the base
  splits in sorted order (`table_indices` turns resolved parts into such indices)."""

  def __init__(self, name: str, data: Dict[str, Tuple[np.ndarray, np.ndarray]], *,
               class_names: Sequence[str], image_shape, encoded: bool):
    self.name, self._data, self.encoded = name, data, encoded
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    self.image_shape = tuple(image_shape)
    self._offsets, offset = {}, 0
    for base in sorted(data):
      self._offsets[base] = offset
      offset += len(data[base][1])
    self._table = None

  def split_size(self, base):
    if base not in self._data:
      raise errors.DataError(
          f"Unknown split {base!r} for {self.name}; known: {sorted(self._data)}.")
    return len(self._data[base][1])

  def table_indices(self, parts: splits_lib.Parts) -> np.ndarray:
    """Indices into the concatenated table of the examples of `parts`, in order."""
    return np.concatenate([self._offsets[base] + indices for base, indices in parts] +
                          [np.zeros(0, np.int64)])

  def load(self, index: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Examples at table `index` (scalar or vector of int64), inside tf.data. Encoded sources
    give the file's bytes (the decode op turns them into pixels)."""
    if self._table is None:  # Built once, eagerly; tf.data functions capture the tensors.
      bases = sorted(self._data)
      images = np.concatenate([self._data[b][0] for b in bases])
      labels = np.concatenate([self._data[b][1] for b in bases]).astype(np.int32)
      with tf.init_scope():
        self._table = (tf.constant(images), tf.constant(labels))
    images, labels = self._table
    image = tf.gather(images, index)
    if self.encoded:  # The pipeline loads encoded images one at a time.
      image = tf.io.read_file(image)
    return {"image": image, "label": tf.gather(labels, index)}

  def check_examples(self, indices: np.ndarray):
    """Raises ValueError naming the first file among table `indices` that cannot be decoded."""
    if not self.encoded:
      return
    paths = np.concatenate([self._data[b][0] for b in sorted(self._data)])
    for i in indices:
      path = paths[i].decode()
      try:
        tf.io.decode_image(tf.io.read_file(path), channels=self.image_shape[-1],
                           expand_animations=False)
      except (tf.errors.OpError, ValueError) as e:
        raise errors.DataError(
            f"Cannot read image file {path}: {getattr(e, 'message', e)}") from None


class TfdsSource(Source):
  """A TFDS data set; each host streams its own contiguous part of a split.

  An unprepared data set is prepared (downloaded and converted) on construction: with several
  processes by process 0 only while the others wait at a barrier, then read by all (a data_dir
  that the others still find unprepared, i.e. not shared, is prepared by each of them). The
  process index and count default to JAX's, asked only when the data set is not prepared.

  Training reads epochs with `epoch_reader`: `shuffle_files` (default) draws each epoch's file
  order and reads `file_interleave` files at a time; False reads the files in order, one at a time.
  """

  def __init__(self, name: str, *, data_dir: Optional[str] = None,
               manual_dir: Optional[str] = None, image_key: str = "image",
               label_key: str = "label", shuffle_buffer: int = 50_000,
               shuffle_files: bool = True, file_interleave: int = 16,
               process_index: Optional[int] = None, process_count: Optional[int] = None):
    self.name, self.image_key, self.label_key = name, image_key, label_key
    self.shuffle_buffer = shuffle_buffer
    if file_interleave < 1:
      raise errors.DataError(f"file_interleave ({file_interleave}) must be >= 1.")
    self.shuffle_files, self.file_interleave = shuffle_files, file_interleave
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise errors.DataError(f"TFDS has no data set {name!r}: {e}") from None
    if not self.builder.is_prepared():
      self._prepare(name, data_dir, manual_dir, process_index, process_count)
    features = self.builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise errors.DataError(f"TFDS {name!r} has no feature {key!r}; features: {list(features)}. "
                               "Set cfg.image_key / cfg.label_key.")
    if not isinstance(features[label_key], tfds.features.ClassLabel):
      raise errors.DataError(f"TFDS {name!r} feature {label_key!r} is not a class label; set "
                             "cfg.label_key to one.")
    self.num_classes = features[label_key].num_classes
    self.class_names = tuple(features[label_key].names)
    self.image_shape = tuple(features[image_key].shape)
    self.encoded = isinstance(features[image_key], tfds.features.Image)
    self._sizes = {}

  def _prepare(self, name, data_dir, manual_dir, process_index, process_count):
    """download_and_prepare: by process 0 while the others wait (see the class docstring)."""
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top  (only for the process index and count)
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if process_count == 1:
      self._download_and_prepare(name, manual_dir)
      return
    error = None
    if process_index == 0:
      try:
        self._download_and_prepare(name, manual_dir)
      except FileNotFoundError as e:
        error = e  # Raised after the barrier, so that the others do not wait forever.
    _barrier(f"vit_jax_tfds_prepare:{name}:{data_dir}")
    if error is not None:
      raise error
    if process_index != 0:
      self.builder = tfds.builder(name, data_dir=data_dir)  # Reads what process 0 wrote.
      if not self.builder.is_prepared():
        logging.warning("TFDS %r: process 0 prepared it, but %s is not prepared here (a data_dir "
                        "that is not shared?); preparing it on process %d too.", name,
                        self.builder.data_dir, process_index)
        self._download_and_prepare(name, manual_dir)

  def _download_and_prepare(self, name, manual_dir):
    try:
      self.builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # pylint: disable=broad-except
      first_line = (str(e).strip().splitlines() or [""])[0][:200]
      raise errors.MissingFileError(
          f"TFDS data set {name!r} is not prepared in {self.builder.data_dir!r} and preparing it "
          f"failed ({type(e).__name__}: {first_line}). Prepare it where there is network access "
          "(`tfds build`), then point cfg.data_dir at that TFDS data_dir; data sets that need "
          "manual downloads want cfg.manual_dir.") from e

  def split_size(self, base):
    if base not in self._sizes:
      known = self.builder.info.splits
      if known:  # A prepared data set knows its splits.
        if base not in known:
          raise errors.DataError(f"Unknown split {base!r} for TFDS {self.name!r}; known: "
                                 f"{sorted(known)}.")
        self._sizes[base] = known[base].num_examples
      else:  # Builders without split metadata (tfds.testing.mock_data): ask the reader.
        n = int(self.builder.as_dataset(split=base).cardinality())
        if n < 0:
          raise errors.DataError(f"TFDS {self.name!r} does not know the size of split {base!r}.")
        self._sizes[base] = n
    return self._sizes[base]

  def host_dataset(self, parts: splits_lib.Parts) -> tf.data.Dataset:
    """{"image", "label"} of the examples of `parts` (a host's chunk), in order.

    Reads `base[lo:hi]` per part (one file at a time, so that stream order is index order); a part
    with holes (seeded subsets) is filtered by position.
    """
    datasets = []
    for base, indices in parts:
      lo, hi = int(indices[0]), int(indices[-1]) + 1
      split = base if (lo, hi) == (0, self.split_size(base)) else f"{base}[{lo}:{hi}]"
      decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None
      ds = self.builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                                   read_config=tfds.ReadConfig(interleave_cycle_length=1))
      # take(): exact counts even from readers that ignore slices (tfds.testing.mock_data).
      ds = ds.take(hi - lo).map(tf.autograph.experimental.do_not_convert(
          lambda ex: {"image": ex[self.image_key], "label": ex[self.label_key]}))
      if len(indices) != hi - lo:
        mask = np.zeros(hi - lo, bool)
        mask[indices - lo] = True
        ds = ds.enumerate().filter(_selected(tf.constant(mask))).map(_drop_position)
      datasets.append(ds)
    return functools.reduce(lambda a, b: a.concatenate(b), datasets)

  def epoch_reader(self, parts: splits_lib.Parts, key: int
                   ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """For training: epoch e (a scalar int64 tensor) -> {"image", "label"} of every example of
    `parts` (a host's chunk) once, in an order that follows from (key, e) only.

    The chunk's files (one piece per shard it meets: (file, skip, take), as TFDS's split
    arithmetic gives them) are permuted by `stateless_shuffle(seed=(key, e))` and read
    `file_interleave` at a time, one record from each in turn (a piece that ends gives its place
    to the next one). The pipeline's shuffle buffer then mixes the stream. Without
    `shuffle_files`, or when the reader has no files (non-TFRecord formats;
    tfds.testing.mock_data), every epoch is `host_dataset` (the chunk in order).
    """
    pieces = self._pieces(parts) if self.shuffle_files else None
    if pieces is None:
      host = self.host_dataset(parts)
      return lambda e: host
    files, skips, takes, starts, mask = pieces
    cycle = min(self.file_interleave, len(files))
    features = self.builder.info.features
    decoders = {self.image_key: tfds.decode.SkipDecoding()} if self.encoded else None

    @tf.autograph.experimental.do_not_convert
    def read(file, skip, take, start):  # (chunk position, record) of one piece's records
      records = tf.data.TFRecordDataset(file).skip(skip).take(take)
      return tf.data.Dataset.zip(tf.data.Dataset.range(start, start + take), records)

    @tf.autograph.experimental.do_not_convert
    def parse(position, record):
      del position
      ex = features.deserialize_example(record, decoders=decoders)
      return {"image": ex[self.image_key], "label": ex[self.label_key]}

    def epoch(e):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(files)), seed=tf.stack([tf.constant(key, tf.int64), tf.cast(e, tf.int64)]))
      ds = tf.data.Dataset.from_tensor_slices(
          tuple(tf.gather(t, order) for t in (files, skips, takes, starts)))
      ds = ds.interleave(read, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                         deterministic=True)
      if mask is not None:  # a part with holes (seeded subset): keep the selected positions
        ds = ds.filter(_selected(tf.constant(mask)))
      return ds.map(parse)
    return epoch

  def _pieces(self, parts: splits_lib.Parts):
    """(files, skips, takes, starts, mask) of the pieces of files that hold `parts`, in split
    order: piece i is records [skip, skip + take) of its file, at positions [start, start + take)
    of the concatenated ranges base[lo:hi] of the parts; mask (over those positions) selects the
    parts' examples, None when they have no holes. None when TFDS reads no TFRecord files here."""
    info = self.builder.info
    if info.file_format != tfds.core.FileFormat.TFRECORD or not all(
        base in info.splits for base, _ in parts):
      return None
    files, skips, takes, starts, selected, position = [], [], [], [], [], 0
    for base, indices in parts:
      lo, hi = int(indices[0]), int(indices[-1]) + 1
      for instruction in info.splits[f"{base}[{lo}:{hi}]"].file_instructions:
        files.append(os.fspath(instruction.filename))
        skips.append(instruction.skip)
        takes.append(instruction.take)
        starts.append(position)
        position += instruction.take
      part = np.zeros(hi - lo, bool)
      part[indices - lo] = True
      selected.append(part)
    if position != sum(len(s) for s in selected) or not tf.io.gfile.exists(files[0]):
      return None  # metadata without its files (mocked readers)
    mask = np.concatenate(selected)
    return (tf.constant(files), tf.constant(skips, tf.int64), tf.constant(takes, tf.int64),
            tf.constant(starts, tf.int64), None if mask.all() else mask)


def _barrier(name: str):
  """Waits until every JAX process gets here."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices(name)


def _selected(keep: tf.Tensor):
  @tf.autograph.experimental.do_not_convert  # plain graph code, as in pipeline.py
  def fn(i, ex):
    del ex
    return tf.gather(keep, i)
  return fn


@tf.autograph.experimental.do_not_convert
def _drop_position(i, ex):
  del i
  return ex


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """An IDX file (the MNIST format): big-endian magic, `ndim` sizes, then uint8 data."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise errors.DataError(f"Cannot read {path}: {e}. Reinstall it with "
                           "`sudo apt-get install --reinstall dataset-fashion-mnist`.") from None
  header = np.frombuffer(raw, ">i4", count=1 + ndim) if len(raw) >= 4 + 4 * ndim else None
  if header is None or header[0] != magic or len(raw) != 4 + 4 * ndim + int(np.prod(header[1:])):
    raise errors.DataError(
        f"{path} is not a valid IDX file (magic {magic}, {ndim} dimensions); "
        "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`.")
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(header[1:])


@functools.lru_cache(maxsize=2)
def _load_fashion_mnist(directory: str) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  data = {}
  for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
    images = _read_idx(os.path.join(directory, images_file), 2051, 3)[..., None]  # (N, 28, 28, 1)
    labels = _read_idx(os.path.join(directory, labels_file), 2049, 1)
    if len(images) != len(labels):
      raise errors.DataError(f"{images_file} has {len(images)} images but {labels_file} has "
                             f"{len(labels)} labels in {directory}.")
    data[split] = (images, labels)
  return data


def fashion_mnist(data_dir: Optional[str] = None, *, tfds_fallback: bool = True,
                  tfds_data_dir: Optional[str] = None) -> Source:
  """Debian's Fashion-MNIST (train 60000, test 10000) in memory; TFDS if the files are missing
  from Debian's directory (a `data_dir` given explicitly must hold them)."""
  directory = data_dir or FASHION_MNIST_DIR
  files = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
  missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
  if not missing:
    return ArraySource("fashion_mnist", _load_fashion_mnist(directory),
                       class_names=FASHION_MNIST_CLASSES, image_shape=(28, 28, 1), encoded=False)
  reason = ""
  if tfds_fallback and data_dir is None:  # a directory the user named is never replaced
    logging.warning("Fashion-MNIST files missing in %s (%s); trying TFDS fashion_mnist.",
                    directory, ", ".join(missing))
    try:
      return TfdsSource("fashion_mnist", data_dir=tfds_data_dir)
    except Exception as e:  # pylint: disable=broad-except
      reason = f" The TFDS fallback failed too: {type(e).__name__}: {e}"
  raise errors.MissingFileError(
      f"Fashion-MNIST not found in {directory}: missing {', '.join(missing)}. Install Debian's "
      "package with `sudo apt-get install dataset-fashion-mnist` (or `make data`), or set "
      f"data_dir to a directory holding {', '.join(files)}.{reason}")


def image_folder(data_dir: Optional[str], *, channels: int = 3) -> Source:
  """Images in `data_dir/<split>/<class>/*.{jpg,jpeg,png}`; labels index the sorted class names."""
  layout = "<data_dir>/<split>/<class>/*.jpg|*.png"
  if not data_dir:
    raise errors.DataError(f"image_folder needs cfg.data_dir (layout {layout}).")
  if not os.path.isdir(data_dir):
    raise errors.MissingFileError(
        f"Image folder {data_dir} does not exist (expected layout {layout}); "
        "set cfg.data_dir to the folder's root.")
  split_names = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
  classes = sorted({c for s in split_names for c in os.listdir(os.path.join(data_dir, s))
                    if os.path.isdir(os.path.join(data_dir, s, c))})
  if not classes:
    raise errors.DataError(f"No class folders in {data_dir} (expected layout {layout}).")
  data = {}
  for split in split_names:
    paths: List[str] = []
    labels: List[int] = []
    for label, c in enumerate(classes):
      folder = os.path.join(data_dir, split, c)
      if not os.path.isdir(folder):
        continue
      names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(folder, f) for f in names]
      labels += [label] * len(names)
    if paths:
      data[split] = (np.array([p.encode() for p in paths]), np.array(labels, np.int32))
  if not data:
    raise errors.DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {data_dir} "
                           f"(expected layout {layout}).")
  used = {int(label) for _, labels in data.values() for label in labels}
  empty = [c for i, c in enumerate(classes) if i not in used]
  if empty:
    folders = [os.path.join(data_dir, s, c) for c in empty for s in split_names
               if os.path.isdir(os.path.join(data_dir, s, c))]
    raise errors.DataError(
        f"Class folder(s) without any image ({', '.join(IMAGE_EXTENSIONS)}) in any split: "
        f"{', '.join(folders)}. Each class folder counts as a class (the model's class count and "
        "the labels follow them): add images or remove the folder(s).")
  return ArraySource(f"image_folder:{data_dir}", data, class_names=classes,
                     image_shape=(None, None, channels), encoded=True)


def describe(cfg) -> Tuple[Tuple[Optional[int], Optional[int], int], int, bool]:
  """(image_shape, num_classes, encoded) of the data set `cfg` names, without reading its
  examples: what the planner (vit_jax.plan) needs to shape a batch. Fashion-MNIST's are known;
  a TFDS data set's come from its builder's feature spec (no prepared data needed); an image
  folder's classes are its class folders (the folder must exist). Detection canvases are not
  classification data and raise ValueError."""
  name = cfg.get("name")
  if name == "fashion_mnist":
    return (28, 28, 1), len(FASHION_MNIST_CLASSES), False
  if isinstance(name, str) and name.startswith("tfds:") and len(name) > len("tfds:"):
    builder = tfds.builder(name[len("tfds:"):], data_dir=cfg.get("data_dir"))
    features = builder.info.features
    image = features[cfg.get("image_key", "image")]
    return (tuple(image.shape), features[cfg.get("label_key", "label")].num_classes,
            isinstance(image, tfds.features.Image))
  if name == "image_folder":
    source = image_folder(cfg.get("data_dir"), channels=cfg.get("channels", 3))
    return source.image_shape, source.num_classes, True
  raise errors.DataError(f"Data source {name!r} has no image shape and class count to describe "
                         f"(classification sources: {', '.join(KNOWN_NAMES[:3])}).")
