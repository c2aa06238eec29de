"""Swin Transformer (Liu et al., 2021): shifted-window attention, 4 stages, patch merging.

Parameter tree (names follow the published Swin code):

    patch_embed/proj/{kernel (4,4,3,C), bias}   patch_embed/norm/{scale,bias}
    layers_{i}/blocks_{j}/norm1, norm2                               LayerNorm (eps 1e-5)
    layers_{i}/blocks_{j}/attn/{query,key,value}/kernel (D,H,d), out/kernel (H,d,D)
    layers_{i}/blocks_{j}/attn/relative_position_bias_table          ((2W-1)^2, H)
    layers_{i}/blocks_{j}/mlp/{Dense_0,Dense_1}                       exact GELU
    layers_{i}/downsample/{norm (4D), reduction/kernel (4D,2D)}      all stages but the last
    norm, head

Any input resolution works: images are padded to a multiple of the patch, each block pads its
map to a multiple of its window (bottom/right, after norm1) and crops after attention, and patch
merging pads odd maps, all as Hugging Face's `SwinModel` does. A stage's window is fixed when the
model is built from `img_size` (the published clamp: a stage no larger than the window uses one
window of its own size, so the bias table shape depends on `img_size`); shifting is switched off
at run time in any stage whose map fits in one window. Stochastic depth drops both residual
branches, as published (HF's torch Swin drops only the attention branch; eval is unaffected).
"""
import math
import re
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


# name -> (embed_dim, depths, num_heads, drop path rate): docs/reference.md, "Swin Transformer".
VARIANTS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),
}
NAMES = tuple(f"Swin-{v}" for v in VARIANTS)
NAME_RE = re.compile(r"^Swin-(?P<variant>[A-Za-z]+)$")

# Parameters the published recipe keeps out of weight decay: the relative position bias tables and
# every 1-D parameter or bias (LayerNorm scale/bias, Dense/Conv biases). Matched with re.fullmatch
# against '/'-joined names such as 'layers_0/blocks_1/attn/relative_position_bias_table'.
NO_WEIGHT_DECAY = r"(.*/)?(relative_position_bias_table|bias|scale)"

# torch's default Conv2d init (kaiming_uniform, a=sqrt(5)), which the reference keeps for the stem.
_torch_conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


# ------------------------------------------------------------------ windows, index, mask.
def window_partition(x, window: int):
  """(B, H, W, C) -> (B * H/w * W/w, w, w, C); windows batch-major, then row-major.

  Works on numpy and jax arrays alike.
  """
  b, h, w, c = x.shape
  if h % window or w % window:
    raise errors.ConfigError(f"map {h}x{w} is not a multiple of window {window}; pad it first.")
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows, window: int, h: int, w: int):
  """Inverse of `window_partition`: (B * h/w * w/w, w, w, C) -> (B, h, w, C)."""
  if h % window or w % window:
    raise errors.ConfigError(f"map {h}x{w} is not a multiple of window {window}.")
  c = windows.shape[-1]
  x = windows.reshape(-1, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> np.ndarray:
  """(w*w, w*w) int index into the ((2w-1)^2, H) bias table: (dy + w-1) * (2w-1) + (dx + w-1)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
  coords = coords.reshape(2, -1)  # (2, N), row-major tokens
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), in [0, 2w-2]
  return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> np.ndarray:
  """(num_windows, w*w, w*w) additive mask for the cyclically shifted (h, w) map: 0 between tokens
  of the same region, -100 across regions (regions: slices (0,-w), (-w,-s), (-s,None) per axis)."""
  if not 0 < shift < window:
    raise errors.ConfigError(f"shift {shift} must be in (0, window={window}).")
  regions = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  labels = np.zeros((1, h, w, 1), np.float32)
  for i, hs in enumerate(regions):
    for j, ws in enumerate(regions):
      labels[:, hs, ws, :] = 3 * i + j
  labels = window_partition(labels, window).reshape(-1, window * window)  # (nW, N)
  diff = labels[:, None, :] - labels[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def merge_patches(x):
  """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C): odd maps are zero-padded bottom/right, then
  [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]] are concatenated, the published
  order."""
  _, h, w, _ = x.shape
  x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  return jnp.concatenate(
      [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


def stage_windows(img_size: Tuple[int, int], patch_size: int, num_stages: int,
                  window: int) -> Tuple[int, ...]:
  """Each stage's window at `img_size`: `window`, or min(H, W) of a stage no larger than it."""
  h, w = (-(-s // patch_size) for s in img_size)
  out = []
  for _ in range(num_stages):
    out.append(min(h, w) if min(h, w) <= window else window)
    h, w = (h + 1) // 2, (w + 1) // 2
  return tuple(out)


# ------------------------------------------------------------------ modules.
class WindowAttention(layers.Module):
  """layers.Attention on windows plus the relative position bias (and the shift mask).

  Shares its scope with the inner Attention, so `query`/`key`/`value`/`out` and
  `relative_position_bias_table` are siblings under `attn/`.
  """
  num_heads: int
  window_size: int
  dropout_rate: float = 0.0

  def setup(self):
    self.attention = layers.Attention(
        self.num_heads, qkv_bias=True, dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=layers.trunc_normal,
        bias_init=nn.initializers.zeros)
    nn.share_scope(self, self.attention)

  @nn.compact
  def __call__(self, x, mask=None, *, deterministic: bool):
    """x: (B * nW, w*w, D) windows; mask: (nW, w*w, w*w) or None."""
    win, n = self.window_size, self.window_size ** 2
    table = self.param("relative_position_bias_table", layers.trunc_normal,
                       ((2 * win - 1) ** 2, self.num_heads), self.param_dtype)
    bias = table[relative_position_index(win).reshape(-1)].reshape(n, n, self.num_heads)
    bias = jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)  # (1, H, N, N)
    if mask is not None:
      num_windows = mask.shape[0]
      bias = bias + jnp.asarray(mask)[:, None]  # (nW, H, N, N)
      bias = jnp.tile(bias, (x.shape[0] // num_windows, 1, 1, 1))  # (B * nW, H, N, N)
    return self.attention(x, bias=bias, deterministic=deterministic)


class SwinBlock(layers.Module):
  """x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x))); x is (B, H, W, C)."""
  num_heads: int
  window_size: int
  shifted: bool = False  # odd blocks shift by window // 2 (unless the map fits in one window)
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    _, h, w, c = x.shape
    win = self.window_size
    shift = win // 2 if self.shifted and min(h, w) > win else 0

    ln_kw = self.norm_kw
    y = nn.LayerNorm(epsilon=1e-5, name="norm1", **ln_kw)(x)
    pad_h, pad_w = -h % win, -w % win
    y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    y = window_partition(y, win).reshape(-1, win * win, c)  # (B * nW, N, C)
    mask = shifted_window_mask(hp, wp, win, shift) if shift else None
    y = WindowAttention(self.num_heads, win, dropout_rate=self.attention_dropout_rate,
                        name="attn", **kw)(y, mask, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = window_reverse(y.reshape(-1, win, win, c), win, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    y = y[:, :h, :w]
    x = x + layers.DropPath(self.droppath_rate)(y, deterministic)

    y = nn.LayerNorm(epsilon=1e-5, name="norm2", **ln_kw)(x)
    y = layers.MlpBlock(int(c * self.mlp_ratio), dropout_rate=self.dropout_rate,
                        approximate_gelu=False, kernel_init=layers.trunc_normal,
                        bias_init=nn.initializers.zeros, name="mlp", **kw)(
                            y, deterministic=deterministic)
    return x + layers.DropPath(self.droppath_rate)(y, deterministic)


class PatchMerging(layers.Module):
  """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): merge 2x2 neighbours, LN(4C), Dense(2C)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = merge_patches(x)
    x = nn.LayerNorm(epsilon=1e-5, name="norm", dtype=layers.activation_dtype(self.dtype),
                     param_dtype=self.param_dtype)(x)
    return nn.Dense(2 * c, use_bias=False, kernel_init=layers.trunc_normal, name="reduction",
                    **self.dense_kw)(x)


class PatchEmbed(layers.Module):
  """Non-overlapping patch x patch conv, then LayerNorm; pads images to a multiple of the patch."""
  patch_size: int
  embed_dim: int

  @nn.compact
  def __call__(self, x):
    # The patch convolution stays float32 under mixed precision, as resnet.py's convolutions.
    kw = self.norm_kw
    p = self.patch_size
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID",
                kernel_init=_torch_conv_init, name="proj", **kw)(x)
    return nn.LayerNorm(epsilon=1e-5, name="norm", **kw)(x)  # (B, H/p, W/p, C)


class SwinStage(layers.Module):
  """`depth` blocks (odd ones shifted), then patch merging unless it is the last stage."""
  depth: int
  num_heads: int
  window_size: int
  droppath_rates: Tuple[float, ...]
  downsample: bool
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    for j in range(self.depth):
      x = SwinBlock(self.num_heads, self.window_size, shifted=j % 2 == 1,
                    mlp_ratio=self.mlp_ratio, dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    droppath_rate=self.droppath_rates[j], name=f"blocks_{j}", **kw)(
                        x, deterministic)
    if self.downsample:
      x = PatchMerging(name="downsample", **kw)(x)
    return x


class SwinTransformer(layers.Module):
  """Swin classifier: LN -> mean pool -> head. `num_classes=0` returns the pooled features."""
  num_classes: int = 1000
  patch_size: int = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  img_size: Union[int, Tuple[int, int]] = 224  # sets each stage's window (and so table shapes)
  mlp_ratio: float = 4.0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0  # linspace(0, rate, sum(depths)) over all blocks

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4:
      raise errors.ConfigError(f"images must be (B, H, W, C); got shape {images.shape}.")
    depths, heads = tuple(self.depths), tuple(self.num_heads)
    if len(depths) != len(heads):
      raise errors.ConfigError(f"depths {depths} and num_heads {heads} must have the same length.")
    if self.window_size < 1:
      raise errors.ConfigError(f"window_size must be positive, got {self.window_size}.")
    kw = self.kw
    img = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
    windows = stage_windows(img, self.patch_size, len(depths), self.window_size)
    rates = np.linspace(0.0, self.droppath_rate, sum(depths)).tolist()

    x = PatchEmbed(self.patch_size, self.embed_dim, name="patch_embed", **kw)(
        images.astype(layers.activation_dtype(self.dtype)))  # (B, H/4, W/4, C)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i, (depth, h, win) in enumerate(zip(depths, heads, windows)):
      start = sum(depths[:i])
      x = SwinStage(depth, h, win, tuple(rates[start:start + depth]),
                    downsample=i < len(depths) - 1, mlp_ratio=self.mlp_ratio,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate, name=f"layers_{i}",
                    **kw)(x, not train)
    return layers.classifier_head(x, self.num_classes, pool="mean", norm_epsilon=1e-5, **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`Swin-T` -> SwinTransformer kwargs (with the published drop path); None if not a Swin name."""
  m = layers.match_variant(name, NAME_RE, VARIANTS, "Swin", ", ".join(NAMES))
  if not m:
    return None
  dim, depths, heads, droppath = VARIANTS[m["variant"]]
  return dict(embed_dim=dim, depths=depths, num_heads=heads, droppath_rate=droppath)


# ------------------------------------------------------------------ window change.
def _torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of 1-D bicubic resizing as torch's interpolate(mode='bicubic',
  align_corners=False) computes it: Keys kernel with a=-0.75, half-pixel centres, clamped edges."""
  a = -0.75
  def kernel(t):  # |t| <= 2
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    base = math.floor(src)
    frac = src - base
    for k in range(-1, 3):
      m[i, min(max(base + k, 0), n_in - 1)] += kernel(k - frac)
  return m


def resize_relative_position_bias_table(table, window: int) -> np.ndarray:
  """((2w-1)^2, H) table -> ((2*window-1)^2, H), bicubic over the (2w-1, 2w-1) grid per head, as the
  reference does when loading weights trained with another window."""
  table = np.asarray(table)
  side = math.isqrt(table.shape[0])
  if table.ndim != 2 or side * side != table.shape[0]:
    raise errors.ConfigError(f"expected a ((2w-1)^2, heads) table, got shape {table.shape}.")
  new = 2 * window - 1
  if new == side:
    return table
  m = _torch_bicubic_matrix(side, new)
  grid = table.reshape(side, side, -1).astype(np.float64)
  out = np.einsum("ir,rch,jc->ijh", m, grid, m)
  return out.reshape(new * new, -1).astype(table.dtype)


def resize_bias_tables(params, target_params):
  """Resizes every `relative_position_bias_table` in `params` to its shape in `target_params`
  (e.g. `jax.eval_shape(model.init, ...)['params']` of the model with the new window/img_size)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(target_params))
  for key, value in flat.items():
    if key[-1] != "relative_position_bias_table" or key not in target:
      continue
    want = tuple(target[key].shape)
    if tuple(value.shape) != want:
      side = math.isqrt(want[0])
      flat[key] = resize_relative_position_bias_table(value, (side + 1) // 2)
  return flax.traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------ Hugging Face import.
# Older Hub checkpoints name things differently; they are renamed to the current names first.
_HF_LEGACY = (
    (".attention.self.relative_position_bias_table",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (".attention.self.query.", ".attention.q_proj."),
    (".attention.self.key.", ".attention.k_proj."),
    (".attention.self.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)
_HF_IGNORED = re.compile(r".*relative_position_index")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_HF_DOWN = re.compile(r"encoder\.layers\.(\d+)\.downsample\.(.+)")


def from_hf_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Params (nested dict of numpy arrays) from a Hugging Face `SwinForImageClassification` (or
  `SwinModel`, then without `head`) state dict of numpy arrays. Current and legacy Hub names are
  both accepted; head counts are read from the bias tables. Raises ValueError on leftover keys."""
  sd = layers.TorchStateDict(state_dict, what="Swin", strip_prefix="swin.", renames=_HF_LEGACY,
                             ignore=_HF_IGNORED)
  sd.conv("embeddings.patch_embeddings.projection", ("patch_embed", "proj"))
  sd.layer_norm("embeddings.norm", ("patch_embed", "norm"))
  for key in sorted(sd.sd):
    if m := _HF_BLOCK.fullmatch(key):
      if not m[3].startswith("attention.relative_position_bias."):
        continue
      src, dst = f"encoder.layers.{m[1]}.blocks.{m[2]}", (f"layers_{m[1]}", f"blocks_{m[2]}")
      table = sd.take(key)
      sd.put(dst + ("attn", "relative_position_bias_table"), table)
      sd.layer_norm(src + ".layernorm_before", dst + ("norm1",))
      sd.layer_norm(src + ".layernorm_after", dst + ("norm2",))
      sd.attention(*(f"{src}.attention.{n}_proj" for n in "qkvo"), dst + ("attn",),
                   num_heads=table.shape[1])
      sd.linear(src + ".mlp.fc1", dst + ("mlp", "Dense_0"))
      sd.linear(src + ".mlp.fc2", dst + ("mlp", "Dense_1"))
    elif (m := _HF_DOWN.fullmatch(key)) and m[2] == "reduction.weight":
      src, dst = f"encoder.layers.{m[1]}.downsample", (f"layers_{m[1]}", "downsample")
      sd.linear(src + ".reduction", dst + ("reduction",))
      sd.layer_norm(src + ".norm", dst + ("norm",))
  sd.layer_norm("layernorm", ("norm",))
  if sd.has("classifier.weight"):
    sd.linear("classifier", ("head",))
  try:
    return sd.variables()["params"]
  except ValueError as e:  # keys left over
    raise errors.ConfigError(f"{e} (absolute position embeddings and mask tokens are not supported)"
                             ) from None
