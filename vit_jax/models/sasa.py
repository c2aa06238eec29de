"""Stand-alone self-attention ResNets (Ramachandran et al., 2019, "Stand-Alone Self-Attention in
Vision Models", arXiv:1906.05909).

A ResNet (torchvision's v1 bottlenecks with BatchNorm) whose every 3x3 convolution is replaced by
local multi-head self-attention over the k x k neighbourhood of each pixel (the paper: k = 7, 8
heads), with 2-D relative position embeddings: each head's query is split in two halves, one
scored against an embedding of the row offset a - i, the other against one of the column offset
b - j, so the logit of neighbour (a, b) is q . (k_ab + r_{a-i, b-j}) with r the concatenation of
the two (the paper's eq. 3). Where the convolution would stride, a 2x2/2 average pool follows the
attention. Neighbours outside the image are masked out of the softmax.

The stem: the paper's Table 1 lists "Conv-stem + Attention" (ResNet's 7x7/2 conv and max-pool,
attention everywhere else) and "Full Attention" (its spatially-aware attention stem) with the
same parameter counts to 0.1M; its Section 4.3 finds the convolutional stem as good or better on
classification (Table 1: 75.8 / 77.1 / 77.4% for ResNet-26/38/50 against 74.8 / 76.9 / 77.6%).
This file builds the conv-stem models: `SASA-ResNet-{26,38,50}`, stages (1,2,4,1), (2,3,5,2),
(3,4,6,3). Parameter counts with a 1000-class head (docs/reference.md, "Stand-alone
self-attention and Axial-ResNets"): 10,342,632 / 14,190,632 / 18,038,632.

How the attention is computed (`query_block`, no effect on parameters or outputs beyond float
rounding): by default the queries go in 4x4 tiles, each attending to the tile's 10x10 halo in
batched matmuls with every query's own window masked in; `query_block=0` scores the window as
49 shifted products. Training the attention comparison's SASA model takes 0.30x the time per
step the blocked way (`python -m benchmarks.sasa_attention`, benchmarks/README.md).

Parameter tree: `conv_root`, `bn_root`, `block{s}/unit{u}/{conv1, bn1, attention/{query, key,
value, rel_height, rel_width}, bn2, conv3, bn3[, conv_proj, bn_proj]}`, `head`; BatchNorm
statistics in `batch_stats` (momentum 0.9 = torch's 0.1, eps 1e-5).
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


# Bottleneck units per stage; the paper's 38 and 26 drop one and two units from every stage of
# ResNet-50.
DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
NAME_RE = re.compile(r"^SASA-ResNet-(?P<variant>\d+)$")
NAMES = tuple(f"SASA-ResNet-{d}" for d in DEPTHS)


class LocalSelfAttention(layers.Module):
  """Multi-head self-attention of every pixel over its window x window neighbourhood, with
  relative row and column embeddings. (B, H, W, C) -> (B, H, W, features).

  Parameters: `query`, `key`, `value` Dense kernels (C, features), no bias (the paper's W_Q, W_K,
  W_V); `rel_height` (window, heads, d/2) and `rel_width` (window, heads, d - d/2), d = features
  / heads, row o of each being the embedding of offset o - window // 2. The logits (B, H, W,
  heads, window, window) are sown as `intermediates/attention_logits` when that collection is
  mutable (masked neighbours at -1e9).
  """
  features: int
  num_heads: int = 8
  window: int = 7
  # Queries per block side in the computation (`_blocked_local_attention`; 0: the windowed form,
  # window**2 shifted products, slower to train: benchmarks/sasa_attention.py). Changes no
  # parameter and no output beyond float rounding.
  query_block: int = 4

  @nn.compact
  def __call__(self, x):
    if self.features % self.num_heads:
      raise errors.ConfigError(f"attention width {self.features} is not divisible by "
                               f"num_heads={self.num_heads}.")
    d = self.features // self.num_heads
    if d < 2:
      raise errors.ConfigError(
          f"attention width {self.features} over num_heads={self.num_heads} leaves {d} channel "
          "per head; the row and column embeddings need at least 2 (fewer heads or wider).")
    layers.check_window(self.window)
    if self.query_block < 0:
      raise errors.ConfigError(f"query_block={self.query_block}: the side of the query blocks "
                               "the attention is computed by, >= 1 (0: by shifted windows).")
    b, h, w, _ = x.shape
    k = self.window
    dense = lambda name: nn.Dense(self.features, use_bias=False, name=name,
                                  kernel_init=nn.initializers.lecun_normal(),
                                  **self.dense_kw)
    heads = lambda t: t.reshape(*t.shape[:-1], self.num_heads, d)
    q = heads(dense("query")(x)) * d**-0.5  # (B, H, W, heads, d)
    key, value = dense("key")(x), dense("value")(x)  # (B, H, W, F)
    table = lambda name, n: self.param(
        name, layers.flat_init(nn.initializers.normal(stddev=d**-0.5)), (k, self.num_heads, n),
        self.param_dtype)
    # Offsets of the window's rows and columns from its centre pixel, as table rows.
    idx = layers.relative_index([0], np.arange(k) - k // 2, k // 2)[0]  # (k,) = 0 .. k-1
    rel_h = table("rel_height", d // 2)[idx]  # (k, heads, d/2)
    rel_w = table("rel_width", d - d // 2)[idx]
    attend = functools.partial(_local_attention, rel_h=rel_h, rel_w=rel_w, window=k,
                               dtype=self.dtype)
    if self.is_mutable_collection("intermediates"):
      y, logits = attend(q, key, value)
      self.sow("intermediates", "attention_logits", logits)
    else:
      # Blocks of `query_block`**2 queries attend to their (query_block + k - 1)**2 halo with the
      # window masked in (`_blocked_local_attention`): batched matmuls instead of k*k shifted
      # products. The logits take B*H*W*heads*(block + k - 1)**2 floats: images go through in
      # chunks of about 2**24 of them, and the gradient recomputes a chunk rather than keeping it.
      if self.query_block:
        halo = (self.query_block + k - 1)**2
        compute = functools.partial(_blocked_local_attention, rel_h=rel_h, rel_w=rel_w, window=k,
                                    block=self.query_block, dtype=self.dtype)
      else:
        halo = k * k
        compute = lambda *a: attend(*a)[0]
      chunk = max(1, min(b, 2**24 // (h * w * self.num_heads * halo)))
      one = jax.checkpoint(lambda q, key, value: compute(q[None], key[None], value[None])[0])
      y = jax.lax.map(lambda t: one(*t), (q, key, value), batch_size=chunk)
    return y.reshape(b, h, w, self.features)


def _local_attention(q, key, value, *, rel_h, rel_w, window: int, dtype):
  """softmax over each pixel's window of q . (k + r), times the values: q (B, H, W, heads, d),
  key and value (B, H, W, heads * d), rel_h (k, heads, d/2), rel_w (k, heads, d - d/2) ->
  ((B, H, W, heads, d), logits (B, H, W, heads, k, k))."""
  b, h, w, n, d = q.shape
  k, dh = window, d // 2
  heads = lambda t: t.reshape(*t.shape[:-1], n, d)
  keys, valid = layers.local_windows(key, k)  # k*k x (B, H, W, F), (H, W, k, k)
  values, _ = layers.local_windows(value, k)
  ein = lambda spec, a, c: layers.einsum(spec, a, c, dtype)
  # q . k per neighbour, one offset at a time (see layers.local_windows): (B, H, W, heads, k*k).
  content = jnp.stack([ein("zhwnd,zhwnd->zhwn", q, heads(kk)) for kk in keys], axis=-1)
  logits = content.reshape(b, h, w, n, k, k)
  logits = logits + ein("zhwnd,ind->zhwni", q[..., :dh], rel_h)[..., None]
  logits = logits + ein("zhwnd,jnd->zhwnj", q[..., dh:], rel_w)[..., None, :]
  logits = jnp.where(valid[None, :, :, None], logits.astype(jnp.float32), -1e9)
  weights = jax.nn.softmax(logits.reshape(b, h, w, n, k * k), axis=-1)
  weights = weights.astype(layers.activation_dtype(dtype))
  y = sum(weights[..., i, None] * heads(v).astype(weights.dtype) for i, v in enumerate(values))
  return y, logits


def _blocked_local_attention(q, key, value, *, rel_h, rel_w, window: int, block: int, dtype):
  """What `_local_attention` computes (its y, not its logits), computed by blocks: the queries in
  each `block` x `block` tile attend to the tile's halo (the tile grown by window // 2 on every
  side, L = block + window - 1 pixels a side) through batched matmuls, with a static mask keeping
  each query's own window of in-image pixels; the row and column embeddings reach the halo
  through per-tile tables of offsets. About (L / window)**2 times the logits of the windowed form
  (block 7, window 7: 3.4x), but dense matmuls on contiguous tiles instead of window**2 shifted
  copies of the keys and values. (B, H, W, heads, d) queries -> (B, H, W, heads, d)."""
  b, h, w, n, d = q.shape
  k, dh, r, s = window, d // 2, window // 2, block
  big = s + k - 1  # L
  nh, nw = -(-h // s), -(-w // s)  # tiles down and across; the last ones padded
  heads = lambda t: t.reshape(*t.shape[:-1], n, d)
  qt = jnp.pad(q, ((0, 0), (0, nh * s - h), (0, nw * s - w), (0, 0), (0, 0)))
  qt = qt.reshape(b, nh, s, nw, s, n, d).transpose(0, 1, 3, 2, 4, 5, 6)  # (B, P, Q, s, s, n, d)

  def halos(t):  # (B, H, W, F) -> (B, P, Q, L*L, n, d): every tile's halo
    t = jnp.pad(heads(t), ((0, 0), (r, r + nh * s - h), (r, r + nw * s - w), (0, 0), (0, 0)))
    rows = jnp.stack([t[:, p * s:p * s + big] for p in range(nh)], axis=1)  # (B, P, L, W', n, d)
    tiles = jnp.stack([rows[:, :, :, c * s:c * s + big] for c in range(nw)], axis=2)
    return tiles.reshape(b, nh, nw, big * big, n, d)

  keys, values = halos(key), halos(value)
  ein = lambda spec, a, c: layers.einsum(spec, a, c, dtype)
  content = ein("zpqsnd,zpqtnd->zpqnst", qt.reshape(b, nh, nw, s * s, n, d), keys)
  # Offset of halo row u from query row i is u - i (0 .. k-1 inside the window): the table row.
  rel = np.arange(big)[None, :] - np.arange(s)[:, None]  # (s, L)
  offset = np.clip(rel, 0, k - 1)
  by_row = ein("zpqijnd,iund->zpqniju", qt[..., :dh], rel_h[offset])  # (B, P, Q, n, s, s, L)
  by_col = ein("zpqijnd,jvnd->zpqnijv", qt[..., dh:], rel_w[offset])
  logits = (content.reshape(b, nh, nw, n, s, s, big, big) + by_row[..., :, None]
            + by_col[..., None, :])
  # Key (u, v) of tile (p, c) is pixel (p*s + u - r, c*s + v - r): in the window of query (i, j)
  # when 0 <= u - i < k and 0 <= v - j < k, and in the image.
  inside = lambda start, size: (start >= 0) & (start < size)
  win = (rel >= 0) & (rel < k)  # (s, L)
  rows_in = inside(np.arange(nh)[:, None] * s + np.arange(big)[None, :] - r, h)  # (P, L)
  cols_in = inside(np.arange(nw)[:, None] * s + np.arange(big)[None, :] - r, w)  # (Q, L)
  valid = (win[None, None, None, :, None, :, None] & win[None, None, None, None, :, None, :]
           & rows_in[:, None, None, None, None, :, None]
           & cols_in[None, :, None, None, None, None, :])  # (P, Q, 1, s, s, L, L)
  logits = jnp.where(valid[None], logits.astype(jnp.float32), -1e9)
  weights = jax.nn.softmax(logits.reshape(b, nh, nw, n, s * s, big * big), axis=-1)
  weights = weights.astype(layers.activation_dtype(dtype))
  y = jnp.einsum("zpqnst,zpqtnd->zpqsnd", weights, values.astype(weights.dtype))
  y = y.reshape(b, nh, nw, s, s, n, d).transpose(0, 1, 3, 2, 4, 5, 6)
  return y.reshape(b, nh * s, nw * s, n, d)[:, :h, :w]


class SASABottleneck(layers.Module):
  """1x1 conv -> BN -> relu -> local attention [-> 2x2/2 average pool] -> BN -> relu -> 1x1 conv
  (4x) -> BN (zero-init scale) -> add the (projected) input -> relu."""
  features: int  # attention width; the unit outputs 4 * features
  stride: int = 1
  num_heads: int = 8
  window: int = 7
  query_block: int = 4  # see LocalSelfAttention
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv, bn = layers.conv_and_bn(train=train, bn_axis_name=self.bn_axis_name,
                                  **self.kw)
    out = 4 * self.features
    residual = x
    if x.shape[-1] != out or self.stride != 1:
      residual = conv(out, (1, 1), strides=self.stride, name="conv_proj")(x)
      residual = bn(name="bn_proj")(residual)
    y = nn.relu(bn(name="bn1")(conv(self.features, (1, 1), name="conv1")(x)))
    y = LocalSelfAttention(self.features, self.num_heads, self.window, self.query_block,
                           name="attention", **self.kw)(y)
    if self.stride != 1:
      y = nn.avg_pool(y, (self.stride, self.stride), strides=(self.stride, self.stride))
    y = nn.relu(bn(name="bn2")(y))
    y = bn(scale_init=nn.initializers.zeros, name="bn3")(conv(out, (1, 1), name="conv3")(y))
    return nn.relu(residual + y)


class SASAResNet(layers.Module):
  """Conv-stem stand-alone self-attention ResNet: root, stages of `SASABottleneck`, global
  average pool, zero-init `head`. `num_classes=0` returns the pooled features (B, 4 * base_width *
  2**(stages - 1)). CPU-sized variants: e.g. `get_model("SASA-ResNet-26", num_layers=(1, 1, 1),
  base_width=16, num_heads=4, root="small", num_classes=10)`.
  """
  num_classes: int
  num_layers: Tuple[int, ...] = (3, 4, 6, 3)
  base_width: int = 64
  num_heads: int = 8
  window: int = 7
  query_block: int = 4  # see LocalSelfAttention
  root: str = "imagenet"  # see layers.BN_ROOTS
  bn_axis_name: Optional[str] = None  # the pmap axis to average BatchNorm statistics over

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    kw = dict(bn_axis_name=self.bn_axis_name, **self.kw)

    def stage(s, n):  # stage s: width base_width * 2**s, stride 2 after the first
      unit = lambda u: functools.partial(SASABottleneck, self.base_width * 2**s,
                                         stride=2 if s and not u else 1,
                                         num_heads=self.num_heads, window=self.window,
                                         query_block=self.query_block, **kw)
      return layers.UnitStage(n, unit, name=f"block{s + 1}")
    return layers.bn_resnet_classifier(images, family="SASA-ResNet", num_layers=self.num_layers,
                                       base_width=self.base_width, root=self.root,
                                       num_classes=self.num_classes, train=train, stage=stage,
                                       **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`SASA-ResNet-50` -> SASAResNet kwargs; None when the name is not a SASA name."""
  m = NAME_RE.match(name)
  if not m:
    return None
  if int(m["variant"]) not in DEPTHS:
    raise errors.ConfigError(f"Unknown SASA-ResNet depth {m['variant']} in {name!r}; known: "
                             f"{', '.join(NAMES)}.")
  return dict(num_layers=DEPTHS[int(m["variant"])])
