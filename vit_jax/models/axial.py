"""Axial-ResNets (Wang et al., 2020, "Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic
Segmentation", arXiv:2003.07853), the conv-stem ImageNet classifiers.

Every bottleneck's 3x3 convolution becomes two position-sensitive axial-attention layers, the
first along the height (each pixel attends to its column), the second along the width (its row),
then a 2x2/2 average pool where the unit strides. Position-sensitive (the paper's eq. 4): relative
embeddings for queries, keys and values, shared by the heads,

  y_o = sum_p softmax_p(q_o . k_p + q_o . r^q_{p-o} + k_p . r^k_{p-o}) (v_p + r^v_{p-o}),

with 8 heads, queries and keys of half the value width (the paper's d_q = d_out / 2). As in the
paper (and its authors' PyTorch code, github.com/csrhddlam/axial-deeplab), BatchNorms replace a
careful initialisation: one over the projected q, k, v; one per head over each of the three logit
terms before they are summed; one over the retrieved content and the retrieved value embedding
before they are summed. The paper has no gating (gated axial attention is MedT's, 2021), so
there is none here.

The span: a layer attends over the whole axis, up to `span` pixels (its table holds 2 * span - 1
offsets); the classification models set span = 56, the first stage's feature map at 224 px, and
halve it with every stride (56, 56 -> 28, 28 -> 14, 14 -> 7), so each table covers its axis
exactly at 224 px. A longer axis is an error naming the fix (a larger `span`).

Widths: `base_width` is the root's channels; stage s has attention width 2 * base_width * 2**s and
outputs twice that (bottleneck expansion 2). Axial-ResNet-S, -M, -L: base_width 32, 48, 64
(the paper's channel multipliers 0.5, 0.75, 1), stages (3, 4, 6, 3); `Axial-ResNet-26-S` is the
official code's 26-layer model, stages (1, 2, 4, 1). Parameter counts with a 1000-class head:
11,586,216 / 25,179,400 / 43,973,480 and 5,944,936 (docs/reference.md, "Stand-alone
self-attention and Axial-ResNets", also for the paper's 12.4M, which these do not reproduce).

Parameter tree: `conv_root`, `bn_root`, `block{s}/unit{u}/{conv_down, bn_down, height/{qkv,
bn_qkv, relative, bn_similarity, bn_output}, width/..., conv_up, bn_up[, conv_proj, bn_proj]}`,
`head`; BatchNorm statistics in `batch_stats` (momentum 0.9, eps 1e-5).
"""
import functools
import re
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


VARIANTS = {"S": 32, "M": 48, "L": 64}  # base_width: 64 x the paper's channel multiplier
DEPTHS = {26: (1, 2, 4, 1), 50: (3, 4, 6, 3)}
NAME_RE = re.compile(r"^Axial-ResNet-(?:(?P<depth>\d+)-)?(?P<variant>[A-Za-z]+)$")
NAMES = ("Axial-ResNet-S", "Axial-ResNet-M", "Axial-ResNet-L", "Axial-ResNet-26-S")
AXES = {"height": 1, "width": 2}


class AxialAttention(layers.Module):
  """Position-sensitive multi-head attention along one axis: (B, H, W, C) -> (B, H, W, features).

  `axis="height"` attends within each column, `"width"` within each row. With d = features /
  heads: `qkv` (C, 2 * features), per head d/2 query, d/2 key and d value channels; `relative`
  (2 * span - 1, 2 * d), row span - 1 + o holding the embeddings of offset o = key - query (d/2
  for queries, d/2 for keys, d for values; shared by the heads); BatchNorms `bn_qkv`
  (2 * features), `bn_similarity` (heads x 3 terms) and `bn_output` (2 * features: content and
  value embedding per channel). The summed logits (B, other axis, heads, L, L) are sown as
  `intermediates/attention_logits` when that collection is mutable.
  """
  features: int
  axis: str = "height"
  num_heads: int = 8
  span: int = 56
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.axis not in AXES:
      raise errors.ConfigError(f"Unknown axial-attention axis {self.axis!r}; known: "
                               f"{', '.join(AXES)}.")
    f, n = self.features, self.num_heads
    if f % n or (f // n) % 2:
      raise errors.ConfigError(
          f"axial attention width {f} must split into num_heads={n} heads of an even width "
          "(queries and keys take half of it).")
    d = f // n
    length = x.shape[AXES[self.axis]]
    if length > self.span:
      raise errors.ConfigError(
          f"axial attention span {self.span} is shorter than the {self.axis} axis it attends "
          f"along ({length} pixels): pass a span of at least {length} (the model's `span` is "
          "the first stage's feature-map size, halved at every stride).")
    act = layers.activation_dtype(self.dtype)
    _, bn = layers.conv_and_bn(train=train, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                               param_dtype=self.param_dtype)
    ein = lambda spec, a, c: layers.einsum(spec, a, c, self.dtype)
    if self.axis == "height":
      x = jnp.swapaxes(x, 1, 2)  # (B, W, H, C): attend along axis 2
    b, m, l, _ = x.shape
    qkv = nn.Dense(2 * f, use_bias=False, kernel_init=nn.initializers.lecun_normal(),
                   name="qkv", **self.dense_kw)(x)
    qkv = bn(name="bn_qkv")(qkv).reshape(b, m, l, n, 2 * d)
    q, k, v = qkv[..., :d // 2], qkv[..., d // 2:d], qkv[..., d:]  # (B, M, L, heads, .)

    table = self.param("relative", nn.initializers.normal(stddev=d**-0.5),
                       (2 * self.span - 1, 2 * d), self.param_dtype)
    rel = table[layers.relative_index(np.arange(l), np.arange(l), self.span - 1)]  # (L, L, 2d)
    r_q, r_k, r_v = rel[..., :d // 2], rel[..., d // 2:d], rel[..., d:]  # [query o, key p]

    qk = ein("bmonc,bmpnc->bmnop", q, k)
    qr = ein("bmonc,opc->bmnop", q, r_q)
    kr = ein("bmpnc,opc->bmnop", k, r_k)
    logits = jnp.stack([qk, qr, kr], axis=-1).astype(act)  # (B, M, heads, L, L, 3)
    logits = bn(name="bn_similarity", axis=(2, 5))(logits).sum(axis=-1)
    self.sow("intermediates", "attention_logits", logits)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(act)
    sv = ein("bmnop,bmpnc->bmonc", weights, v)  # the content retrieved
    sve = ein("bmnop,opc->bmonc", weights, r_v)  # the value embeddings retrieved
    y = jnp.stack([sv, sve], axis=-1).reshape(b, m, l, 2 * f)
    y = bn(name="bn_output")(y).reshape(b, m, l, n, d, 2).sum(axis=-1).reshape(b, m, l, f)
    return jnp.swapaxes(y, 1, 2) if self.axis == "height" else y


class AxialBlock(layers.Module):
  """1x1 conv -> BN -> relu -> height attention -> width attention [-> 2x2/2 average pool] ->
  relu -> 1x1 conv (2x) -> BN (zero-init scale) -> add the (projected) input -> relu."""
  features: int  # attention width; the unit outputs 2 * features
  stride: int = 1
  num_heads: int = 8
  span: int = 56
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, bn = layers.conv_and_bn(train=train, bn_axis_name=self.bn_axis_name,
                                  **self.kw)
    att = functools.partial(AxialAttention, self.features, num_heads=self.num_heads,
                            span=self.span, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                            param_dtype=self.param_dtype)
    out = 2 * self.features
    residual = x
    if x.shape[-1] != out or self.stride != 1:
      residual = bn(name="bn_proj")(conv(out, (1, 1), strides=self.stride, name="conv_proj")(x))
    y = nn.relu(bn(name="bn_down")(conv(self.features, (1, 1), name="conv_down")(x)))
    y = att(axis="height", name="height")(y, train)
    y = att(axis="width", name="width")(y, train)
    if self.stride != 1:
      y = nn.avg_pool(y, (self.stride, self.stride), strides=(self.stride, self.stride))
    y = nn.relu(y)
    y = bn(scale_init=nn.initializers.zeros, name="bn_up")(conv(out, (1, 1), name="conv_up")(y))
    return nn.relu(residual + y)


class AxialResNet(layers.Module):
  """Conv-stem Axial-ResNet classifier: root, stages of `AxialBlock`, global average pool,
  zero-init `head`. `num_classes=0` returns the pooled features (B, 4 * base_width *
  2**(stages - 1)). CPU-sized variants: e.g. `get_model("Axial-ResNet-S", num_layers=(1, 1, 1),
  base_width=16, num_heads=4, span=28, root="small", num_classes=10)`.
  """
  num_classes: int
  num_layers: Tuple[int, ...] = (3, 4, 6, 3)
  base_width: int = 32  # the root's channels; stage s attends over 2 * base_width * 2**s
  num_heads: int = 8
  span: int = 56  # the first stage's; halved at every stride
  root: str = "imagenet"  # see layers.BN_ROOTS
  bn_axis_name: Optional[str] = None  # the pmap axis to average BatchNorm statistics over

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    kw = dict(bn_axis_name=self.bn_axis_name, **self.kw)

    def stage(s, n):
      # Stage s attends over 2 * base_width * 2**s channels; its first unit (stride 2 after the
      # first stage) spans span / 2**(s - 1), the others the feature map after its stride.
      stride, span = (2 if s else 1), self.span // 2**max(s - 1, 0)
      unit = lambda u: functools.partial(AxialBlock, 2 * self.base_width * 2**s,
                                         stride=1 if u else stride, num_heads=self.num_heads,
                                         span=span // stride if u else span, **kw)
      return layers.UnitStage(n, unit, name=f"block{s + 1}")
    return layers.bn_resnet_classifier(images, family="Axial-ResNet", num_layers=self.num_layers,
                                       base_width=self.base_width, root=self.root,
                                       num_classes=self.num_classes, train=train, stage=stage,
                                       **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`Axial-ResNet-S` (50 layers) or `Axial-ResNet-26-S` -> AxialResNet kwargs; None when the
  name is not an Axial-ResNet name."""
  m = NAME_RE.match(name)
  if not m:
    return None
  depth = int(m["depth"] or 50)
  if m["variant"] not in VARIANTS or depth not in DEPTHS:
    raise errors.ConfigError(f"Unknown Axial-ResNet {name!r}; known: {', '.join(NAMES)} "
                             "(widths S, M, L; depths 50, the default, and 26).")
  return dict(num_layers=DEPTHS[depth], base_width=VARIANTS[m["variant"]])
