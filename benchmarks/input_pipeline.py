r"""Does the input pipeline stall the train step? The default Fashion-MNIST run, real data against
one synthetic batch, one JSON line.

  python -m benchmarks.input_pipeline                 # the default run, configs/fashion_mnist.py
  python -m benchmarks.input_pipeline --config_arg=swin --steps=20

Both loops are the trainer's own: `train.Runner` (jit over the mesh, state donated), and for real
data `data.train_iterator` with the next batch fetched and put on the device while the step in
flight runs, as `train.train_and_evaluate` does. The synthetic loop feeds the same device batch
every step. They take turns in chunks of `--steps` steps (real, synthetic, real, ...); each reports
the median per-step time over its chunks, and `overhead` = real / synthetic - 1.
"""
import argparse
import sys
import time

import jax

from benchmarks import harness
from configs import fashion_mnist
from vit_jax import data as data_lib
from vit_jax import train


def build(config):
  """(runner, state, train iterator, first host batch), set up by the trainer's own
  `train.build_trainer`."""
  source = data_lib.get_source(config.dataset)
  it = data_lib.train_iterator(source, split=config.train_split, pp=config.pp_train,
                               batch_size=int(config.batch_size), seed=int(config.seed),
                               mixup=float(config.get("mixup", 0.0)))
  first = next(it)
  trainer = train.build_trainer(config, source.num_classes, first["image"].shape[1:],
                                total_steps=10_000, warmup_steps=0)
  state = jax.jit(trainer.init_state, out_shardings=trainer.shardings)(jax.random.PRNGKey(0))
  trainer.runner.compile(trainer.shardings)
  return trainer.runner, trainer.runner.to_run_state(state), it, first


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config_arg", default="",
                 help="argument of configs/fashion_mnist.py (empty: its default, the demo's)")
  p.add_argument("--steps", type=int, default=30, help="steps per timed chunk")
  p.add_argument("--rounds", type=int, default=5, help="chunks per side")
  p.add_argument("--batch_size", type=int, default=0, help="override the config's (0: keep)")
  args = p.parse_args(argv)
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
