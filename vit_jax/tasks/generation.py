"""Autoregressive image generation (the Image Transformer, vit_jax/models/image_transformer.py):
every intensity of an image is a 256-way categorical given the ones before it; trained by its
negative log-likelihood and evaluated in bits per dimension (the mean over all intensities of
-log2 p), the measure of Parmar et al. (2018) and the PixelCNN papers.

The images reach the model as their intensities 0..255: the pp strings may use `decode` only
(value_range or crops would change what is modelled). The labels are not used.
"""
import math
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from vit_jax import evaluators
from vit_jax import tasks

PP_OPS = ("decode",)


def intensities(images):
  """Float images holding 0..255 -> int32 intensities (the targets)."""
  return jnp.clip(jnp.round(images), 0, 255).astype(jnp.int32)


def nll_per_image(logits, images):
  """Summed negative log-likelihood (nats) of each image's intensities: (B,)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       intensities(images))
  return ce.reshape(ce.shape[0], -1).sum(-1)


class Generation(tasks.Task):
  name = "generation"
  batch_keys = ("image",)
  metric_names = ("train_bits_per_dim",)
  result_names = ("bits_per_dim", "num_examples")

  def num_classes(self, data_classes: int) -> int:
    return 0  # unconditional

  def loss(self, out, batch, teacher_out=None):
    dims = math.prod(batch["image"].shape[1:])
    nats = jnp.mean(nll_per_image(out, batch["image"])) / dims
    return nats, {"train_bits_per_dim": nats / math.log(2)}

  def headline(self, result, prefix: str = "", note: str = "") -> str:
    return (f"bits/dim{note}: {result[prefix + 'bits_per_dim']:.4f} on "
            f"{result[prefix + 'num_examples']} images")

  def eval_step(self, model, *, axis_name: Optional[str] = None) -> Callable:
    def step(variables, batch):
      logits = model.apply(variables, batch["image"], train=False)
      mask = batch["mask"]
      out = dict(nll=(nll_per_image(logits, batch["image"]) * mask).sum(), count=mask.sum())
      return jax.lax.psum(out, axis_name) if axis_name else out
    return step

  def evaluate(self, runner, variables, source, config, split: str,
               should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Bits per dimension over every image of `split`: total NLL / (images x dims x ln 2)."""
    dims = []

    def step(batch):
      dims.append(math.prod(batch["image"].shape[1:]))
      return runner.eval_step(variables, runner.to_device_batch(batch))
    totals = evaluators.sum_over_split(step, source, split=split, pp=config.pp_eval,
                                       batch_size=int(config.eval_batch_size),
                                       fetch=runner.fetch, should_stop=should_stop)
    n = totals["count"]
    return {"bits_per_dim": totals["nll"] / (n * dims[0] * math.log(2)),
            "nll_nats_per_image": totals["nll"] / n, "num_examples": int(round(n))}

  @classmethod
  def check(cls, config, need) -> None:
    need(config.model_name.startswith("ImageTransformer"),
         "loss='generation' needs an autoregressive model (ImageTransformer-2D, -1D, -Full), "
         f"not {config.model_name!r}.")
    tasks.refuse(config, need, "loss='generation'", (
        ("fewshot.shots", "few-shot probes (the model has no pooled features)"),
        ("mixup", "mixup"), ("cutmix", "CutMix"), ("distill.teacher", "distillation"),
        ("label_smoothing", "label smoothing")))
    tasks.pp_only(config, need, "loss='generation'", PP_OPS,
                  "the model reads the intensities 0..255 as they are")
