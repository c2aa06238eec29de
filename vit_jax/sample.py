r"""Images drawn from a trained autoregressive model (loss="generation": the Image Transformer).

  python -m vit_jax.sample --workdir=WORKDIR --num=16 --out=samples.png [--seed=0] \
      [--temperature=1.0] [--npy=samples.npy]

Reads the run with the one workdir loader (vit_jax.workdirs.load: the latest checkpoint, else
the exported params.npz), draws --num images one intensity at a time in the model's generation
order (H x W x C forward passes, compiled into one loop), and writes them as one PNG grid (and,
with --npy, the uint8 array (num, H, W, C)). The same seed gives the same images.
"""
import argparse
import math
import sys

import jax
import numpy as np

from vit_jax import errors
from vit_jax import workdirs
from vit_jax.models import image_transformer


def draw(workdir: str, *, num: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
  """uint8 images (num, H, W, C) sampled from the run in `workdir`."""
  if not workdirs.is_workdir(workdir):
    raise errors.MissingFileError(f"{workdir} holds no training run (config.json and a "
                                  "checkpoint or params.npz): train there first.")
  run = workdirs.load(workdir)
  if not isinstance(run.model, image_transformer.ImageTransformer):
    raise errors.ConfigError(f"{workdir} holds a {run.config.model_name} run: sampling needs an "
                             "autoregressive model (loss='generation', ImageTransformer-*).")
  if num < 1 or temperature <= 0:
    raise errors.ConfigError(f"--num={num} must be >= 1 and --temperature={temperature} > 0.")
  fn = jax.jit(lambda v, rng: image_transformer.sample(
      run.model, v, run.image_shape, rng, num=num, temperature=temperature))
  images = fn(run.variables, jax.random.PRNGKey(seed))
  return np.asarray(images).astype(np.uint8)


def grid(images: np.ndarray, columns: int = 0) -> np.ndarray:
  """(num, H, W, C) -> one (rows*(H+1)-1, cols*(W+1)-1, C) picture, 1-pixel white gaps."""
  n, h, w, c = images.shape
  cols = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, k = divmod(i, cols)
    out[r * (h + 1):r * (h + 1) + h, k * (w + 1):k * (w + 1) + w] = im
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vit_jax.sample", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num", type=int, default=16)
  parser.add_argument("--out", required=True, help="the PNG grid")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--npy", default=None, help="also save the uint8 images here")
  args = parser.parse_args(argv)
  try:
    images = draw(args.workdir, num=args.num, seed=args.seed, temperature=args.temperature)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pic = grid(images)
  Image.fromarray(pic[..., 0] if pic.shape[-1] == 1 else pic).save(args.out)
  if args.npy:
    np.save(args.npy, images)
  print(f"{len(images)} samples of {images.shape[1:]} in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
