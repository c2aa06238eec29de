"""T2T-ViT (Yuan et al., 2021): a Tokens-to-Token module in front of a deep-narrow ViT.

The Tokens-to-Token module alternates soft splits and re-structurizations. A soft split is
torch's `nn.Unfold`: overlapping k x k patches (kernel 7 stride 4 padding 2, then twice kernel 3
stride 2 padding 1), each flattened channel-major (index c * k * k + i * k + j) into one token.
Between the splits a small transformer re-structurizes the tokens; T2T-ViT-14/19/24 use the
Performer variant of the official code (`Token_performer`): LayerNorm, one Dense to keys, queries
and values of width 64 (in that order), linear attention with 32 positive random features
exp(w x - |x|^2 / 2) / sqrt(m) from a fixed random matrix `w` (orthogonal rows times sqrt(m)),
Dense, the values as skip connection, then a GELU MLP of width 64 with its own residual. A Dense
layer projects the last split's tokens to the backbone's width; then a cls token, fixed sin-cos
position embeddings (the original Transformer's table), and pre-LN blocks without qkv bias.
Exact (erf) GELU, LayerNorm epsilon 1e-5 everywhere, Dense kernels truncated normal(0.02).

Two parameters are fixed in the official code (`requires_grad=False`) and still counted by its
`model.parameters()`: the performers' `w` and `pos_embed`. Here they are `params` leaves (so the
counts equal the official ones and checkpoints carry them) that the model reads through
`stop_gradient`; their names are neither `kernel` nor `scale`/`bias`-like decay targets, so the
default weight decay (kernels only) leaves them alone too. The performers' dropout is the
official fixed 0.1 (`t2t_dropout_rate`).

The official pretrained weights were trained with the attention scale embed_dim**-0.5 (not
head_dim**-0.5); since the blocks have no qkv bias, loading them here needs only the query
kernels multiplied by sqrt(head_dim / embed_dim).

Parameter tree:

    tokens_to_token/attention{1,2}/{norm1, kqv, proj, norm2, mlp/{Dense_0, Dense_1}, w (32, 64)}
    tokens_to_token/project       cls_token (1, 1, D)      pos_embed (1, N + 1, D)
    blocks_{i}/{norm1, attn/{query, key, value (no bias), out}, norm2, mlp/{Dense_0, Dense_1}}
    norm, head
"""
import math
import re
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


# name -> (embed_dim, depth, num_heads, mlp_ratio): the official t2t_vit_14/19/24 (Performer T2T).
VARIANTS = {"14": (384, 14, 6, 3.0), "19": (448, 19, 7, 3.0), "24": (512, 24, 8, 3.0)}
NAMES = tuple(f"T2T-ViT-{v}" for v in VARIANTS)
NAME_RE = re.compile(r"^T2T-ViT-(?P<variant>\d+)$")
# (kernel, stride, padding) of the three soft splits.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

def soft_split(x, kernel: int, stride: int, padding: int) -> Tuple[jax.Array, int, int]:
  """torch's nn.Unfold on (B, H, W, C): -> (B, h*w, C*k*k) tokens (channel-major), h, w."""
  b, hi, wi, c = x.shape
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  h = (hi + 2 * padding - kernel) // stride + 1
  w = (wi + 2 * padding - kernel) // stride + 1
  if h < 1 or w < 1:
    raise errors.ConfigError(f"a {hi}x{wi} map is too small for a {kernel}x{kernel} soft split.")
  patches = [x[:, i:i + stride * (h - 1) + 1:stride, j:j + stride * (w - 1) + 1:stride]
             for i in range(kernel) for j in range(kernel)]  # k*k of (B, h, w, C)
  x = jnp.stack(patches, axis=-1)  # (B, h, w, C, k*k)
  return x.reshape(b, h * w, c * kernel * kernel), h, w


def sinusoid_table(n: int, d: int) -> np.ndarray:
  """(1, n, d) fixed position table: angle pos / 10000**(2 * (j // 2) / d), sin on even j, cos on
  odd j."""
  pos = np.arange(n)[:, None].astype(np.float64)
  j = np.arange(d)[None]
  angle = pos / np.power(10000, 2 * (j // 2) / d)
  table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  return table[None].astype(np.float32)


def _performer_w_init(key, shape, dtype=jnp.float32):
  m = shape[0]
  return nn.initializers.orthogonal()(key, shape, dtype) * math.sqrt(m)


class TokenPerformer(layers.Module):
  """The official `Token_performer` (see the module docstring); (B, T, Din) -> (B, T, emb)."""
  emb: int = 64
  kernel_ratio: float = 0.5
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    nkw = self.norm_kw
    dkw = self.dense_kw
    dense = lambda n, name: nn.Dense(n, kernel_init=layers.trunc_normal, name=name, **dkw)
    m = int(self.emb * self.kernel_ratio)
    w = jax.lax.stop_gradient(self.param("w", _performer_w_init, (m, self.emb),
                                         self.param_dtype)).astype(jnp.float32)

    def features(t):  # positive random features, in float32 as the official code
      t = t.astype(jnp.float32)
      return jnp.exp(t @ w.T - jnp.sum(t * t, -1, keepdims=True) / 2) / math.sqrt(m)

    y = nn.LayerNorm(epsilon=1e-5, name="norm1", **nkw)(x)
    k, q, v = jnp.split(dense(3 * self.emb, "kqv")(y), 3, axis=-1)
    kp, qp = features(k), features(q)  # (B, T, m)
    den = jnp.einsum("btm,bm->bt", qp, kp.sum(axis=1))[..., None]  # (B, T, 1)
    kptv = jnp.einsum("btn,btm->bnm", v.astype(jnp.float32), kp)  # (B, emb, m)
    y = (jnp.einsum("btm,bnm->btn", qp, kptv) / (den + 1e-8)).astype(self.dtype)
    y = dense(self.emb, "proj")(y)
    x = v + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.LayerNorm(epsilon=1e-5, name="norm2", **nkw)(x)
    y = layers.MlpBlock(self.emb, approximate_gelu=False, kernel_init=layers.trunc_normal,
                        bias_init=nn.initializers.zeros, name="mlp", **kw)(y, deterministic=True)
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class TokensToToken(layers.Module):
  """Soft split, performer, soft split, performer, soft split, Dense: (B, H, W, C) -> (B, N, D)."""
  embed_dim: int
  token_dim: int = 64
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    dkw = self.dense_kw
    for i, split in enumerate(SOFT_SPLITS):
      x, h, w = soft_split(x, *split)
      if i < len(SOFT_SPLITS) - 1:
        x = TokenPerformer(self.token_dim, dropout_rate=self.dropout_rate,
                           name=f"attention{i + 1}", **kw)(x, deterministic)
        x = x.reshape(x.shape[0], h, w, self.token_dim)
    return nn.Dense(self.embed_dim, kernel_init=layers.trunc_normal, name="project", **dkw)(x)


class T2TBlock(layers.Module):
  """Pre-LN block: x + DropPath(MHA(LN(x))) without qkv bias, then x + DropPath(MLP(LN(x)))."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    attention = layers.Attention(self.num_heads, qkv_bias=False,
                                 dropout_rate=self.attention_dropout_rate,
                                 kernel_init=layers.trunc_normal, name="attn", **kw)
    mlp = layers.MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate, approximate_gelu=False,
                          kernel_init=layers.trunc_normal, bias_init=nn.initializers.zeros,
                          name="mlp", **kw)
    return layers.pre_norm_block(
        x, lambda y: attention(y, deterministic=deterministic),
        lambda y: mlp(y, deterministic=deterministic), epsilon=1e-5,
        dropout_rate=self.dropout_rate, droppath_rate=self.droppath_rate,
        deterministic=deterministic, **kw)


class T2TViT(layers.Module):
  """T2T-ViT classifier (see the module docstring). `num_classes=0` returns the cls token."""
  num_classes: int = 1000
  embed_dim: int = 384
  depth: int = 14
  num_heads: int = 6
  mlp_ratio: float = 3.0
  token_dim: int = 64
  t2t_dropout_rate: float = 0.1  # the official performers' fixed dropout
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0  # linspace(0, rate, depth) over the blocks

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4:
      raise errors.ConfigError(f"images must be (B, H, W, C); got shape {images.shape}.")
    kw = self.kw
    x = images.astype(layers.activation_dtype(self.dtype))
    x = TokensToToken(self.embed_dim, self.token_dim, self.t2t_dropout_rate,
                      name="tokens_to_token", **kw)(x, not train)
    b, n, d = x.shape
    cls = self.param("cls_token", layers.trunc_normal, (1, 1, d), self.param_dtype)
    x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x], axis=1)
    table = lambda *_: jnp.asarray(sinusoid_table(n + 1, d), self.param_dtype)
    pe = jax.lax.stop_gradient(self.param("pos_embed", table, (1, n + 1, d), self.param_dtype))
    x = nn.Dropout(self.dropout_rate)(x + pe.astype(x.dtype), deterministic=not train)
    rates = np.linspace(0.0, self.droppath_rate, self.depth).tolist()
    for i in range(self.depth):
      x = T2TBlock(self.num_heads, int(d * self.mlp_ratio), dropout_rate=self.dropout_rate,
                   attention_dropout_rate=self.attention_dropout_rate, droppath_rate=rates[i],
                   name=f"blocks_{i}", **kw)(x, not train)
    return layers.classifier_head(x, self.num_classes, pool="token", norm_epsilon=1e-5, **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`T2T-ViT-14` -> T2TViT kwargs; None for other names."""
  m = layers.match_variant(name, NAME_RE, VARIANTS, "T2T-ViT", ", ".join(NAMES))
  if not m:
    return None
  d, depth, heads, mlp_ratio = VARIANTS[m["variant"]]
  return dict(embed_dim=d, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
