"""The one model registry: `get_model(name, **overrides)` for every family.

Each family module exposes `config_from_name(name) -> kwargs | None` (None: not its name) and
`NAMES` (for error messages); this file lists the families explicitly, nothing registers itself.
"""
import dataclasses

import flax.linen as nn

from vit_jax.models import cvt
from vit_jax.models import deit
from vit_jax.models import detr
from vit_jax.models import pvt
from vit_jax.models import resnet
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
)


def known_names():
  return [n for family, _ in _FAMILIES for n in family.NAMES]


def fields(name: str) -> set:
  """The fields a model of this name takes as overrides (`get_model(name, **overrides)`), but
  `num_classes`, which the trainer sets from the data set."""
  for family, cls in _FAMILIES:
    if family.config_from_name(name) is not None:
      return {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
  raise ValueError(f"Unknown model name {name!r}. Known models: {', '.join(known_names())}.")


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
      raise ValueError(f"Unknown option(s) {unknown} for model {name!r} ({cls.__name__}); "
                       f"known: {', '.join(sorted(fields))}.")
    kwargs.update(overrides)
    return cls(**kwargs)
  raise ValueError(f"Unknown model name {name!r}. Known models: {', '.join(known_names())}.")
