r"""The Image Transformer against its baselines on Fashion-MNIST, with the same budget: the same
model size, schedule and number of training images for local 2D attention (the Image
Transformer), local 1D attention, and full causal attention over all 784 intensities
(configs/image_transformer.py), judged in bits per dimension.

  python -m experiments.runner experiments/image_transformer.py --out=workdirs/imt \
      --no-plan --no-aggregate
  python -m vit_jax.sample --workdir=workdirs/imt/points/imt_2d --num=16 --out=samples.png

Arg: `epochs=E` (default 0.15 of the 54,000 training images: 8,100), `only=2d/1d/full`.
"""
from experiments import sweep

CONFIG = "configs/image_transformer.py"
DEFAULTS = dict(epochs=0.15, only=("2d", "1d", "full"))


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  points = []
  for kind in a["only"]:
    if kind not in ("2d", "1d", "full"):
      raise ValueError(f"Unknown attention {kind!r}; known: 2d, 1d, full.")
    points.append(sweep.Point(f"imt_{kind}", f"{CONFIG}:{kind}",
                              {"total_epochs": float(a["epochs"])},
                              {"family": "ImageTransformer", "attention": kind}))
  return sweep.Sweep("image_transformer", points,
                     "Local 2D vs local 1D vs full causal attention, same budget, bits/dim.")
