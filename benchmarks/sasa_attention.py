r"""Training-step time of the SASA ResNet by how its local attention is computed, in one process.

  python -m benchmarks.sasa_attention                       # query blocks 0 (windowed), 4, 7
  python -m benchmarks.sasa_attention --blocks=0,2,3,4 --rounds=5

The model is the attention comparison's SASA point (experiments/attention_comparison.py:
SASA-ResNet-26 with stages 2/2/2 (`--num_layers`), width 6, 2 heads, 7x7 windows, the small
root) on a batch of `--batch` 28x28x1 images (`--image_size`); the step is a jitted forward and
backward pass of the cross-entropy (no optimizer: the attention is what differs). `query_block=0` computes each pixel's window as
window**2 shifted products (`sasa._local_attention`), `query_block=s` by s x s tiles of queries
against their halo (`sasa._blocked_local_attention`). All contenders compile first, then run in
turns (`harness.interleave`) and each reports its median seconds per step and the ratio to the
first; one JSON line each, then a table with the CPU's model name.
"""
import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from vit_jax import models

SASA_POINT = dict(base_width=6, num_heads=2, window=7, root="small")


def make_step(query_block: int, batch: int, num_layers=(2, 2, 2), image_size: int = 28):
  model = models.get_model("SASA-ResNet-26", num_classes=10, query_block=query_block,
                           num_layers=tuple(num_layers), **SASA_POINT)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, image_size, image_size, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=batch))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])

  def loss(params, batch_stats):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad = jax.jit(jax.value_and_grad(loss))
  args = (variables["params"], variables["batch_stats"])
  jax.block_until_ready(grad(*args))  # compile and warm up
  return lambda: jax.block_until_ready(grad(*args))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", default="0,4,7", help="query_block values; the first is the "
                      "reference of the ratios")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--num_layers", default="2,2,2", help="units per stage")
  parser.add_argument("--image_size", type=int, default=28)
  args = parser.parse_args(argv)
  blocks = harness.parse_ints(args.blocks, "--blocks (0: the windowed form)", minimum=0)
  num_layers = harness.parse_ints(args.num_layers, "--num_layers")
  steps = {f"query_block={b}": make_step(b, args.batch, num_layers, args.image_size)
           for b in blocks}
  first = next(iter(steps))
  times = harness.interleave(steps, args.rounds, close_with=first)
  ref = harness.median(times[first])
  rows = []
  for name, ts in times.items():
    record = dict(benchmark="sasa_attention", contender=name, batch=args.batch,
                  num_layers=num_layers, image_size=args.image_size,
                  seconds_per_step=harness.median(ts), ratio_to_first=harness.median(ts) / ref,
                  rounds=ts, **harness.environment())
    harness.emit(record)
    rows.append(f"| {name} | {record['seconds_per_step']:.2f} | {record['ratio_to_first']:.2f} |")
  print(f"\nSASA-ResNet (stages {args.num_layers}, width 6, 2 heads), {args.image_size}x"
        f"{args.image_size}x1 images, batch {args.batch}, forward + backward, "
        f"{harness.cpu_model()}, {harness.cpu_threads()} cores, load "
        f"{harness.load_average()}:\n| computation | s/step | ratio |\n|---|---|---|\n" +
        "\n".join(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
