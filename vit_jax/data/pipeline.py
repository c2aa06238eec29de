"""Deterministic, resumable input pipelines (tf.data) yielding numpy batches for this host.

Training (`train_iterator`) is an infinite stream in which everything follows from (seed, step):

* In-memory sources (Fashion-MNIST, image folders): the global example stream is epoch after
  epoch, epoch e being the stateless permutation `RandomIndexShuffle(seed=(K_perm, e, 0))` of the
  split (no table, any position computed directly); the global batch of step s is positions
  [s*B, (s+1)*B) of the stream and host p takes rows [p*B/P, (p+1)*B/P) of it. So the global batches do not depend on the number of hosts, and
  `start_step` is just where the step counter starts.
* TFDS sources: host p streams its own contiguous part of the split (`splits.host_chunk`); its
  epoch e reads the part's files in an order drawn from (K_files(p), e), several at a time
  (`TfdsSource.epoch_reader`), through a tf.data shuffle buffer of min(part, source.shuffle_buffer)
  records seeded with (K_perm(p) + e); the host's batch s is positions [s*B/P, (s+1)*B/P) of its
  stream. `start_step` starts at the right epoch and `skip`s within it (records only; nothing is
  decoded). So for a fixed host count the stream is a function of (seed, step).

Random augmentations draw uniforms with stateless tf.random ops: for fixed-shape sources the whole
global batch at once, `stateless_uniform((B, k), seed=(K_aug, s))`, row r belonging to position
s*B + r (TFDS: host-local rows, key K_aug(p)); for variable-size sources each example its own
`stateless_uniform((1, k), seed=(K_aug, position))`. Mixup (Beta(a, a), lambda = max(l, 1 - l))
takes its lambda from (K_mix, s); each row's partner is the row before it in the global batch
(row 0's: the last row), so in-memory sources mix the same pairs whatever the host count (each
host also loads the row before its first). TFDS streams mix within the host's rows. CutMix
(Beta(a, a), one box per batch, from (K_cut, s)) pastes the same partner's box; with both on,
each batch takes one of them, CutMix with probability 1/2 (timm's Mixup as DeiT uses it).
The K's are derived from `seed` (and the host for TFDS) with numpy's SeedSequence.

Evaluation (`eval_iterator`) gives host p the contiguous part p of the split, pads it with masked
zeros to the same number of batches on every host and never drops an example.

Detection sources (`source.detection`, the canvases of vit_jax/data/canvases.py) make examples in
numpy: the same global order (epoch e: numpy's permutation of the split from (seed, K_perm, e);
step s takes positions [s*B, (s+1)*B) and host p its rows), made by one background thread; the pp
chain runs on the batch's images only (config_checks allows no op that moves pixels, since the
boxes would not follow). Batches hold "image", "image_mask" (B, H, W), "boxes" (B, T, 4),
"labels" (B, T), "mask" (B, T) (real objects) and, in evaluation, "valid" (B,) (real examples).
"""
import math
import queue
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from vit_jax import errors
from vit_jax.data import preprocess
from vit_jax.data import sources as sources_lib
from vit_jax.data import splits as splits_lib

# tf.data traces every mapped function into a graph; AutoGraph would first rewrite its Python
# source (seconds per map for the pp chains, every time a pipeline is built). Nothing here
# branches on tensors in Python, so the functions are traced as written.
_traced = tf.autograph.experimental.do_not_convert

_PERM, _AUG, _MIXUP, _EVAL, _CUTMIX, _FILES = 1, 2, 3, 4, 5, 6


def _key(*parts: int) -> int:
  """A 62-bit key for stateless seeds from non-negative ints (seed, purpose, host...)."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


def _seed(key: int, x: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(key, tf.int64), tf.cast(x, tf.int64)])


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only for the host's index and count)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise errors.DataError(
        f"process_index {process_index} not in [0, process_count={process_count}).")
  return process_index, process_count


def _local_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise errors.DataError(f"The global batch_size {batch_size} must be a positive multiple of the "
                           f"number of processes {process_count}.")
  return batch_size // process_count


class _Chain:
  """The pp ops of an iterator: on whole batches for fixed-shape sources, else per example."""

  def __init__(self, source: sources_lib.Source, pp: str):
    self.ops = preprocess.parse(pp, channels=source.image_shape[-1])
    self.num_random = preprocess.num_random(self.ops)
    self.batched = all(d is not None for d in source.image_shape)
    self.image_shape = source.image_shape

  def example(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Per-example stage: decode to the fixed shape, or (variable sizes) run the whole chain."""
    if self.batched:
      if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=self.image_shape[-1], expand_animations=False)
      return tf.ensure_shape(image, self.image_shape)
    u = tf.random.stateless_uniform([1, self.num_random], seed)
    return preprocess.apply(self.ops, image[None], u)[0]

  def batch(self, images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Batch stage: the chain for fixed-shape sources (u: (b, num_random)), else a cast."""
    if self.batched:
      return preprocess.apply(self.ops, images, u)
    return tf.cast(images, tf.float32)

  def check_fixed(self, spec: tf.TensorSpec, pp: str):
    if not spec.shape.is_fully_defined():
      raise errors.DataError(
          f"pp {pp!r} gives images of varying size {spec.shape} for this source; end "
          "it with a fixed size (resize, central_crop, random_crop, inception_crop).")


def _beta(seed, alpha: float, fold: bool = False):
  """lambda ~ Beta(alpha, alpha) from a stateless seed (as the ratio of two Gamma draws; 1 when
  both are 0); `fold`: max(lambda, 1 - lambda), mixup's convention."""
  g = tf.random.stateless_gamma([2], seed, alpha=alpha)
  lam = tf.where(g[0] + g[1] > 0, g[0] / (g[0] + g[1]), 1.0)
  return tf.maximum(lam, 1.0 - lam) if fold else lam


def _cutmix(own, partner, alpha: float, lam_seed, box_seed):
  """CutMix (Yun et al. 2019) with one box for the batch: lambda ~ Beta(alpha, alpha), a box of
  sides int(sqrt(1 - lambda) (H, W)) centred at a uniform pixel, clipped to the image (as timm's
  `rand_bbox`); the partner's box pasted over `own`. Returns the images and the kept fraction
  (1 - box area / image area), the weight of the own label."""
  lam = _beta(lam_seed, alpha)
  u = tf.random.stateless_uniform([2], box_seed)
  h, w = tf.shape(own)[1], tf.shape(own)[2]
  fh, fw = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  ratio = tf.sqrt(tf.maximum(1.0 - lam, 0.0))
  ch, cw = tf.cast(fh * ratio, tf.int32), tf.cast(fw * ratio, tf.int32)
  cy = tf.minimum(tf.cast(u[0] * fh, tf.int32), h - 1)
  cx = tf.minimum(tf.cast(u[1] * fw, tf.int32), w - 1)
  y0, y1 = tf.clip_by_value(cy - ch // 2, 0, h), tf.clip_by_value(cy + ch // 2, 0, h)
  x0, x1 = tf.clip_by_value(cx - cw // 2, 0, w), tf.clip_by_value(cx + cw // 2, 0, w)
  ys, xs = tf.range(h), tf.range(w)
  box = (((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :])[None, :, :, None]
  kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (fh * fw)
  return tf.where(box, partner, own), kept


def _finish(images, labels, num_classes: int, mixup: float = 0.0, seed=None,
            partner_row: bool = False, cutmix: float = 0.0, cutmix_seed=None):
  """One-hot labels, and mixup: each row mixed with the row before it (row 0 with the last one),
  lambda ~ Beta(mixup, mixup) folded to >= 0.5, one per batch. With `partner_row` the first row is
  only the partner of the second (the global batch's row before this host's first) and is
  dropped: then every host mixes with the same partners as one host holding the global batch.
  `cutmix` > 0: CutMix with the same partners (`_cutmix`, from `cutmix_seed`); with mixup also on,
  each batch is CutMix'ed with probability 1/2, else mixed up. Mixed labels sum to 1."""
  labels = tf.one_hot(labels, num_classes, dtype=tf.float32)
  if not (cutmix > 0 or mixup > 0):
    return {"image": images, "label": labels}
  if partner_row:
    own, partner, own_l, partner_l = images[1:], images[:-1], labels[1:], labels[:-1]
  else:
    own, partner = images, tf.roll(images, 1, axis=0)
    own_l, partner_l = labels, tf.roll(labels, 1, axis=0)
  if cutmix > 0:
    lam_seed, box_seed, switch_seed = tf.unstack(
        tf.random.experimental.stateless_split(cutmix_seed, 3))
    images, lam = _cutmix(own, partner, cutmix, lam_seed, box_seed)
    if mixup > 0:
      lam_mix = _beta(seed, mixup, fold=True)
      switch = tf.random.stateless_uniform([], switch_seed) < 0.5
      images = tf.where(switch, images, lam_mix * own + (1.0 - lam_mix) * partner)
      lam = tf.where(switch, lam, lam_mix)
  else:
    lam = _beta(seed, mixup, fold=True)
    images = lam * own + (1.0 - lam) * partner
  return {"image": images, "label": lam * own_l + (1.0 - lam) * partner_l}


def _numpy_batches(ds: tf.data.Dataset, on_error: Optional[Callable[[int], None]] = None
                   ) -> Iterator[Dict[str, np.ndarray]]:
  """Yields ds as numpy; on a TF error in batch k, `on_error(k)` may raise a clearer error."""
  it = ds.as_numpy_iterator()
  k = 0
  while True:
    try:
      batch = next(it)
    except StopIteration:
      return
    except tf.errors.OpError:
      if on_error is not None:
        on_error(k)
      raise
    yield batch
    k += 1


def _diagnose(source, indices_of_batch: Callable[[int], np.ndarray]):
  """For encoded in-memory sources: on failure, name the unreadable file (batch k or the next)."""
  if not (isinstance(source, sources_lib.ArraySource) and source.encoded):
    return None

  def on_error(k):
    for j in range(k, k + 3):  # Errors surface in order; look a little further to be safe.
      source.check_examples(indices_of_batch(j))
  return on_error


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def train_iterator(source: sources_lib.Source, *, split: str, pp: str, batch_size: int,
                   seed: int, start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, mixup: float = 0.0,
                   cutmix: float = 0.0, repeats: int = 1,
                   prefetch: int = 2) -> Iterator[Dict[str, np.ndarray]]:
  """Infinite, deterministic training batches for this host, starting at step `start_step`.

  Yields {"image": float32 (B/P, H, W, C), "label": float32 one-hot (B/P, K)} and, for in-memory
  sources, "id": int64 (B/P,) the table index of each row's example; `batch_size` is global (B),
  P the process count. Batch k is the batch of step start_step + k, bitwise the same
  as in an uninterrupted run. `mixup` > 0 mixes each host batch with Beta(mixup, mixup);
  `cutmix` > 0 pastes boxes of the same partners (both on: one of them per batch, see `_finish`).
  `repeats` > 1 is repeated augmentation (Hoffer et al. 2020; DeiT trains with 3): each global
  batch holds B / repeats distinct examples, each `repeats` times with its own augmentation, the
  copies B / repeats rows apart (on other devices, and never a mixup partner of each other); an
  epoch then shows each example once on average, as DeiT's sampler does. (Streamed data sets
  repeat each example in a row within a host and reorder the host's rows the same way.)
  """
  sources_lib.hide_accelerators()
  if seed < 0 or start_step < 0:
    raise errors.DataError(f"seed ({seed}) and start_step ({start_step}) must be >= 0.")
  if mixup < 0 or cutmix < 0:
    raise errors.DataError(f"mixup ({mixup}) and cutmix ({cutmix}) must be >= 0 (0 disables them).")
  if repeats < 1 or batch_size % repeats:
    raise errors.DataError(f"repeated augmentation: batch_size {batch_size} must be a multiple of "
                           f"repeats={repeats} (>= 1).")
  p, num_p = _processes(process_index, process_count)
  b = _local_batch(batch_size, num_p)
  parts = source.resolve(split)
  chain = _Chain(source, pp)
  if source.detection:
    if mixup or cutmix or repeats > 1:
      raise errors.DataError("mixup, cutmix and repeated augmentation mix or repeat whole images; "
                             f"the detection source {source.name} takes none of them.")
    return _detection_train(source, chain, parts, batch_size, b, p, seed, start_step, prefetch)
  if isinstance(source, sources_lib.ArraySource):
    ds, on_error = _train_in_memory(source, chain, source.table_indices(parts), batch_size, b, p,
                                    seed, start_step, mixup, pp, cutmix, repeats)
  else:
    if b % repeats:
      raise errors.DataError(
          f"repeated augmentation: the batch per host ({b}) must be a multiple of "
          f"repeats={repeats} for a streamed data set.")
    ds, on_error = _train_stream(source, chain, parts, b, p, num_p, seed, start_step, mixup, pp,
                                 cutmix, repeats)
  if prefetch:
    ds = ds.prefetch(prefetch)
  return _numpy_batches(_options(ds), on_error)


def _train_in_memory(source, chain, indices, B, b, p, seed, start_step, mixup, pp, cutmix=0.0,
                     repeats=1):
  """Global permutation per epoch of `indices` (into the source's table), host p takes its rows
  of each global batch (and, with mixup or cutmix, the row before them: its first row's
  partner)."""
  n = len(indices)
  idx = tf.constant(indices)
  perm_key, aug_key, mix_key = _key(seed, _PERM), _key(seed, _AUG), _key(seed, _MIXUP)
  cut_key = _key(seed, _CUTMIX)
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  extra = 1 if mixup > 0 or cutmix > 0 else 0  # the partner row
  rows = tf.constant((p * b - extra + np.arange(b + extra)) % B, tf.int64)  # rows of the global
  # batch this host loads: its own, after the partner row (the last one's for host 0).

  distinct = B // repeats

  def lookup(step):  # (b + extra,) global stream positions of those rows, and their indices.
    pos = slot = tf.cast(step, tf.int64) * B + rows  # slot: keys the row's augmentation
    if repeats > 1:  # row r shows the (r mod B/repeats)-th distinct example of the step
      pos = tf.cast(step, tf.int64) * distinct + rows % distinct
    epoch = pos // n
    seeds = tf.stack([tf.fill([b + extra], tf.constant(perm_key, tf.int64)), epoch, 0 * epoch],
                     axis=1)
    # The raw op: tf.random.experimental.index_shuffle mishandles a batch of seeds (TF 2.21).
    order = tf.raw_ops.RandomIndexShuffle(index=pos % n, seed=seeds,  # seeds (b + extra, 3)
                                          max_index=tf.constant(n - 1, tf.int64), rounds=4)
    return slot, tf.gather(idx, order)

  def finish(step, images, labels, ids):
    out = _finish(images, labels, source.num_classes, mixup, _seed(mix_key, step),
                  partner_row=bool(extra), cutmix=cutmix, cutmix_seed=_seed(cut_key, step))
    out["id"] = ids[extra:]  # the table index of each row (of its first example, with mixup)
    return out

  if chain.batched:
    def step_fn(step):
      ids = lookup(step)[1]
      ex = source.load(ids)
      u = tf.gather(tf.random.stateless_uniform([B, chain.num_random], _seed(aug_key, step)),
                    rows)
      return finish(step, chain.batch(ex["image"], u), ex["label"], ids)
    ds = tf.data.Dataset.counter(start_step).map(_traced(step_fn), **parallel)
  else:
    def example_fn(pos, i):
      ex = source.load(i)
      return chain.example(ex["image"], _seed(aug_key, pos)), ex["label"], i
    ds = tf.data.Dataset.counter(start_step).map(_traced(lookup)).unbatch()
    ds = ds.map(_traced(example_fn), **parallel)
    chain.check_fixed(ds.element_spec[0], pp)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_step), ds.batch(b + extra))
    ds = ds.map(_traced(lambda step, ex: finish(step, chain.batch(ex[0], None), ex[1], ex[2])),
                **parallel)
  on_error = _diagnose(source, lambda j: lookup(start_step + j)[1].numpy())
  return ds, on_error


def _train_stream(source, chain, parts, b, p, num_p, seed, start_step, mixup, pp, cutmix=0.0,
                  repeats=1):
  """TFDS: host p streams its own part, its files read in an order drawn from (K_files(p),
  epoch), then shuffled per epoch with seed (K_perm(p) + epoch)."""
  chunk = splits_lib.host_chunk(parts, p, num_p)
  n = splits_lib.num_examples(chunk)
  if n == 0:
    raise errors.DataError(
        f"The split has {splits_lib.num_examples(parts)} examples, fewer than the "
        f"{num_p} processes; host {p} would get none.")
  perm_key, aug_key, mix_key, cut_key = (_key(seed, purpose, p)
                                         for purpose in (_PERM, _AUG, _MIXUP, _CUTMIX))
  read_epoch = source.epoch_reader(chunk, _key(seed, _FILES, p))
  buffer = min(n, source.shuffle_buffer)
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  first = start_step * b  # Position of the first example in this host's stream.
  epoch, offset = divmod(first, n * repeats)  # with repeats, each example `repeats` times in a row

  def shuffled(e):
    ds = read_epoch(e).shuffle(buffer, seed=perm_key + e, reshuffle_each_iteration=False)
    if repeats > 1:
      ds = ds.flat_map(_traced(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(repeats)))
    return ds
  ds = tf.data.Dataset.counter(epoch).flat_map(_traced(shuffled))
  ds = tf.data.Dataset.zip(ds.skip(offset), tf.data.Dataset.counter(first))
  ds = ds.map(_traced(lambda ex, j: (chain.example(ex["image"], _seed(aug_key, j)),
                                     ex["label"])),
              **parallel)
  chain.check_fixed(ds.element_spec[0], pp)
  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_step), ds.batch(b, drop_remainder=True))
  # Repeated copies arrive in a row; the rows (b / repeats, repeats) -> (repeats, b / repeats)
  # put them b / repeats rows apart, as in memory.
  order = np.arange(b).reshape(b // repeats, repeats).T.ravel() if repeats > 1 else None

  def batch_fn(step, ex):
    images, labels = ex
    if order is not None:
      images, labels = tf.gather(images, order), tf.gather(labels, order)
    u = tf.random.stateless_uniform([b, chain.num_random], _seed(aug_key, step))
    return _finish(chain.batch(images, u), labels, source.num_classes, mixup,
                   _seed(mix_key, step), cutmix=cutmix, cutmix_seed=_seed(cut_key, step))
  return ds.map(_traced(batch_fn), **parallel), None


def _eval_plan(n: int, b: int, p: int, num_p: int) -> Tuple[int, int]:
  """(batches every host yields, real examples of host p) for a split of n examples."""
  largest = max((q + 1) * n // num_p - q * n // num_p for q in range(num_p))
  return -(-largest // b), (p + 1) * n // num_p - p * n // num_p


def eval_iterator(source: sources_lib.Source, *, split: str, pp: str, batch_size: int,
                  process_index: Optional[int] = None, process_count: Optional[int] = None,
                  prefetch: int = 2) -> Iterator[Dict[str, np.ndarray]]:
  """Finite evaluation batches for this host: {"image", "label" (one-hot), "mask" (B/P,)}.

  Every host yields the same number of batches; across hosts every example of `split` appears
  exactly once with mask 1; padding rows are zeros with mask 0.
  """
  sources_lib.hide_accelerators()
  p, num_p = _processes(process_index, process_count)
  b = _local_batch(batch_size, num_p)
  parts = source.resolve(split)
  chain = _Chain(source, pp)
  chunk = splits_lib.host_chunk(parts, p, num_p)
  num_batches, n = _eval_plan(splits_lib.num_examples(parts), b, p, num_p)
  if source.detection:
    return _detection_eval(source, chain, parts, chunk, num_batches, n, b, prefetch)
  mask = (np.arange(num_batches * b) < n).astype(np.float32)
  key = _key(0, _EVAL)  # For random ops in an eval pp, if any: fixed, so evals repeat exactly.
  parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  on_error = None
  if isinstance(source, sources_lib.ArraySource):  # Padded with any real example, masked below.
    first = source.table_indices(parts)[:1]
    padded = np.concatenate([source.table_indices(chunk), np.repeat(first, len(mask) - n)])
  if isinstance(source, sources_lib.ArraySource) and chain.batched:  # Whole batches by index.
    def batch_fn(i, m, k):
      ex = source.load(i)
      u = tf.random.stateless_uniform([b, chain.num_random], _seed(key, k))
      return chain.batch(ex["image"], u), ex["label"], m
    ds = tf.data.Dataset.from_tensor_slices(
        (padded.reshape(num_batches, b), mask.reshape(num_batches, b), np.arange(num_batches)))
    ds = ds.map(_traced(batch_fn), **parallel)
  else:  # Example by example (per-example stage), then batches (batch stage).
    if isinstance(source, sources_lib.ArraySource):
      def example_fn(i, m, j):
        ex = source.load(i)
        return chain.example(ex["image"], _seed(key, j)), ex["label"], m
      ds = tf.data.Dataset.from_tensor_slices((padded, mask, np.arange(len(padded))))
      ds = ds.map(_traced(example_fn), **parallel)
      chain.check_fixed(ds.element_spec[0], pp)
      on_error = _diagnose(source, lambda k: padded[k * b:(k + 1) * b])
    else:  # Streamed: this host's examples, then zero padding.
      host = source.host_dataset(chunk) if n else source.host_dataset(parts).take(0)

      def stream_fn(ex, j):
        return chain.example(ex["image"], _seed(key, j)), ex["label"], tf.constant(1.0)
      ds = tf.data.Dataset.zip(host, tf.data.Dataset.counter()).map(_traced(stream_fn), **parallel)
      image_spec, label_spec, _ = ds.element_spec
      chain.check_fixed(image_spec, pp)
      pad = tf.data.Dataset.from_tensors((tf.zeros(image_spec.shape, image_spec.dtype),
                                          tf.zeros([], label_spec.dtype), tf.constant(0.0)))
      ds = ds.concatenate(pad.repeat(len(mask) - n))

    def batch_stage(k, batch):
      u = tf.random.stateless_uniform([b, chain.num_random], _seed(key, k))
      return chain.batch(batch[0], u), batch[1], batch[2]
    ds = ds.batch(b, drop_remainder=True).enumerate().map(_traced(batch_stage), **parallel)

  def finish(images, labels, m):
    out = _finish(images * m[:, None, None, None], labels, source.num_classes)
    out["label"] = out["label"] * m[:, None]
    out["mask"] = m
    return out
  ds = ds.map(_traced(finish))
  if prefetch:
    ds = ds.prefetch(prefetch)
  return _numpy_batches(_options(ds), on_error)


def _flat_parts(parts: splits_lib.Parts) -> Tuple[np.ndarray, np.ndarray]:
  """Resolved parts -> (base split name, index) of every example, in order."""
  bases = np.concatenate([np.full(len(i), b, object) for b, i in parts] + [np.zeros(0, object)])
  return bases, np.concatenate([i for _, i in parts] + [np.zeros(0, np.int64)])


def _detection_rows(source, chain, bases, indices, u) -> Dict[str, np.ndarray]:
  """The examples (bases[i], indices[i]) stacked, their images through the pp chain (u: the
  rows' uniforms)."""
  rows = [source.batch(base, [int(i)]) for base, i in zip(bases, indices)]
  out = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  out["image"] = chain.batch(tf.constant(out["image"]), tf.constant(u, tf.float32)).numpy()
  return out


def _background(make: Callable[[], Iterator], depth: int) -> Iterator:
  """Yields what `make()` yields, produced up to `depth` items ahead by one thread (order kept);
  its errors are raised here. The thread stops when this generator is closed."""
  if depth <= 0:
    yield from make()
    return
  items, stop, done = queue.Queue(depth), threading.Event(), object()

  def produce():
    try:
      for item in make():
        while not stop.is_set():
          try:
            items.put((item, None), timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
      items.put((done, None))
    except Exception as e:  # pylint: disable=broad-except  (re-raised by the consumer)
      items.put((done, e))

  thread = threading.Thread(target=produce, daemon=True, name="detection_batches")
  thread.start()
  try:
    while True:
      item, error = items.get()
      if error is not None:
        raise error
      if item is done:
        return
      yield item
  finally:
    stop.set()


def _detection_train(source, chain, parts, B, b, p, seed, start_step, prefetch):
  """Training batches of a detection source (module docstring): host p's rows of global batch
  s are positions s*B + p*b ... of the stream of per-epoch permutations."""
  bases, indices = _flat_parts(parts)
  n = len(indices)
  if n == 0:
    raise errors.DataError(f"The training split of {source.name} has no examples.")
  perm_key, aug_key = _key(seed, _PERM), _key(seed, _AUG)
  rows = p * b + np.arange(b)

  def make():
    perms = {}
    step = start_step
    while True:
      pos = step * B + rows
      epoch = pos // n
      perms = {e: perms[e] if e in perms else np.random.default_rng([perm_key, e]).permutation(n)
               for e in set(epoch.tolist())}  # the epochs of this step's rows only
      order = np.array([perms[e][i] for e, i in zip(epoch, pos % n)], np.int64)
      u = tf.random.stateless_uniform([B, chain.num_random], _seed(aug_key, step)).numpy()[rows]
      yield _detection_rows(source, chain, bases[order], indices[order], u)
      step += 1
  return _background(make, prefetch)


def _detection_eval(source, chain, parts, chunk, num_batches, n, b, prefetch):
  """Evaluation batches of a detection source: this host's `chunk` (n examples) in order,
  padded with copies of the split's first example (valid False) to `num_batches` batches."""
  bases, indices = _flat_parts(chunk)
  first_bases, first = _flat_parts(parts)
  pad = num_batches * b - n
  bases = np.concatenate([bases, np.repeat(first_bases[:1], pad)])
  indices = np.concatenate([indices, np.repeat(first[:1], pad)])
  valid = np.arange(num_batches * b) < n
  key = _key(0, _EVAL)

  def make():
    for k in range(num_batches):
      sl = slice(k * b, (k + 1) * b)
      u = tf.random.stateless_uniform([b, chain.num_random], _seed(key, k)).numpy()
      out = _detection_rows(source, chain, bases[sl], indices[sl], u)
      out["valid"] = valid[sl]
      yield out
  return _background(make, prefetch)


def steps_per_epoch(source: sources_lib.Source, split: str, batch_size: int) -> int:
  """ceil(examples / global batch): that many steps see every example of `split` at least once."""
  return math.ceil(source.num_examples(split) / batch_size)
