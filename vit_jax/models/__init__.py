"""The one model registry: `get_model(name, **overrides)` for every family.

Each family module exposes `config_from_name(name) -> kwargs | None` (None: not its name) and
`NAMES` (for error messages); this file lists the families explicitly, nothing registers itself.
What a family's Module must do to train, evaluate, predict and load weights here is
`VisionModel` below (tests/models/test_contract.py checks every family against it).
"""
import dataclasses
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn

from vit_jax import errors
from vit_jax.models import axial
from vit_jax.models import cvt
from vit_jax.models import deit
from vit_jax.models import detr
from vit_jax.models import image_transformer
from vit_jax.models import pvt
from vit_jax.models import resnet
from vit_jax.models import sasa
from vit_jax.models import swin
from vit_jax.models import t2t
from vit_jax.models import vit

# (family module, module class) in the order names are tried.
_FAMILIES = (
    (vit, vit.VisionTransformer),  # ViT-B/16 and the hybrids R50+ViT-B/16, ...
    (resnet, resnet.ResNet),
    (swin, swin.SwinTransformer),
    (deit, deit.DeiT),  # DeiT-B/16, DeiT-B/16-distilled
    (pvt, pvt.PyramidVisionTransformer),  # PVT-Tiny ... PVT-Large, PVTv2-B0 ... B5, PVTv2-B2-Li
    (cvt, cvt.ConvolutionalVisionTransformer),  # CvT-13, CvT-21, CvT-W24
    (t2t, t2t.T2TViT),  # T2T-ViT-14, -19, -24
    (detr, detr.DETR),  # DETR-R50, DETR-R101, DETR-Mu (detection: outputs a dict)
    # ImageTransformer-2D, -1D, -Full (generation: logits per intensity, num_classes 0)
    (image_transformer, image_transformer.ImageTransformer),
    (sasa, sasa.SASAResNet),  # SASA-ResNet-26, -38, -50 (local self-attention, conv stem)
    (axial, axial.AxialResNet),  # Axial-ResNet-S, -M, -L, -26-S (axial attention, conv stem)
)


@runtime_checkable
class VisionModel(Protocol):
  """The contract every family's linen Module keeps (checked over the registry by
  tests/models/test_contract.py):

  - `num_classes` is a field: the trainer sets it from the data set. A classifier returns
    logits (batch, num_classes) (a distilled DeiT in training: the (class, distillation) pair);
    `num_classes=0` returns the pooled pre-head features (batch, width), which the few-shot
    probe and `Runner.features` read. DETR returns a dict (`logits`, `boxes`, and per-layer
    `aux_*` in training) and takes the image mask as a second argument.
    An autoregressive model (ImageTransformer) is built with `num_classes=0` and returns the
    logits of every intensity (batch, H, W, C, 256) (vit_jax/tasks/generation.py).
  - `__call__(images, ..., train: bool = False)`: images (batch, H, W, C) float. `train=True`
    turns on dropout and stochastic depth, which draw from the `dropout` rng only (no other rng
    stream), and updates BatchNorm statistics.
  - State: `params`, and `batch_stats` for models with BatchNorm, the only collection training
    updates (mutable in `apply`); `intermediates` (attention maps) only when asked for.
  - Position embeddings are sized by `img_size` / the input at init; another input size is
    adapted when weights load (vit_jax.npz / vit_jax.pretrained: ViT's learned grid is
    interpolated, Swin's relative-position tables are resized; the others take any size their
    strides divide).
  """
  num_classes: int

  def __call__(self, images: Any, *args, train: bool = False) -> Any:
    ...


def known_names():
  return [n for family, _ in _FAMILIES for n in family.NAMES]


def fields(name: str) -> set:
  """The fields a model of this name takes as overrides (`get_model(name, **overrides)`), but
  `num_classes`, which the trainer sets from the data set."""
  for family, cls in _FAMILIES:
    if family.config_from_name(name) is not None:
      return {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  raise errors.ConfigError(
      f"Unknown model name {name!r}. Known models: {', '.join(known_names())}.")


def get_model(name: str, **overrides) -> nn.Module:
  """Returns the linen Module for `name` (e.g. "ViT-B/16"), with fields overridden by `overrides`.

  Raises ValueError naming the known models for an unknown name, and the known fields for an
  unknown override.
  """
  for family, cls in _FAMILIES:
    kwargs = family.config_from_name(name)
    if kwargs is None:
      continue
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise errors.ConfigError(f"Unknown option(s) {unknown} for model {name!r} ({cls.__name__}); "
                               f"known: {', '.join(sorted(fields))}.")
    kwargs.update(overrides)
    return cls(**kwargs)
  raise errors.ConfigError(
      f"Unknown model name {name!r}. Known models: {', '.join(known_names())}.")
