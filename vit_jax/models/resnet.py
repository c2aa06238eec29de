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

Two attention options, both fields of `ResNet` (and of the names `NL-ResNet-<depth>` and
`AA-ResNet-<depth>`):

- `nonlocal_units`: non-local blocks (Wang et al. 2018, embedded Gaussian; `NonLocalBlock`) after
  the named (stage, unit) pairs, as `block{s}/nonlocal{u}`. Each starts as the identity.
- `aa_stages`: attention-augmented 3x3 convolutions (Bello et al. 2019; `AttentionAugmentation`)
  in every unit of the named stages: `conv2` keeps `features - d_v` output channels and
  `attn2` computes the other d_v by multi-head self-attention over the whole feature map with
  2-D relative position logits; the two are concatenated.

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
import numpy as np

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
# The attention papers' ResNets on BiT's pre-activation units: `NL-ResNet-50` (Wang et al. 2018:
# one non-local block in res4), `AA-ResNet-50` (Bello et al. 2019: stages 2-4 augmented).
ATTENTION_RE = re.compile(r"^(?P<kind>NL|AA)-ResNet-(?P<depth>\d+)$")

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


class StdConv(layers.Module):
  """2D convolution without bias whose stored raw `kernel` is weight-standardised before use."""
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Any = "SAME"  # "SAME", "VALID" or ((top, bottom), (left, right))
  eps: float = 1e-5
  eps_in_sqrt: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    w = weight_standardize(kernel.astype(jnp.float32), eps=self.eps, eps_in_sqrt=self.eps_in_sqrt)
    return layers.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), window_strides=self.strides,
        padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


class NonLocalBlock(layers.Module):
  """Embedded-Gaussian non-local block (Wang et al. 2018): z = x + GN(W_z y), where
  y_i = sum_j softmax_j(theta(x_i) . phi(x_j) / sqrt(C/2)) g(x_j) over every position j of the
  feature map. theta, phi, g: 1x1 convolutions (with bias) to C/2 channels; W_z (`out`): 1x1 back
  to C; the GroupNorm's scale and bias start at zero, so the block starts as the identity (the
  paper zero-initialises its BatchNorm's scale; GroupNorm is BiT's norm). The 1/sqrt(C/2) scaling
  is the official code's default (video-nonlocal-net, `USE_SCALE`); its optional max-pool
  subsampling of phi and g is not done here. Parameters: 2C^2 + 4.5C."""
  gn_groups: int = 32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    inner = c // 2
    dense = lambda n, name: nn.Dense(n, name=name,
                                     **self.dense_kw)
    flat = x.reshape(b, h * w, c)
    theta, phi, g = (dense(inner, name)(flat) for name in ("theta", "phi", "g"))  # (B, N, C/2)
    logits = layers.einsum("bic,bjc->bij", theta, phi, self.dtype) / jnp.sqrt(inner)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    self.sow("intermediates", "attention_weights", weights)
    y = layers.einsum("bij,bjc->bic", weights, g, self.dtype)
    z = dense(c, "out")(y).reshape(b, h, w, c)
    z = nn.GroupNorm(num_groups=self.gn_groups, epsilon=1e-5, scale_init=nn.initializers.zeros,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(z)
    return x + z


def aa_depths(features: int, key_fraction: float, value_fraction: float,
              num_heads: int) -> Tuple[int, int]:
  """(d_k, d_v) of an augmented convolution with `features` outputs: key_fraction * features and
  value_fraction * features, each rounded to the nearest multiple of num_heads (at least one per
  head), so that every head gets whole key and value channels."""
  round_to = lambda f: max(num_heads, int(round(f * features / num_heads)) * num_heads)
  dk, dv = round_to(key_fraction), round_to(value_fraction)
  if dv >= features:
    raise errors.ConfigError(
        f"attention augmentation: d_v = {dv} of a {features}-channel convolution leaves no "
        f"convolutional channels (aa_value_fraction={value_fraction}, aa_heads={num_heads}): "
        "use a smaller aa_value_fraction or fewer aa_heads.")
  return dk, dv


def relative_logits_2d(q, rel_height, rel_width):
  """Bello et al.'s 2-D relative logits: q (B, heads, H, W, d) against the key offsets, from the
  relative height and width embeddings (2H-1, d) and (2W-1, d) (row k: offset k - (H-1), key
  minus query). Returns (B, heads, H*W, H*W): q_i . r^H_{yj - yi} + q_i . r^W_{xj - xi}."""
  _, _, h, w, _ = q.shape
  rows, cols = np.arange(h), np.arange(w)
  e_h = rel_height[rows[None, :] - rows[:, None] + h - 1]  # (H query, H key, d)
  e_w = rel_width[cols[None, :] - cols[:, None] + w - 1]  # (W query, W key, d)
  lh = jnp.einsum("bnhwd,hud->bnhwu", q, e_h.astype(q.dtype))
  lw = jnp.einsum("bnhwd,wvd->bnhwv", q, e_w.astype(q.dtype))
  logits = lh[..., :, None] + lw[..., None, :]  # (B, heads, H, W, H key, W key)
  b, n = q.shape[:2]
  return logits.reshape(b, n, h * w, h * w)


class AttentionAugmentation(layers.Module):
  """The self-attention half of an attention-augmented convolution (Bello et al. 2019):
  (B, H, W, C_in) -> (B, H', W', d_v). One 1x1 projection `qkv` to 2 d_k + d_v channels, heads
  of d_k/heads and d_v/heads channels, logits q.k/sqrt(d_k/heads) plus `relative_logits_2d`
  (`rel_height` (2H'-1, d_k/heads), `rel_width` (2W'-1, d_k/heads), shared by the heads,
  normal(d^-0.5) as the paper's code), softmax over the whole map, and the 1x1 `out` (d_v, d_v).
  No biases. With stride 2 the input is first 2x2 average-pooled (SAME), so the output has the
  strided convolution's size. The relative tables are sized by the feature map at init; another
  image size resizes them when weights load (vit_jax.pretrained)."""
  key_depth: int
  value_depth: int
  num_heads: int
  strides: Tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    if tuple(self.strides) != (1, 1):
      x = nn.avg_pool(x, tuple(self.strides), strides=tuple(self.strides), padding="SAME")
    b, h, w, _ = x.shape
    nh, dk, dv = self.num_heads, self.key_depth, self.value_depth
    dkh = dk // nh
    qkv = nn.Dense(2 * dk + dv, use_bias=False, name="qkv",
                   **self.dense_kw)(x)
    q, k, v = jnp.split(qkv, [dk, 2 * dk], axis=-1)
    heads = lambda t: jnp.moveaxis(t.reshape(b, h, w, nh, -1), 3, 1)  # (B, heads, H, W, d)
    q, k, v = heads(q) * dkh ** -0.5, heads(k), heads(v)
    init = nn.initializers.normal(stddev=dkh ** -0.5)
    rel_h = self.param("rel_height", init, (2 * h - 1, dkh), self.param_dtype)
    rel_w = self.param("rel_width", init, (2 * w - 1, dkh), self.param_dtype)
    flat = lambda t: t.reshape(b, nh, h * w, -1)
    logits = layers.einsum("bnid,bnjd->bnij", flat(q), flat(k), self.dtype)
    logits = logits + relative_logits_2d(q, rel_h, rel_w).astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    self.sow("intermediates", "attention_weights", weights)
    y = layers.einsum("bnij,bnjd->bnid", weights, flat(v), self.dtype)  # (B, heads, N, dv/heads)
    y = jnp.moveaxis(y, 1, 2).reshape(b, h, w, dv)
    return nn.Dense(dv, use_bias=False, name="out",
                    **self.dense_kw)(y)


def _conv2(x, conv, features: int, strides, aa, dtype, param_dtype, **conv_kwargs):
  """The unit's 3x3 convolution `conv2`, or with `aa` = (key_fraction, value_fraction, heads) its
  attention-augmented form: Concat(conv2 to features - d_v, attn2 to d_v)."""
  if aa is None:
    return conv(features, (3, 3), strides, name="conv2", **conv_kwargs)(x)
  dk, dv = aa_depths(features, *aa)
  y = conv(features - dv, (3, 3), strides, name="conv2", **conv_kwargs)(x)
  a = AttentionAugmentation(dk, dv, aa[2], strides=strides, dtype=dtype,
                            param_dtype=param_dtype, name="attn2")(x)
  return jnp.concatenate([y, a.astype(y.dtype)], axis=-1)


class BottleneckUnit(layers.Module):
  """Post-activation bottleneck: 1x1 -> GN -> relu -> 3x3 (stride) -> GN -> relu -> 1x1 (4x) ->
  GN (zero-init scale) -> add the (projected) input -> relu."""
  features: int  # channels of the 1x1 and 3x3 convs; the unit outputs 4 * features
  strides: Tuple[int, int] = (1, 1)
  gn_groups: int = 32
  aa: Optional[Tuple[float, float, int]] = None  # augment conv2: (key, value fractions, heads)

  @nn.compact
  def __call__(self, x):
    kw = self.kw
    conv = functools.partial(StdConv, **kw)
    gn = functools.partial(nn.GroupNorm, num_groups=self.gn_groups, epsilon=1e-6, **kw)
    out = 4 * self.features

    residual = x
    if x.shape[-1] != out or tuple(self.strides) != (1, 1):
      residual = conv(out, (1, 1), self.strides, name="conv_proj")(x)
      residual = gn(name="gn_proj")(residual)

    y = conv(self.features, (1, 1), name="conv1")(x)
    y = nn.relu(gn(name="gn1")(y))
    y = _conv2(y, conv, self.features, self.strides, self.aa, self.dtype, self.param_dtype)
    y = nn.relu(gn(name="gn2")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    y = gn(scale_init=nn.initializers.zeros, name="gn3")(y)
    return nn.relu(residual + y)


class PreActBottleneckUnit(layers.Module):
  """Pre-activation (ResNet-v2) bottleneck: GN -> relu -> [conv_proj for the shortcut] -> 1x1 ->
  GN -> relu -> 3x3 (stride) -> GN -> relu -> 1x1 (4x) -> add. No norm after the addition."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  gn_groups: int = 32
  aa: Optional[Tuple[float, float, int]] = None  # augment conv2: (key, value fractions, heads)

  @nn.compact
  def __call__(self, x):
    kw = self.kw
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
    y = _conv2(y, conv, self.features, self.strides, self.aa, self.dtype, self.param_dtype,
               padding=((1, 1), (1, 1)))
    y = nn.relu(gn(name="gn3")(y))
    y = conv(out, (1, 1), name="conv3")(y)
    return residual + y


class ResNetStage(layers.Module):
  """`num_units` bottleneck units `unit1`, `unit2`, ...; the first carries `first_stride`. A
  non-local block `nonlocal{u}` follows each unit u of `nonlocal_after`; `aa` augments every
  unit's 3x3 convolution."""
  num_units: int
  features: int
  first_stride: Tuple[int, int] = (1, 1)
  preact: bool = False
  gn_groups: int = 32
  nonlocal_after: Tuple[int, ...] = ()
  aa: Optional[Tuple[float, float, int]] = None

  @nn.compact
  def __call__(self, x):
    unit = PreActBottleneckUnit if self.preact else BottleneckUnit
    for i in range(self.num_units):
      x = unit(self.features, strides=self.first_stride if i == 0 else (1, 1),
               gn_groups=self.gn_groups, aa=self.aa, dtype=self.dtype,
               param_dtype=self.param_dtype, name=f"unit{i + 1}")(x)
      if i + 1 in self.nonlocal_after:
        x = NonLocalBlock(gn_groups=self.gn_groups, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=f"nonlocal{i + 1}")(x)
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


def _check_attention(num_layers, nonlocal_units, aa_stages, aa_key_fraction, aa_value_fraction,
                     aa_heads):
  """Validates the non-local and attention-augmentation fields against the stages."""
  for pair in nonlocal_units:
    if len(tuple(pair)) != 2:
      raise errors.ConfigError(
          f"nonlocal_units={nonlocal_units}: each entry is a (stage, unit) pair, 1-based, e.g. "
          "((3, 5),) for one block before the last unit of ResNet-50's res4.")
    stage, unit = pair
    if not 1 <= stage <= len(num_layers) or not 1 <= unit <= num_layers[stage - 1]:
      raise errors.ConfigError(
          f"nonlocal_units entry {tuple(pair)}: no unit {unit} in stage {stage}; the stages "
          f"have {num_layers} units (1-based).")
  for stage in aa_stages:
    if not 1 <= stage <= len(num_layers):
      raise errors.ConfigError(
          f"aa_stages={tuple(aa_stages)}: stage {stage} does not exist; there are "
          f"{len(num_layers)} stages (1-based).")
  if aa_stages:
    for name, f in (("aa_key_fraction", aa_key_fraction), ("aa_value_fraction", aa_value_fraction)):
      if not 0 < f < 1:
        raise errors.ConfigError(f"{name}={f}: must be in (0, 1) (the paper's 0.2 and 0.1).")
    if aa_heads < 1:
      raise errors.ConfigError(f"aa_heads={aa_heads}: needs at least one head (the paper's 8).")


def _features(x, *, num_layers, width, root, gn_groups, preact, dtype, param_dtype,
              zero_pad_pool=False, nonlocal_units=(), aa_stages=(), aa=None):
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
    after = tuple(sorted(u for s, u in nonlocal_units if s == i + 1))
    x = ResNetStage(n, width * 2**i, first_stride=(2, 2) if i else (1, 1), preact=preact,
                    gn_groups=gn_groups, nonlocal_after=after,
                    aa=aa if i + 1 in aa_stages else None, name=f"block{i + 1}", **kw)(x)
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


class ResNet(layers.Module):
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
  # Non-local blocks (Wang et al. 2018) after these (stage, unit) pairs, 1-based: ((3, 5),) is
  # the paper's one block in res4 of ResNet-50 (before its last unit); its 5-block model is
  # ((2, 1), (2, 3), (3, 1), (3, 3), (3, 5)) (every other unit of res3 and res4).
  nonlocal_units: Tuple[Tuple[int, int], ...] = ()
  # Attention-augmented 3x3 convolutions (Bello et al. 2019) in every unit of these stages
  # (1-based; the paper's ResNets: (2, 3, 4)), with d_k = aa_key_fraction and d_v =
  # aa_value_fraction of the convolution's outputs (paper: k = 2v = 0.2) and aa_heads heads (8).
  aa_stages: Tuple[int, ...] = ()
  aa_key_fraction: float = 0.2
  aa_value_fraction: float = 0.1
  aa_heads: int = 8
  head_bias_init: float = 0.0

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train  # No batch statistics and no dropout: train and eval are the same function.
    kw = self.norm_kw
    width = int(self.base_width * self.width_factor)
    num_layers = _check(self.num_layers, width, self.root, self.gn_groups)
    _check_attention(num_layers, self.nonlocal_units, self.aa_stages, self.aa_key_fraction,
                     self.aa_value_fraction, self.aa_heads)
    x = _features(images.astype(kw["dtype"]), num_layers=num_layers, width=width, root=self.root,
                  gn_groups=self.gn_groups, preact=self.preact,
                  zero_pad_pool=self.zero_pad_pool,
                  nonlocal_units=tuple(tuple(p) for p in self.nonlocal_units),
                  aa_stages=tuple(self.aa_stages),
                  aa=(self.aa_key_fraction, self.aa_value_fraction, self.aa_heads),
                  **kw)  # (B, h, w, C)
    if self.preact:
      x = nn.relu(nn.GroupNorm(num_groups=self.gn_groups, epsilon=1e-5, use_fast_variance=False,
                               name="norm-pre-head", **kw)(x))
    x = jnp.mean(x, axis=(1, 2))  # (B, C)
    if not self.num_classes:
      return x
    x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.constant(self.head_bias_init), name="head",
                 **self.dense_kw)(x)
    return x.astype(jnp.float32)


def config_from_name(name: str) -> Optional[dict]:
  """`BiT-R50x1`, `NL-ResNet-50`, `AA-ResNet-50` -> ResNet kwargs; None for other names."""
  m = ATTENTION_RE.match(name)
  if m:
    depth = int(m["depth"])
    if depth not in DEPTHS:
      raise errors.ConfigError(f"Unknown ResNet depth {depth} in {name!r}; known: "
                               f"{', '.join(map(str, DEPTHS))} (e.g. {m['kind']}-ResNet-50).")
    units = DEPTHS[depth]
    if m["kind"] == "NL":  # one block before the last unit of res4 (the paper's COCO models)
      return dict(num_layers=units, width_factor=1, nonlocal_units=((3, units[2] - 1),))
    return dict(num_layers=units, width_factor=1, aa_stages=(2, 3, 4))
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


NAMES = tuple(f"BiT-R{d}x<width>" for d in DEPTHS) + tuple(
    f"{k}-ResNet-{d}" for k in ("NL", "AA") for d in DEPTHS)
