"""Image Transformer (Parmar et al., 2018): autoregressive image generation with local attention.

An image of H x W pixels with C channels is a sequence of H x (W * C) intensities (the channels
of a pixel side by side, as the paper's 2D model lays them out), generated one intensity at a
time, each a 256-way categorical. Position i sees the embeddings of the intensities before it in
the generation order (the input is shifted right by one, a learned start embedding first) plus a
learned position embedding; pre-LN decoder blocks with causally masked attention; a Dense layer
to 256 logits per intensity.

The attention of `attention`:
  "local_2d"  the paper's local 2D attention: the H x W' grid is cut into query blocks of
              `query_shape` (rows, columns), generated block by block in raster order and
              raster order inside a block. A block attends to its memory block: `memory_flange`
              rows above it and columns to either side, plus itself, masked to the positions
              before each query in that order (so the blocks to its right in the same band, and
              the later pixels of its own block, are hidden).
  "local_1d"  the paper's local 1D attention: raster order; the sequence is cut into query
              blocks of `block_length`, each attending to itself and the `memory_length`
              positions before it, causally masked.
  "full"      raster order, every position attends to all earlier ones (a causal ViT over all
              pixels: the baseline the local models are measured against).
All three are one computation: per query block, its queries and the positions of its memory
(static slices, `memory_blocks`), with a static mask (`attention_plan`, which also lists the
positions as indices for the tests); "full" is one block holding everything. The output at a position depends only on intensities strictly before it in its
order (tests/models/test_image_transformer.py checks it by gradients, for every position).

Inputs are images whose values are the intensities 0..255 (the pp "decode" alone, no
value_range); outputs are logits (B, H, W, C, 256). Bits per dimension = the mean negative
log-likelihood over all intensities / ln 2 (vit_jax/tasks/generation.py).

Sizes are ours, not the paper's: `ImageTransformer-{2D,1D,Full}` name the attention, every other
field (width, depth, heads, block shapes) is a config override.
"""
import re
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


VARIANTS = {"2D": "local_2d", "1D": "local_1d", "Full": "full"}
NAMES = tuple(f"ImageTransformer-{v}" for v in VARIANTS)
NAME_RE = re.compile(r"^ImageTransformer-(?P<variant>\w+)$")
NUM_INTENSITIES = 256


def attention_plan(kind: str, height: int, width: int, *, block_length: int = 0,
                   memory_length: int = 0, query_shape: Tuple[int, int] = (0, 0),
                   memory_flange: Tuple[int, int] = (0, 0)):
  """Static index arithmetic of an attention kind over an H x W grid (W: width times channels).

  Returns (order, queries, memory, mask) as numpy arrays:
    order    (N,): order[t] is the raster index (r * W + c) of the t-th generated position
    queries  (nb, Q): the generation steps t of each query block
    memory   (nb, M): the generation steps of each block's memory (out-of-image slots: 0, masked)
    mask     (nb, Q, M): True where the query may attend (the key is in the image and is not
             after the query in the generation order)
  """
  n = height * width
  raster = np.arange(n).reshape(height, width)
  if kind == "local_2d":
    qh, qw = query_shape
    fh, fw = memory_flange
    if qh <= 0 or qw <= 0 or height % qh or width % qw:
      raise errors.ConfigError(
          f"model.query_shape={tuple(query_shape)} must divide the {height}x{width} grid of "
          "intensities (rows x columns * channels).")
    if fh < 0 or fw < 0:
      raise errors.ConfigError(f"model.memory_flange={tuple(memory_flange)} must be >= 0.")
    blocks = [(r, c) for r in range(0, height, qh) for c in range(0, width, qw)]
    order = np.concatenate([raster[r:r + qh, c:c + qw].reshape(-1) for r, c in blocks])
    step_of = np.empty(n, np.int64)
    step_of[order] = np.arange(n)
    queries = np.arange(n).reshape(len(blocks), qh * qw)
    memory, valid = [], []
    for r, c in blocks:
      rows, cols = np.arange(r - fh, r + qh), np.arange(c - fw, c + qw + fw)
      inside = ((rows[:, None] >= 0) & (cols[None, :] >= 0) & (cols[None, :] < width))
      rr, cc = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
      memory.append(np.where(inside, step_of[raster[rr][:, cc]], 0).reshape(-1))
      valid.append(inside.reshape(-1))
    memory, valid = np.stack(memory), np.stack(valid)
  elif kind in ("local_1d", "full"):
    order = np.arange(n)
    length = n if kind == "full" else block_length
    mem = 0 if kind == "full" else memory_length
    if length <= 0 or n % length:
      raise errors.ConfigError(f"model.block_length={block_length} must divide the {n} "
                               "intensities of an image.")
    if mem < 0:
      raise errors.ConfigError(f"model.memory_length={memory_length} must be >= 0.")
    starts = np.arange(0, n, length)
    queries = starts[:, None] + np.arange(length)[None]
    memory = starts[:, None] + np.arange(-mem, length)[None]
    valid = memory >= 0
    memory = np.where(valid, memory, 0)
  else:
    raise errors.ConfigError(f"model.attention={kind!r}: use local_2d, local_1d or full.")
  mask = valid[:, None, :] & (memory[:, None, :] <= queries[:, :, None])
  return order, queries, memory, mask


def memory_blocks(x, kind: str, height: int, width: int, *, block_length: int = 0,
                  memory_length: int = 0, query_shape=(0, 0), memory_flange=(0, 0)):
  """x (B, N, D) in generation order -> each query block's memory (B, nb, M, D), slot for slot
  the positions `attention_plan` lists (out-of-image slots are zeros, masked by the plan). Built
  from static slices (no gathers: their gradients are scatters, slow on CPU)."""
  b, n, d = x.shape
  if kind == "full":
    return x[:, None]
  if kind == "local_1d":
    padded = jnp.pad(x, ((0, 0), (memory_length, 0), (0, 0)))
    span = memory_length + block_length
    return jnp.stack([padded[:, s:s + span] for s in range(0, n, block_length)], axis=1)
  qh, qw = query_shape
  fh, fw = memory_flange
  # Block raster order -> the (H, W) grid: blocks (H/qh, W/qw) of (qh, qw), raster inside.
  grid = x.reshape(b, height // qh, width // qw, qh, qw, d).transpose(0, 1, 3, 2, 4, 5)
  grid = jnp.pad(grid.reshape(b, height, width, d), ((0, 0), (fh, 0), (fw, fw), (0, 0)))
  return jnp.stack([grid[:, r:r + fh + qh, c:c + qw + 2 * fw].reshape(b, -1, d)
                    for r in range(0, height, qh) for c in range(0, width, qw)], axis=1)


class DecoderBlock(layers.Module):
  """Pre-LN block: masked attention of each query block over its memory, then an MLP."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, memory_fn, bias, *, deterministic: bool):
    """x (B, N, D) in generation order; memory_fn: memory_blocks with the model's plan; bias
    (nb, Q, M): 0 where the plan's mask allows, -1e9 elsewhere."""
    b, n, d = x.shape
    nb, q, m = bias.shape

    def attention(y):
      yq = y.reshape(b * nb, q, d)  # query blocks are contiguous in the generation order
      ykv = memory_fn(y).reshape(b * nb, m, d)
      bias_b = jnp.broadcast_to(bias[None, :, None], (b, nb, 1, q, m)).reshape(b * nb, 1, q, m)
      out = layers.Attention(num_heads=self.num_heads, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="attention")(yq, ykv, bias=bias_b)
      return out.reshape(b, n, d)

    mlp = lambda y: layers.MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate,
                                    dtype=self.dtype, param_dtype=self.param_dtype,
                                    name="mlp")(y, deterministic=deterministic)
    return layers.pre_norm_block(x, attention, mlp, epsilon=1e-6,
                                 dropout_rate=self.dropout_rate, droppath_rate=0.0,
                                 deterministic=deterministic, dtype=self.dtype,
                                 param_dtype=self.param_dtype)


class ImageTransformer(layers.Module):
  """Autoregressive model of image intensities (see the module docstring)."""
  num_classes: int = 0  # class-conditional generation is not implemented: 0 (set by the task)
  attention: str = "local_2d"
  hidden_size: int = 256
  num_layers: int = 8
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout_rate: float = 0.0
  block_length: int = 128  # local_1d: query block
  memory_length: int = 128  # local_1d: positions before the block it also sees
  query_shape: Tuple[int, int] = (8, 16)  # local_2d: rows, columns (times channels)
  memory_flange: Tuple[int, int] = (8, 16)  # local_2d: rows above, columns to either side

  def _plan_kwargs(self):
    return dict(block_length=self.block_length, memory_length=self.memory_length,
                query_shape=tuple(self.query_shape), memory_flange=tuple(self.memory_flange))

  def plan(self, height: int, width: int):
    return attention_plan(self.attention, height, width, **self._plan_kwargs())

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """images (B, H, W, C) of intensities 0..255 -> logits (B, H, W, C, 256)."""
    if self.num_classes:
      raise errors.ConfigError("The Image Transformer here is unconditional: num_classes must "
                               f"be 0, not {self.num_classes}.")
    b, h, w, c = images.shape
    order = self.plan(h, w * c)[0]
    x = jnp.clip(jnp.round(images), 0, NUM_INTENSITIES - 1).astype(jnp.int32)
    x = x.reshape(b, h * w * c)[:, order]  # generation order
    emb = nn.Embed(NUM_INTENSITIES, self.hidden_size, param_dtype=self.param_dtype,
                   embedding_init=nn.initializers.normal(1.0), name="embed")(x)
    return self.decode(emb, (h, w, c), train=train)

  @nn.compact
  def decode(self, emb, shape, *, train: bool = False):
    """Embedded intensities (B, N, D) in generation order -> logits (B, H, W, C, 256): the part
    of the model the causality test differentiates."""
    h, w, c = shape
    order, _, _, mask = self.plan(h, w * c)
    memory_fn = lambda y: memory_blocks(y, self.attention, h, w * c, **self._plan_kwargs())
    b, n, d = emb.shape
    start = self.param("start", nn.initializers.normal(0.02), (d,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(start, (b, 1, d)), emb[:, :-1]], axis=1)  # shift
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (h * w * c, d),
                     self.param_dtype)
    x = (x + pos[order][None]).astype(layers.activation_dtype(self.dtype))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    bias = jnp.where(jnp.asarray(mask), 0.0, -1e9).astype(jnp.float32)
    for i in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, name=f"block_{i}",
                       **self.kw)(
          x, memory_fn, bias, deterministic=not train)
    x = nn.LayerNorm(epsilon=1e-6, name="norm", param_dtype=self.param_dtype)(x)
    # Zero-initialised: training starts from the uniform model, exactly 8 bits per dimension.
    logits = nn.Dense(NUM_INTENSITIES, name="head", kernel_init=nn.initializers.zeros,
                      param_dtype=self.param_dtype)(x)
    logits = logits.astype(jnp.float32)
    inverse = np.argsort(order)  # generation order -> raster order
    return logits[:, inverse].reshape(b, h, w, c, NUM_INTENSITIES)


def sample(model, variables, shape, rng, *, num: int, temperature: float = 1.0):
  """`num` images (num, H, W, C) of intensities drawn one at a time in the model's generation
  order: N forward passes, each fixing the next intensity (jit it, with `model`, `shape` and
  `num` static)."""
  h, w, c = shape
  order = model.plan(h, w * c)[0]
  n = h * w * c

  def body(t, carry):
    images, key = carry
    key, sub = jax.random.split(key)
    logits = model.apply(variables, images, train=False).reshape(num, n, NUM_INTENSITIES)
    pos = jnp.asarray(order)[t]
    draw = jax.random.categorical(sub, logits[:, pos] / temperature, axis=-1)
    flat = images.reshape(num, n).at[:, pos].set(draw.astype(images.dtype))
    return flat.reshape(images.shape), key

  images = jnp.zeros((num, h, w, c), jnp.float32)
  images, _ = jax.lax.fori_loop(0, n, body, (images, rng))
  return images


def config_from_name(name: str) -> Optional[dict]:
  """`ImageTransformer-2D` -> ImageTransformer kwargs; None for other names."""
  m = layers.match_variant(name, NAME_RE, VARIANTS, "ImageTransformer", ", ".join(NAMES))
  if not m:
    return None
  return dict(attention=VARIANTS[m["variant"]])
