"""BiT ResNets (Kolesnikov et al., 2020) and the ResNet stem of the hybrid ViT.

All convolutions are `StdConv` (weight standardisation, no bias) and all norms GroupNorm. Two
bottleneck flavours share that:

- `BottleneckUnit`, post-activation (ResNet-v1 with GN+WS): the stem of the published hybrids
  (R50+ViT-B/16, ...) and big_vision's `bit` ResNet. Parameter tree (docs/reference.md, "Hybrid
  and BiT ResNet"): `conv_root`, `gn_root`,
  `block{s}/unit{u}/{conv1,gn1,conv2,gn2,conv3,gn3[,conv_proj,gn_proj]}`, stages and units 1-based.
  GN eps 1e-6; kernel standardised as (w - mean) / (std + 1e-5).
- `PreActBottleneckUnit`, pre-activation (ResNet-v2): the BiT paper's models (BiT-M-R50x1 has
  25,549,352 parameters with a 1000-class head). Same names minus `gn_root`/`gn_proj`, plus
  `norm-pre-head`; GN eps 1e-5 (two-pass variance), kernels (w - mean) / sqrt(var + 1e-10),
  symmetric explicit padding, as big_vision's port of the paper's weights.

`stem(...)` is a plain function: called inside another module's compact method (the hybrid
`VisionTransformer`) it puts `conv_root`, `gn_root`, `block1`, ... at that module's top level,
which is the published hybrid layout.
"""
import functools
import math
import re
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import errors
from vit_jax.models import layers

Dtype = Any

# Units per stage for the standard depths (bottleneck units: depth = 3 * sum + 2).
DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
NAME_RE = re.compile(r"^BiT-R(?P<depth>\d+)x(?P<width>\d+)$")

# Root block variants.
ROOTS = {
    "imagenet": "7x7/2 conv and 3x3/2 max-pool: output stride 4 (the published models)",
    "small": "3x3/1 conv, no pool: output stride 1 (28-64 px images such as Fashion-MNIST)",
}


def weight_standardize(w, *, eps: float, eps_in_sqrt: bool = False):
  """Standardises a conv kernel (kh, kw, in, out) over (kh, kw, in), per output channel.

  (w - mean) / (std + eps), or (w - mean) / sqrt(var + eps) with `eps_in_sqrt`.
  """
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.mean(jnp.square(w), axis=(0, 1, 2), keepdims=True)
  return w / (jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps)


class StdConv(nn.Module):
  """2D convolution without bias whose stored raw `kernel` is weight-standardised before use."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Any = "SAME"  # "SAME", "VALID" or ((top, bottom), (left, right))
  eps: float = 1e-5
  eps_in_sqrt: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    w = weight_standardize(kernel.astype(jnp.float32), eps=self.eps, eps_in_sqrt=self.eps_in_sqrt)
    return layers.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), window_strides=self.strides,
        padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BottleneckUnit(nn.Module):
  """Post-activation bottleneck: 1x1 -> GN -> relu -> 3x3 (stride) -> GN -> relu -> 1x1 (4x) ->
  GN (zero-init scale) -> add the (projected) input -> relu."""
  features: int  # channels of the 1x1 and 3x3 convs; the unit outputs 4 * features
  strides: Tuple[int, int] = (1, 1)
  gn_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(StdConv, **kw)
    gn = functools.partial(nn.GroupNorm, num_groups=self.gn_groups, epsilon=1e-6, **kw)
    out = 4 * self.features

    residual = x
    if x.shape[-1] != out or tuple(self.strides) != (1, 1):
      residual = conv(out, (1, 1), self.strides, name="conv_proj")(x)
      residual = gn(name="gn_proj")(residual)

    y = conv(self.features, (1, 1), name="conv1")(x)
    y = nn.relu(gn(name="gn1")(y))
    y = conv(self.features, (3, 3), self.strides, name="conv2")(y)
    y = nn.relu(gn(name="gn2")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    y = gn(scale_init=nn.initializers.zeros, name="gn3")(y)
    return nn.relu(residual + y)


class PreActBottleneckUnit(nn.Module):
  """Pre-activation (ResNet-v2) bottleneck: GN -> relu -> [conv_proj for the shortcut] -> 1x1 ->
  GN -> relu -> 3x3 (stride) -> GN -> relu -> 1x1 (4x) -> add. No norm after the addition."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  gn_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = functools.partial(StdConv, eps=1e-10, eps_in_sqrt=True, **kw)
    gn = functools.partial(nn.GroupNorm, num_groups=self.gn_groups, epsilon=1e-5,
                           use_fast_variance=False, **kw)
    out = 4 * self.features

    residual = x
    x = nn.relu(gn(name="gn1")(x))
    if x.shape[-1] != out or tuple(self.strides) != (1, 1):
      residual = conv(out, (1, 1), self.strides, name="conv_proj")(x)

    y = conv(self.features, (1, 1), name="conv1")(x)
    y = nn.relu(gn(name="gn2")(y))
    y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(y)
    y = nn.relu(gn(name="gn3")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    return residual + y


class ResNetStage(nn.Module):
  """`num_units` bottleneck units `unit1`, `unit2`, ...; the first carries `first_stride`."""
  num_units: int
  features: int
  first_stride: Tuple[int, int] = (1, 1)
  preact: bool = False
  gn_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    unit = PreActBottleneckUnit if self.preact else BottleneckUnit
    for i in range(self.num_units):
      x = unit(self.features, strides=self.first_stride if i == 0 else (1, 1),
               gn_groups=self.gn_groups, dtype=self.dtype, param_dtype=self.param_dtype,
               name=f"unit{i + 1}")(x)
    return x


def _check(num_layers, width, root, gn_groups):
  """Validates the stem options; returns num_layers as a tuple of ints."""
  if root not in ROOTS:
    raise errors.ConfigError(f"Unknown ResNet root {root!r}; known: "
                             + "; ".join(f"{k!r} ({v})" for k, v in ROOTS.items()) + ".")
  num_layers = tuple(int(n) for n in num_layers)
  if any(n < 1 for n in num_layers):
    raise errors.ConfigError(f"ResNet num_layers={num_layers}: every stage needs at least one unit "
                             "(use num_layers=() for the root alone).")
  if width < 1:
    raise errors.ConfigError(f"base_width * width_factor = {width}: needs at least one channel.")
  if gn_groups < 1 or width % gn_groups:
    raise errors.ConfigError(
        f"GroupNorm with gn_groups={gn_groups} needs channel counts divisible by it, "
        f"but the narrowest layer has base_width * width_factor = {width} channels: "
        f"pass a gn_groups that divides {width} (e.g. gn_groups="
        f"{math.gcd(width, max(gn_groups, 1))}) or a wider base_width.")
  return num_layers


def _features(x, *, num_layers, width, root, gn_groups, preact, dtype, param_dtype,
              zero_pad_pool=False):
  """Root and stages, instantiated in the caller's compact scope. (B, H, W, C) -> feature map.

  Under mixed precision (dtype=bfloat16) the convolutions and GroupNorms stay float32: on this
  repository's CPU (no AVX-512 BF16 exposed) bf16 convolutions measured no faster, and mostly
  slower, than f32 ones (benchmarks/README.md, "Mixed precision")."""
  kw = dict(dtype=layers.activation_dtype(dtype), param_dtype=param_dtype)
  big = root == "imagenet"
  if preact:
    pad = ((3, 3), (3, 3)) if big else ((1, 1), (1, 1))
    x = StdConv(width, (7, 7) if big else (3, 3), (2, 2) if big else (1, 1), padding=pad,
                eps=1e-10, eps_in_sqrt=True, name="conv_root", **kw)(x)
    if big and zero_pad_pool:  # Hugging Face / timm: zeros around the (signed) conv output
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    elif big:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  else:
    x = StdConv(width, (7, 7) if big else (3, 3), (2, 2) if big else (1, 1), name="conv_root",
                **kw)(x)
    x = nn.relu(nn.GroupNorm(num_groups=gn_groups, epsilon=1e-6, name="gn_root", **kw)(x))
    if big:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
  for i, n in enumerate(num_layers):
    x = ResNetStage(n, width * 2**i, first_stride=(2, 2) if i else (1, 1), preact=preact,
                    gn_groups=gn_groups, name=f"block{i + 1}", **kw)(x)
  return x


def stem(x, *, num_layers: Sequence[int], width_factor: float = 1, base_width: int = 64,
         root: str = "imagenet", gn_groups: int = 32, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32):
  """The hybrid ViT's ResNet stem (post-activation units): (B, H, W, C) -> (B, H/s, W/s, C').

  Call it inside a compact method: its modules become children of the calling module. With the
  imagenet root, s = 4 for num_layers=() (root only) and 4 * 2**(len(num_layers) - 1) otherwise
  (16 for (3, 4, 9)); C' = base_width * width_factor, times 4 * 2**(stages - 1) after stages.
  """
  width = int(base_width * width_factor)
  num_layers = _check(num_layers, width, root, gn_groups)
  return _features(x, num_layers=num_layers, width=width, root=root, gn_groups=gn_groups,
                   preact=False, dtype=dtype, param_dtype=param_dtype)


class ResNet(nn.Module):
  """BiT ResNet classifier: root, stages, global average pool, zero-init `head`.

  `preact=True` is the BiT paper's ResNet-v2 (names `BiT-R50x1`, ...); `preact=False` uses the
  hybrid's post-activation units. `num_classes=0` returns the pooled features (B, C).
  `base_width` (64 in the paper), `root` and `gn_groups` make CPU-sized variants, e.g.
  `get_model("BiT-R26x1", base_width=16, root="small", gn_groups=8, num_classes=10)`.
  """
  num_classes: int
  num_layers: Tuple[int, ...] = (3, 4, 6, 3)  # bottleneck units per stage
  width_factor: int = 1
  base_width: int = 64
  root: str = "imagenet"  # see ROOTS
  gn_groups: int = 32
  preact: bool = True
  # The pre-activation root's max-pool pads with -inf (big_vision); True pads with zeros, as
  # Hugging Face's and timm's BiT do (vit_jax.pretrained sets it for their weights).
  zero_pad_pool: bool = False
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No batch statistics and no dropout: train and eval are the same function.
    kw = dict(dtype=layers.activation_dtype(self.dtype), param_dtype=self.param_dtype)
    width = int(self.base_width * self.width_factor)
    num_layers = _check(self.num_layers, width, self.root, self.gn_groups)
    x = _features(images.astype(kw["dtype"]), num_layers=num_layers, width=width, root=self.root,
                  gn_groups=self.gn_groups, preact=self.preact,
                  zero_pad_pool=self.zero_pad_pool, **kw)  # (B, h, w, C)
    if self.preact:
      x = nn.relu(nn.GroupNorm(num_groups=self.gn_groups, epsilon=1e-5, use_fast_variance=False,
                               name="norm-pre-head", **kw)(x))
    x = jnp.mean(x, axis=(1, 2))  # (B, C)
    if not self.num_classes:
      return x
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(self.head_bias_init), name="head",
                 **layers.dense_kwargs(self.dtype, self.param_dtype))(x)
    return x.astype(jnp.float32)


def config_from_name(name: str) -> Optional[dict]:
  """`BiT-R50x1` -> ResNet kwargs; None when the name is not a BiT name."""
  m = NAME_RE.match(name)
  if not m:
    return None
  depth = int(m["depth"])
  if depth not in DEPTHS:
    raise errors.ConfigError(f"Unknown ResNet depth {depth} in {name!r}; known: "
                             f"{', '.join(map(str, DEPTHS))} (e.g. BiT-R50x1).")
  if int(m["width"]) < 1:
    raise errors.ConfigError(f"Width factor must be at least 1 in {name!r} (e.g. BiT-R50x1).")
  return dict(num_layers=DEPTHS[depth], width_factor=int(m["width"]))


NAMES = tuple(f"BiT-R{d}x<width>" for d in DEPTHS)
