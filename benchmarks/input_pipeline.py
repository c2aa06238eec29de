r"""Does the input pipeline stall the train step? The default Fashion-MNIST run, real data against
one synthetic batch, one JSON line.

  python -m benchmarks.input_pipeline                 # the default run, configs/fashion_mnist.py
  python -m benchmarks.input_pipeline --config_arg=swin --steps=20
  python -m benchmarks.input_pipeline --mode=imagenet_like --images=200 --batches=10

The default mode:

Both loops are the trainer's own: `trainer.Runner` (jit over the mesh, state donated), and for real
data `data.train_iterator` with the next batch fetched and put on the device while the step in
flight runs, as `train.train_and_evaluate` does. The synthetic loop feeds the same device batch
every step. They take turns in chunks of `--steps` steps (real, synthetic, real, ...); each reports
the median per-step time over its chunks, and `overhead` = real / synthetic - 1.

`--mode=imagenet_like`: the training pipeline alone (`data.train_iterator`, no model) on
ImageNet-like JPEGs that the benchmark writes (`--images` of about 400x350, an image folder
source), with `--pp` (default configs/imagenet_scratch.py's augmentation): decode-and-crop (only
the crop's part of each JPEG is decoded) against decode-then-crop (the whole image, then the crop),
in turns of `--batches` batches; images/s of each, their ratio, and images/s per CPU core.
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import harness
from configs import fashion_mnist
from vit_jax import data as data_lib
from vit_jax import trainer as trainer_lib
from vit_jax.data import preprocess


def build(config):
  """(runner, state, train iterator, first host batch), set up by the trainer's own
  `trainer.build_trainer`."""
  source = data_lib.get_source(config.dataset)
  it = data_lib.train_iterator(source, split=config.train_split, pp=config.pp_train,
                               batch_size=int(config.batch_size), seed=int(config.seed),
                               mixup=float(config.get("mixup", 0.0)))
  first = next(it)
  trainer = trainer_lib.build_trainer(config, source.num_classes, first["image"].shape[1:],
                                total_steps=10_000, warmup_steps=0)
  state = jax.jit(trainer.init_state, out_shardings=trainer.shardings)(jax.random.PRNGKey(0))
  trainer.runner.compile(trainer.shardings)
  return trainer.runner, trainer.runner.to_run_state(state), it, first


def write_jpegs(root: str, n: int, classes: int = 10, seed: int = 0) -> dict:
  """n JPEGs of about 400x350 (h 300-400, w 350-450; quality 90) in root/train/<class>/: smooth
  colour fields plus noise, so that files (~40 KB) and decode work resemble photos, not noise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  sizes, hw = [], []
  for i in range(n):
    h, w = int(rng.integers(300, 401)), int(rng.integers(350, 451))
    coarse = rng.uniform(0, 255, (1, h // 25 + 2, w // 25 + 2, 3)).astype(np.float32)
    img = tf.image.resize(coarse, (h, w), method="bicubic")[0].numpy()
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    folder = os.path.join(root, "train", f"c{i % classes}")
    os.makedirs(folder, exist_ok=True)
    data = tf.io.encode_jpeg(img, quality=90).numpy()
    with open(os.path.join(folder, f"{i}.jpg"), "wb") as f:
      f.write(data)
    sizes.append(len(data))
    hw.append((h, w))
  return dict(images=n, mean_kb=round(float(np.mean(sizes)) / 1024, 1),
              mean_hw=[round(float(v)) for v in np.mean(hw, axis=0)])


def imagenet_like(args):
  """Images/s of the training pipeline on ImageNet-like JPEGs, fused against unfused decode."""
  harness.emit(dict(benchmark="environment", **harness.environment()))
  batch = args.batch_size or 64
  with tempfile.TemporaryDirectory() as root:
    files = write_jpegs(root, args.images)
    source = data_lib.get_source({"name": "image_folder", "data_dir": root})
    iterators = {}
    for name, fuse in (("decode_and_crop", True), ("decode_then_crop", False)):
      before = preprocess.FUSE_DECODE_CROP
      preprocess.FUSE_DECODE_CROP = fuse  # read when train_iterator parses the pp string
      try:
        iterators[name] = data_lib.train_iterator(source, split="train", pp=args.pp,
                                                  batch_size=batch, seed=0, process_index=0,
                                                  process_count=1)
      finally:
        preprocess.FUSE_DECODE_CROP = before
    for it in iterators.values():  # warm-up: tf.data's threads, buffers and autotuning
      for _ in range(max(1, args.batches // 2)):
        next(it)

    def chunk(it):
      def run():
        for _ in range(args.batches):
          next(it)
      return run
    load_start = harness.load_average()
    t0 = time.perf_counter()
    times = harness.interleave({k: chunk(it) for k, it in iterators.items()}, args.rounds,
                               close_with="decode_and_crop")
    iterators.clear()  # stops tf.data's read-ahead before the files go
  cores = harness.cpu_threads()
  rate = {k: batch * args.batches / harness.median(v) for k, v in times.items()}
  harness.emit(dict(
      benchmark="input_pipeline_imagenet_like", pp=args.pp, batch=batch, files=files,
      batches_per_chunk=args.batches, rounds=args.rounds, cpu_cores=cores,
      img_per_s={k: round(v, 1) for k, v in rate.items()},
      img_per_s_per_core={k: round(v / cores, 1) for k, v in rate.items()},
      speedup=round(rate["decode_and_crop"] / rate["decode_then_crop"], 3),
      chunk_s={k: [round(t, 3) for t in v] for k, v in times.items()},
      timed_s=round(time.perf_counter() - t0, 1), load_average_start=load_start,
      load_average_end=harness.load_average()))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config_arg", default="",
                 help="argument of configs/fashion_mnist.py (empty: its default, the demo's)")
  p.add_argument("--steps", type=int, default=30, help="steps per timed chunk")
  p.add_argument("--rounds", type=int, default=5, help="chunks per side")
  p.add_argument("--batch_size", type=int, default=0,
                 help="override the config's (0: keep; imagenet_like: 64)")
  p.add_argument("--mode", choices=("step", "imagenet_like"), default="step",
                 help="step: the train step with real against synthetic data; imagenet_like: the "
                 "pipeline alone on ImageNet-like JPEGs, decode-and-crop against decode-then-crop")
  p.add_argument("--images", type=int, default=200, help="imagenet_like: JPEGs to write")
  p.add_argument("--batches", type=int, default=10, help="imagenet_like: batches per timed chunk")
  p.add_argument("--pp", default="decode|inception_crop(224)|flip_lr|value_range(-1, 1)",
                 help="imagenet_like: the training pp string")
  args = p.parse_args(argv)
  if args.mode == "imagenet_like":
    imagenet_like(args)
    return
  harness.disable_compilation_cache()
  harness.emit(dict(benchmark="environment", **harness.environment()))
  config_arg = args.config_arg or fashion_mnist.DEFAULT
  config = fashion_mnist.get_config(config_arg)
  if args.batch_size:
    config.batch_size = args.batch_size
  load_start = harness.load_average()
  with harness.PeakMemory() as mem:
    runner, state, it, first = build(config)
    synthetic = runner.train_batch(first)
    holder = dict(state=state, batch=runner.train_batch(next(it)))
    state, _ = runner.update(holder["state"], synthetic)  # compile
    jax.block_until_ready(state)
    holder["state"] = state

  def real_chunk():
    state, batch = holder["state"], holder["batch"]
    for _ in range(args.steps):
      state, metrics = runner.update(state, batch)
      batch = runner.train_batch(next(it))  # overlaps with the step in flight
    jax.block_until_ready(metrics)
    holder["state"], holder["batch"] = state, batch

  def synthetic_chunk():
    state = holder["state"]
    for _ in range(args.steps):
      state, metrics = runner.update(state, synthetic)
    jax.block_until_ready(metrics)
    holder["state"] = state

  real_chunk()  # warm-up: fills tf.data's buffers and autotuning
  t0 = time.perf_counter()
  times = harness.interleave({"real": real_chunk, "synthetic": synthetic_chunk}, args.rounds,
                             close_with="real")
  real = harness.median(times["real"]) / args.steps
  synth = harness.median(times["synthetic"]) / args.steps
  harness.emit(dict(
      benchmark="input_pipeline", config=f"fashion_mnist.py:{config_arg}",
      model=config.model_name, batch=int(config.batch_size), pp_train=config.pp_train,
      steps_per_chunk=args.steps, rounds=args.rounds,
      real_step_s=round(real, 5), synthetic_step_s=round(synth, 5),
      real_img_per_s=round(config.batch_size / real, 1),
      synthetic_img_per_s=round(config.batch_size / synth, 1),
      overhead=round(real / synth - 1, 4),
      chunk_s=dict(real=[round(t, 3) for t in times["real"]],
                   synthetic=[round(t, 3) for t in times["synthetic"]]),
      timed_s=round(time.perf_counter() - t0, 1), memory=mem.summary(),
      load_average_start=load_start, load_average_end=harness.load_average()))


if __name__ == "__main__":
  main(sys.argv[1:])
