"""Layers that more than one model family uses: attention, MLP block, stochastic depth, posembs.

Parameter names here are the published ones (docs/reference.md, "ViT checkpoint layout"):
attention has `query`, `key`, `value` kernels of shape (D, H, D/H) and `out` of shape (H, D/H, D);
the MLP has `Dense_0`, `Dense_1`.
"""
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example with probability `rate`.

  `rate` may be a traced scalar (a scanned encoder computes it from the layer index).
  """
  rate: Any = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
      return x
    keep = 1.0 - jnp.asarray(self.rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  out_dim: Optional[int] = None
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    out_dim = self.out_dim or x.shape[-1]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                                     name=name)
    x = dense(self.mlp_dim, "Dense_0")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, "Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Attention(nn.Module):
  """Multi-head dot-product attention with the published parameter layout.

  Without attention dropout and without anyone asking for the weights, it calls the fused
  `jax.nn.dot_product_attention`; otherwise it computes softmax(q k^T / sqrt(d) + bias) explicitly
  and sows the weights (B, H, Nq, Nk) as `intermediates/attention_weights` when that collection is
  mutable, so researchers can look at attention maps.
  """
  num_heads: int
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, kv=None, *, bias=None, deterministic: bool = True):
    """x: (B, Nq, D) queries; kv: (B, Nk, D) keys/values (default x); bias: broadcastable to
    (B, H, Nq, Nk), added to the logits before softmax."""
    kv = x if kv is None else kv
    d_model = x.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"width {d_model} is not divisible by num_heads={self.num_heads}")
    head_dim = d_model // self.num_heads
    proj = lambda name, use_bias: nn.DenseGeneral(
        (self.num_heads, head_dim), use_bias=use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
        name=name)
    q = proj("query", self.qkv_bias)(x)  # (B, N, H, d)
    k = proj("key", self.qkv_bias)(kv)
    v = proj("value", self.qkv_bias)(kv)

    want_weights = self.is_mutable_collection("intermediates")
    if want_weights or (self.dropout_rate > 0 and not deterministic):
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
      if bias is not None:
        logits = logits + bias.astype(logits.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
      self.sow("intermediates", "attention_weights", weights)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    else:
      y = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype))
    return nn.DenseGeneral(d_model, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           bias_init=self.bias_init, name="out")(y)


class PatchEmbed(nn.Module):
  """Non-overlapping patches -> linear projection; the same parameters as
  `nn.Conv(features, patch, strides=patch, padding="VALID")` (kernel (P, P, C, D), bias (D,)),
  computed as a reshape and one matmul, which is cheaper on CPU than a strided convolution and
  its transpose (the gradient a hybrid's stem needs). Trailing rows/columns that do not fill a
  patch are dropped, as VALID padding does."""
  features: int
  patch_size: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = self.patch_size
    b, h, w, c = x.shape
    gh, gw = h // ph, w // pw
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (ph, pw, c, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x.astype(self.dtype), kernel.astype(self.dtype))
    return x + bias.astype(self.dtype)  # (B, H/P, W/P, D)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embeddings (MoCo v3 / big_vision), shape (1, h*w, width)."""
  if width % 4:
    raise ValueError(f"width {width} must be a multiple of 4 for sincos2d position embeddings")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens (big_vision)."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe, [b, 1, 1]).astype(self.dtype)
    att = Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="MultiHeadDotProductAttention_0")
    x = att(probe, x)  # (B, 1, D): the probe queries, the tokens are keys and values
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm_0")(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="MlpBlock_0")(y, deterministic=True)
    return x[:, 0]
