"""ViT-B/16's FLOPs three ways, on a TPU slice compiled from this machine (vit_jax.plan): the
analytic count, the planner's jaxpr count and XLA's cost_analysis, scanned and unrolled.

  python -m benchmarks.plan_flops [--topology=v5e:2x2]

The README's "FLOPs, checked" paragraph quotes what this printed.
"""
import argparse

from configs import imagenet_scratch
from vit_jax import plan


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--batch", type=int, default=64)
  args = parser.parse_args()
  for scan in (False, True):
    c = imagenet_scratch.get_config("imagenet1k,ViT-B/16")
    c.batch_size = c.eval_batch_size = args.batch
    c.model.scan = scan
    c.model.representation_size = None  # the published count has no pre-logits layer
    p = plan.plan(c, args.topology)
    rows = p.per_chip_batch
    print(f"ViT-B/16 {'scanned' if scan else 'unrolled'} on {args.topology}, GFLOPs per image: "
          f"forward: analytic {p.analytic_forward_flops / 1e9:.3f}, planner "
          f"{p.forward_flops_per_image / 1e9:.3f}, XLA cost_analysis "
          f"{p.eval.xla_flops / rows / 1e9:.3f}; train step: planner "
          f"{p.train.dot_flops / rows / 1e9:.2f}, XLA cost_analysis "
          f"{p.train.xla_flops / rows / 1e9:.2f}", flush=True)


if __name__ == "__main__":
  main()
