"""Layers that more than one model family uses: attention, MLP block, stochastic depth, posembs,
and the mixed-precision policy (`dense_kwargs`, `activation_dtype`, `einsum`, `mixed_einsum`).

Parameter names here are the published ones (docs/reference.md, "ViT checkpoint layout"):
attention has `query`, `key`, `value` kernels of shape (D, H, D/H) and `out` of shape (H, D/H, D);
the MLP has `Dense_0`, `Dense_1`.
"""
import functools
import re
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
from flax.linen import kw_only_dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors

Dtype = Any
Initializer = Callable[..., jax.Array]


# ------------------------------------------------------------------ mixed precision.
# `dtype=bfloat16` on a model means: parameters stay float32 (`param_dtype`); every matmul (Dense,
# DenseGeneral, PatchEmbed, the two attention einsums) takes bfloat16 operands and accumulates and
# returns float32; LayerNorm, softmax, GELU, the residual stream and the loss stay float32, and so
# do convolutions (ResNet roots, Swin's patch conv: on the CPUs measured, bf16 convolutions were
# no faster than f32 ones). Why the output type matters: XLA's bf16 dot is fast only when it
# accumulates and returns f32 (`preferred_element_type=float32`), which is also what GPU and TPU
# tensor cores compute; a bf16 result adds a rounding and, on CPU, a slower kernel. And JAX's own
# transpose of such a dot multiplies the f32 cotangent with a bf16 operand (a mixed, slow dot), so
# `mixed_einsum` has its own backward pass that casts the cotangent to bf16 first. Whether bf16
# pays at all depends on the hardware: on a CPU without AVX-512 BF16 XLA emulates bf16 and a bf16
# dot runs at about half the f32 rate (benchmarks/README.md, "Mixed precision"): use float32 there.
# A family adopts the policy with `dense_kwargs(dtype, param_dtype)` for its nn.Dense /
# nn.DenseGeneral, `activation_dtype(dtype)` for its norms, convolutions and inputs, and
# `einsum(spec, a, b, dtype)` for a matmul it writes by hand.
MIXED_DTYPE = jnp.bfloat16


def is_mixed(dtype) -> bool:
  """True when `dtype` asks for mixed precision (bfloat16 matmuls, float32 elsewhere)."""
  return dtype is not None and jnp.dtype(dtype) == jnp.dtype(MIXED_DTYPE)


def activation_dtype(dtype):
  """The dtype of everything that is not a matmul: float32 under mixed precision, else `dtype`."""
  return jnp.float32 if is_mixed(dtype) else dtype


def _check_spec(spec: str):
  """Validates an explicit two-operand einsum spec for `mixed_einsum`; returns (a, b, out)."""
  try:
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
  except ValueError:
    raise errors.ConfigError(
        f"mixed_einsum needs an explicit two-operand spec 'ab,bc->ac', got {spec!r}.")
  for name, s in (("first operand", a), ("second operand", b), ("output", out)):
    if not s.isalpha() or len(set(s)) != len(s):
      raise errors.ConfigError(
          f"mixed_einsum spec {spec!r}: the {name} {s!r} must be distinct letters "
          "(no '...', no repeated index).")
  for s, other in ((a, b + out), (b, a + out), (out, a + b)):
    missing = set(s) - set(other)
    if missing:
      raise errors.ConfigError(
          f"mixed_einsum spec {spec!r}: index {''.join(sorted(missing))} appears in "
          "one term only (a plain sum, not a matmul); sum it before the einsum.")
  return a, b, out


def _lowp_einsum(spec, x, y):
  """bf16 x bf16 -> f32 einsum. A batched one (indices in all three terms) is computed as one
  (X, M, K) x (X, K, N) matmul, X the batch indices flattened. Why not `jnp.einsum` there: XLA:CPU
  (jax 0.10) runs some bf16 -> f32 batched dots, e.g. 'bqhd,bhqk->bkhd' (two batch dimensions,
  not leading), through a kernel that fails at run time ("Unsupported element type for
  DotThunk::Execute: BF16 x BF16 = F32") and upcasts others to f32; the 3-D form runs in bf16
  (checked on the compiled train step by tests/models/test_layers.py)."""
  sx, sy, so = spec.replace("->", ",").split(",")
  batch = [c for c in sx if c in sy and c in so]
  if not batch:  # plain matmuls run in bf16 as they are
    return jnp.einsum(spec, x.astype(MIXED_DTYPE), y.astype(MIXED_DTYPE),
                      preferred_element_type=jnp.float32)
  contract = [c for c in sx if c in sy and c not in so]
  free_x = [c for c in sx if c not in batch + contract]
  free_y = [c for c in sy if c not in batch + contract]
  size = dict(zip(sx, x.shape), **dict(zip(sy, y.shape)))
  n = lambda cs: int(np.prod([size[c] for c in cs], dtype=np.int64))

  x3 = jnp.transpose(x, [sx.index(c) for c in batch + free_x + contract])
  y3 = jnp.transpose(y, [sy.index(c) for c in batch + contract + free_y])
  x3 = x3.reshape(n(batch), n(free_x), n(contract)).astype(MIXED_DTYPE)
  y3 = y3.reshape(n(batch), n(contract), n(free_y)).astype(MIXED_DTYPE)
  out = jax.lax.dot_general(x3, y3, (((2,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)  # (X, M, N)
  out_order = batch + free_x + free_y
  out = out.reshape([size[c] for c in out_order])
  return jnp.transpose(out, [out_order.index(c) for c in so])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a, b):
  """einsum(spec, a, b) with bfloat16 operands, float32 accumulation and a float32 result.

  The backward pass casts the cotangent to bfloat16 and computes both operand gradients as
  bf16 x bf16 -> f32 einsums (cast back to the operands' dtypes), so no dot of the train step
  mixes a float32 and a bfloat16 operand. `spec` is explicit ('bqhd,bkhd->bhqk'), every index in
  at least two of its three terms.
  """
  _check_spec(spec)
  return _lowp_einsum(spec, a, b)


def _mixed_einsum_fwd(spec, a, b):
  _check_spec(spec)
  a16, b16 = a.astype(MIXED_DTYPE), b.astype(MIXED_DTYPE)
  # The zero-size tokens carry the operands' dtypes to the backward pass.
  return (_lowp_einsum(spec, a16, b16),
          (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype)))


def _mixed_einsum_bwd(spec, res, g):
  a16, b16, a_token, b_token = res
  sa, sb, so = _check_spec(spec)
  g16 = g.astype(MIXED_DTYPE)
  da = _lowp_einsum(f"{so},{sb}->{sa}", g16, b16).astype(a_token.dtype)
  db = _lowp_einsum(f"{sa},{so}->{sb}", a16, g16).astype(b_token.dtype)
  return da, db


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def dot_general_spec(lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> str:
  """`lax.dot_general` dimension numbers -> the equivalent einsum spec (output: batch dims, then
  lhs free dims, then rhs free dims, as dot_general orders them)."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(d % n for d in ds) for ds, n in
                    ((lc, lhs_ndim), (rc, rhs_ndim), (lb, lhs_ndim), (rb, rhs_ndim)))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise errors.ConfigError(
        f"dot_general dimension_numbers {dimension_numbers}: contracting and batch "
        "dimensions must pair up between lhs and rhs.")
  letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
  lhs = list(letters[:lhs_ndim])  # the lhs in order; the rhs shares its paired letters
  rhs = [None] * rhs_ndim
  for i, j in zip(lb + lc, rb + rc):
    rhs[j] = lhs[i]
  fresh = iter(letters[lhs_ndim:])
  rhs = [c or next(fresh) for c in rhs]
  batch = [lhs[i] for i in lb]
  lfree = [c for i, c in enumerate(lhs) if i not in lb + lc]
  rfree = [c for j, c in enumerate(rhs) if j not in rb + rc]
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(batch + lfree + rfree)}"


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A `lax.dot_general` replacement for flax's `nn.Dense(dot_general=...)`: bfloat16 operands,
  float32 result, the `mixed_einsum` backward pass. `precision` and `preferred_element_type` are
  accepted for the signature and ignored (the policy fixes both)."""
  del precision, preferred_element_type
  return mixed_einsum(dot_general_spec(lhs.ndim, rhs.ndim, dimension_numbers), lhs, rhs)


def dense_kwargs(dtype, param_dtype=jnp.float32) -> dict:
  """Keyword arguments for nn.Dense / nn.DenseGeneral under the precision policy: unchanged
  (`dtype`, `param_dtype`) for float32 or any non-mixed dtype; for bfloat16, float32 in and out
  with `mixed_dot_general` inside. Parameter names and shapes do not change."""
  if is_mixed(dtype):
    return dict(dtype=jnp.float32, param_dtype=param_dtype, dot_general=mixed_dot_general)
  return dict(dtype=dtype, param_dtype=param_dtype)


def einsum(spec: str, a, b, dtype):
  """A hand-written matmul under the policy: `mixed_einsum` for bfloat16, else a plain einsum of
  the operands cast to `dtype` (float32 unchanged from before the policy)."""
  if is_mixed(dtype):
    return mixed_einsum(spec, a, b)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels, with 1x1 kernels computed as a
  matmul (after striding the input): XLA:CPU's 1x1 convolutions ran fwd+bwd at 1-6 GFLOP/s where
  the same contraction as a dot ran at 8-26 (benchmarks/README.md, "1x1 convolutions"). Anything
  else (other kernels, dilation, groups, padding that adds pixels) goes to lax unchanged. Also
  `nn.Conv(conv_general_dilated=...)`."""
  nhwc_spec = ("NHWC", "HWIO", "NHWC")
  nhwc = lhs.ndim == 4 and dimension_numbers is not None and (
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) ==
      jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, nhwc_spec))
  kh, kw = rhs.shape[:2] if nhwc else (None, None)
  no_pad = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
  plain = ((lhs_dilation is None or tuple(lhs_dilation) == (1, 1)) and
           (rhs_dilation is None or tuple(rhs_dilation) == (1, 1)) and feature_group_count == 1)
  if (kh, kw) == (1, 1) and no_pad and plain:
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return jnp.einsum("bhwc,cd->bhwd", x, rhs[0, 0], precision=precision,
                      preferred_element_type=preferred_element_type)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


class Module(nn.Module):
  """A flax module under the precision policy above: `dtype` (computation: bfloat16 means mixed
  precision) and `param_dtype`, both keyword-only and last in the constructor, so a family's own
  fields keep their positions; `self.kw` for layers that take both as given, `self.norm_kw` for
  norms, convolutions and inputs (`activation_dtype`), `self.dense_kw` for nn.Dense /
  nn.DenseGeneral (`dense_kwargs`)."""
  dtype: Dtype = kw_only_dataclasses.field(default=jnp.float32, kw_only=True)
  param_dtype: Dtype = kw_only_dataclasses.field(default=jnp.float32, kw_only=True)

  @property
  def kw(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def norm_kw(self) -> dict:
    return dict(dtype=activation_dtype(self.dtype), param_dtype=self.param_dtype)

  @property
  def dense_kw(self) -> dict:
    return dense_kwargs(self.dtype, self.param_dtype)


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


# Logical axes of a block's tokens (B, N, D). A no-op unless the trainer sets logical axis rules
# and a mesh (parallel.activation_rules): then the batch stays split over the devices. Without
# it, with parameters sharded over 'fsdp', XLA's sharding propagation gathered the whole batch
# onto every device instead of gathering the weights (ViT-B/16 on 16 TPU chips: 3.5x the
# temporaries; tests/test_plan.py).
TOKENS = ("batch", None, None)


def pre_norm_block(x, attention: Callable, mlp: Callable, *, epsilon: float, dropout_rate: float,
                   droppath_rate: Any, deterministic: bool, dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32, norm_names=("norm1", "norm2")):
  """The pre-LN residual block body: x + DropPath(Dropout(attention(LN(x)))), then
  x + DropPath(mlp(LN(x))). `attention` and `mlp` map (B, N, D) to (B, N, D) and make their own
  (named) modules. Call it inside a block's compact `__call__`: the norms, dropout and drop paths
  are the block's own, so parameter names and dropout streams stay those of the block."""
  norm = lambda name: nn.LayerNorm(epsilon=epsilon, name=name, dtype=activation_dtype(dtype),
                                   param_dtype=param_dtype)
  x = nn.with_logical_constraint(x, TOKENS)
  y = attention(norm(norm_names[0])(x))
  y = nn.Dropout(dropout_rate)(y, deterministic=deterministic)
  x = x + DropPath(droppath_rate)(y, deterministic)
  y = mlp(norm(norm_names[1])(x))
  return x + DropPath(droppath_rate)(y, deterministic)


class MlpBlock(Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  out_dim: Optional[int] = None
  dropout_rate: float = 0.0
  approximate_gelu: bool = True
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    out_dim = self.out_dim or x.shape[-1]
    dense = lambda n, name: nn.Dense(n, kernel_init=self.kernel_init, bias_init=self.bias_init,
                                     name=name, **self.dense_kw)
    x = dense(self.mlp_dim, "Dense_0")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(out_dim, "Dense_1")(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Attention(Module):
  """Multi-head dot-product attention with the published parameter layout.

  Without attention dropout and without anyone asking for the weights, it calls the fused
  `jax.nn.dot_product_attention`; otherwise it computes softmax(q k^T / sqrt(d) + bias) explicitly
  and sows the weights (B, H, Nq, Nk) as `intermediates/attention_weights` when that collection is
  mutable, so researchers can look at attention maps.
  """
  num_heads: int
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, kv=None, *, bias=None, qk_transform: Optional[Callable] = None,
               deterministic: bool = True):
    """x: (B, Nq, D) queries; kv: (B, Nk, D) keys/values (default x); bias: broadcastable to
    (B, H, Nq, Nk), added to the logits before softmax; qk_transform: (q, k) -> (q, k) on the
    projected (B, N, H, D/H) queries and keys before their product (rotary embeddings,
    `rope_2d_axial`). Neither changes the parameters."""
    kv = x if kv is None else kv
    d_model = x.shape[-1]
    if d_model % self.num_heads:
      raise errors.ConfigError(f"width {d_model} is not divisible by num_heads={self.num_heads}")
    head_dim = d_model // self.num_heads
    proj = lambda name, use_bias: nn.DenseGeneral(
        (self.num_heads, head_dim), use_bias=use_bias, kernel_init=self.kernel_init,
        bias_init=self.bias_init, name=name, **self.dense_kw)
    q = proj("query", self.qkv_bias)(x)  # (B, N, H, d)
    k = proj("key", self.qkv_bias)(kv)
    v = proj("value", self.qkv_bias)(kv)
    if qk_transform is not None:
      q, k = qk_transform(q, k)

    want_weights = self.is_mutable_collection("intermediates")
    # Under mixed precision the explicit form too: its two einsums are bf16 x bf16 -> f32 and the
    # softmax stays f32 (the fused call would compute in whatever dtype q has).
    if want_weights or (self.dropout_rate > 0 and not deterministic) or is_mixed(self.dtype):
      logits = einsum("bqhd,bkhd->bhqk", q, k, self.dtype) / jnp.sqrt(head_dim).astype(q.dtype)
      if bias is not None:
        logits = logits + bias.astype(logits.dtype)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(
          activation_dtype(self.dtype))
      self.sow("intermediates", "attention_weights", weights)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      y = einsum("bhqk,bkhd->bqhd", weights, v, self.dtype)
    else:
      y = jax.nn.dot_product_attention(
          q, k, v, bias=None if bias is None else bias.astype(q.dtype))
    return nn.DenseGeneral(d_model, axis=(-2, -1), kernel_init=self.kernel_init,
                           bias_init=self.bias_init, name="out",
                           **self.dense_kw)(y)


class PatchEmbed(Module):
  """Non-overlapping patches -> linear projection; the same parameters as
  `nn.Conv(features, patch, strides=patch, padding="VALID")` (kernel (P, P, C, D), bias (D,)),
  computed as a reshape and one matmul, which is cheaper on CPU than a strided convolution and
  its transpose (the gradient a hybrid's stem needs). Trailing rows/columns that do not fill a
  patch are dropped, as VALID padding does."""
  features: int
  patch_size: Tuple[int, int]
  kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    ph, pw = self.patch_size
    b, h, w, c = x.shape
    gh, gw = h // ph, w // pw
    kernel = self.param("kernel", self.kernel_init, (ph, pw, c, self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x = x[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, c)
    x = einsum("bhpwqc,pqcd->bhwd", x, kernel, self.dtype)
    return x + bias.astype(x.dtype)  # (B, H/P, W/P, D)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """Fixed 2-D sin-cos position embeddings (MoCo v3 / big_vision), shape (1, h*w, width)."""
  if width % 4:
    raise errors.ConfigError(
        f"width {width} must be a multiple of 4 for sincos2d position embeddings")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / (width // 4 - 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


def relative_position_index_2d(h: int, w: int) -> np.ndarray:
  """(h*w, h*w) int index into a relative-position table of (2h-1) x (2w-1) offsets flattened
  row-major: query i at (yi, xi), key j at (yj, xj) -> (yi - yj + h-1) * (2w-1) + (xi - xj + w-1).
  Tokens are the grid in row-major order (BEiT's and Swin's convention, for a non-square grid)."""
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query minus key
  return ((rel[0] + h - 1) * (2 * w - 1) + rel[1] + w - 1).astype(np.int32)


def rope_axial_angles(h: int, w: int, head_dim: int, theta: float = 100.0) -> np.ndarray:
  """Rotation angles (h*w, head_dim/2) of axial 2-D rotary embeddings (RoPE-ViT's "axial",
  Heo et al. 2024): pair t < head_dim/4 turns by column * f_t, pair head_dim/4 + t by row * f_t,
  with f_t = theta^(-4t/head_dim) (theta 100, as RoPE-ViT's axial models)."""
  if head_dim % 4:
    raise errors.ConfigError(
        f"rope2d needs a head dimension divisible by 4 (half for rows, half for columns, in "
        f"pairs), got {head_dim}: choose hidden_size / num_heads divisible by 4.")
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 4)[:head_dim // 4] / head_dim)
  y, x = np.mgrid[:h, :w]
  return np.concatenate([np.outer(x.reshape(-1), freqs), np.outer(y.reshape(-1), freqs)], axis=1)


def apply_rotary(x, angles):
  """Rotates consecutive pairs (x[..., 2t], x[..., 2t+1]) of x (B, N, H, d) by angles (N, d/2)."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None].astype(jnp.float32)
  sin = jnp.sin(angles)[None, :, None].astype(jnp.float32)
  a, b = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def rope_2d_axial(q, k, *, grid: Tuple[int, int], num_prefix_tokens: int = 0,
                  theta: float = 100.0):
  """`Attention`'s qk_transform for axial 2-D RoPE: queries and keys (B, N, H, d) of a token grid
  (row-major, after `num_prefix_tokens` class tokens, which are not rotated). The logit of two
  grid tokens then depends on their positions only through their offset (q R(a)^T R(b) k =
  q R(b - a) k)."""
  angles = rope_axial_angles(*grid, q.shape[-1], theta)
  p = num_prefix_tokens
  if q.shape[1] != p + angles.shape[0]:
    raise errors.ConfigError(
        f"rope2d: {q.shape[1]} tokens, but the grid {tuple(grid)} has {angles.shape[0]} "
        f"plus {p} class token(s).")
  rotate = lambda t: jnp.concatenate([t[:, :p], apply_rotary(t[:, p:], angles)], axis=1)
  return rotate(q), rotate(k)


class MAPHead(Module):
  """Multi-head attention pooling: a learned probe attends over the tokens (big_vision)."""
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    b, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe, [b, 1, 1]).astype(activation_dtype(self.dtype))
    att = Attention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="MultiHeadDotProductAttention_0")
    x = att(probe, x)  # (B, 1, D): the probe queries, the tokens are keys and values
    y = nn.LayerNorm(epsilon=1e-6, dtype=activation_dtype(self.dtype),
                     param_dtype=self.param_dtype, name="LayerNorm_0")(x)
    x = x + MlpBlock(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="MlpBlock_0")(y, deterministic=True)
    return x[:, 0]


class TorchStateDict:
  """Reads a PyTorch (Hugging Face) state dict of numpy arrays into a Flax variable tree.

  Every family's `from_hf_state_dict` uses it, so that the layout rules live in one place:
  Linear (out, in) -> Dense kernel (in, out); Conv OIHW -> HWIO (a depth-wise (C, 1, k, k) becomes
  (k, k, 1, C), the kernel of `nn.Conv(feature_group_count=C)`); LayerNorm weight -> scale;
  BatchNorm weight/bias -> `params`, running_mean/var -> `batch_stats` mean/var; q/k/v/o Linears
  -> the `Attention` layout above ((D, H, d), (H, d), (H, d, D)). `variables()` fails on any key
  that was not read, so a silently dropped weight cannot pass as a conversion. No torch needed.
  """

  def __init__(self, state_dict, *, what: str, strip_prefix: str = "", renames=(), ignore=None):
    """`renames`: (old, new) substring pairs applied to every key (legacy Hub names); `ignore`: a
    compiled regex of keys that carry no weights (buffers such as `num_batches_tracked`)."""
    self.what = what
    self.sd = {}
    for key, value in state_dict.items():
      if strip_prefix and key.startswith(strip_prefix):
        key = key[len(strip_prefix):]
      for old, new in renames:
        key = key.replace(old, new)
      if ignore is None or not ignore.fullmatch(key):
        self.sd[key] = np.asarray(value)
    self.used = set()
    self.tree = {}

  def has(self, key: str) -> bool:
    return key in self.sd

  def take(self, key: str) -> np.ndarray:
    if key not in self.sd:
      raise errors.ConfigError(
          f"The {self.what} state dict lacks {key!r}; does the config match the "
          f"weights? Some keys it has: {sorted(self.sd)[:5]}")
    self.used.add(key)
    return self.sd[key]

  def put(self, path, value, collection: str = "params"):
    node = self.tree.setdefault(collection, {})
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = np.asarray(value)

  def linear(self, src: str, dst):
    self.put(tuple(dst) + ("kernel",), self.take(src + ".weight").T)
    if self.has(src + ".bias"):
      self.put(tuple(dst) + ("bias",), self.take(src + ".bias"))

  def conv(self, src: str, dst):
    self.put(tuple(dst) + ("kernel",), self.take(src + ".weight").transpose(2, 3, 1, 0))
    if self.has(src + ".bias"):
      self.put(tuple(dst) + ("bias",), self.take(src + ".bias"))

  def layer_norm(self, src: str, dst):
    self.put(tuple(dst) + ("scale",), self.take(src + ".weight"))
    self.put(tuple(dst) + ("bias",), self.take(src + ".bias"))

  def batch_norm(self, src: str, dst):
    self.layer_norm(src, dst)
    self.put(tuple(dst) + ("mean",), self.take(src + ".running_mean"), "batch_stats")
    self.put(tuple(dst) + ("var",), self.take(src + ".running_var"), "batch_stats")

  def attention(self, q: str, k: str, v: str, out: str, dst, num_heads: int):
    """Four torch Linears (prefixes) -> `query`/`key`/`value`/`out` of `Attention` under `dst`."""
    dst = tuple(dst)
    for src, name in ((q, "query"), (k, "key"), (v, "value")):
      w = self.take(src + ".weight").T  # (D_in, H * d)
      d_in, width = w.shape
      if width % num_heads:
        raise errors.ConfigError(f"{src}: width {width} is not divisible by num_heads={num_heads}.")
      self.put(dst + (name, "kernel"), w.reshape(d_in, num_heads, width // num_heads))
      if self.has(src + ".bias"):
        self.put(dst + (name, "bias"), self.take(src + ".bias").reshape(num_heads, -1))
    w = self.take(out + ".weight").T  # (H * d, D_out)
    self.put(dst + ("out", "kernel"), w.reshape(num_heads, -1, w.shape[1]))
    self.put(dst + ("out", "bias"), self.take(out + ".bias"))

  def variables(self) -> dict:
    leftover = sorted(set(self.sd) - self.used)
    if leftover:
      raise errors.ConfigError(f"Unconverted keys in the {self.what} state dict: {leftover[:10]}"
                               f"{' ...' if len(leftover) > 10 else ''}")
    return self.tree


_MISSING = object()


def hf_config_get(config, key: str, default=_MISSING):
  """`config.key` for a transformers config object, `config[key]` for a plain mapping (a
  config.json, which may omit fields at their default: pass `default` for those)."""
  if isinstance(config, dict):
    if key in config:
      return config[key]
    if default is not _MISSING:
      return default
    raise errors.ConfigError(
        f"The config lacks {key!r}; pass the transformers config of the weights.")
  return getattr(config, key)


def flat_init(init: Initializer) -> Initializer:
  """`init` sampled over the 2-D view (prod(shape[:-1]), shape[-1]) and reshaped to `shape`.

  Why: XLA:CPU (jax 0.10) takes 10-30 s to compile random sampling over some 3-D and 4-D shapes,
  e.g. a (4, 4, 16, 16) conv kernel or a (16, 16, 16) attention kernel, and well under a second
  over their 2-D view. The distribution is unchanged for element-wise initialisers (normal,
  truncated normal, uniform) and for fan-in scaled ones (lecun, he: fan_in = prod(shape[:-1])
  either way); do not wrap fan-out or fan-avg initialisers (xavier) of N-D kernels.
  """
  def wrapped(key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    if len(shape) <= 2:
      return init(key, shape, dtype)
    return init(key, (int(np.prod(shape[:-1])), shape[-1]), dtype).reshape(shape)
  return wrapped


# Truncated normal(0.02): the Dense, token and table initialiser of the timm-style families (Swin,
# PVT, CvT, T2T), sampled over 2-D views (the same values as the plain initialiser, faster to
# compile).
trunc_normal = flat_init(nn.initializers.truncated_normal(stddev=0.02))


def classifier_head(x, num_classes: int, *, pool: Optional[str] = None,
                    norm_epsilon: Optional[float] = None, kernel_init: Initializer = trunc_normal,
                    bias_init: Initializer = nn.initializers.zeros, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32) -> jax.Array:
  """The tail every classifier here shares: [final LayerNorm `norm`] -> pooling -> Dense `head`.

  Call it inside the model's compact `__call__`: the layers it makes are the model's own, so the
  parameters keep their top-level names `norm` and `head` (checkpoints and the Hugging Face
  converters read them). `pool`: "token" takes the first token of (B, N, D), and before the norm
  (a LayerNorm is per token, so the numbers are the same and the other tokens are not
  normalised for nothing); "mean" averages every axis between batch and channels, after the
  norm; None takes `x` as pooled. `norm_epsilon=None`: no norm (the model has normalised).
  Returns float32 logits (B, num_classes), or with `num_classes=0` the float32 pre-logits.
  """
  if pool == "token":
    x = x[:, 0]
  elif pool not in ("mean", None):
    raise errors.ConfigError(f"Unknown pool {pool!r}: use 'token', 'mean' or None.")
  if norm_epsilon is not None:
    x = nn.LayerNorm(epsilon=norm_epsilon, name="norm", dtype=activation_dtype(dtype),
                     param_dtype=param_dtype)(x)
  if pool == "mean":
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
  if num_classes:
    x = nn.Dense(num_classes, kernel_init=kernel_init, bias_init=bias_init, name="head",
                 **dense_kwargs(dtype, param_dtype))(x)
  return x.astype(jnp.float32)


def match_variant(name: str, name_re: re.Pattern, variants, family: str,
                  known: str) -> Optional[re.Match]:
  """`name_re.match(name)` for a family's `config_from_name`: None when the name is not the
  family's; a ValueError naming the `known` ones when it is, but its `variant` group is not a key
  of `variants`."""
  m = name_re.match(name)
  if m and m["variant"] not in variants:
    raise errors.ConfigError(
        f"Unknown {family} variant {m['variant']!r} in {name!r}; known: {known}.")
  return m


# ------------------------------------------------------------------ local and axial attention.
# Shared by the stand-alone self-attention ResNets (sasa.py: k x k windows) and the Axial-ResNets
# (axial.py: whole rows and columns), which both look relative-position embeddings up by offset
# and both start from a BatchNorm ResNet root.
def relative_index(query_pos, key_pos, max_distance: int) -> np.ndarray:
  """Rows of a relative-position table of 2 * max_distance + 1 embeddings, one per offset from
  -max_distance to +max_distance: index[i, j] = key_pos[j] - query_pos[i] + max_distance, shape
  (len(query_pos), len(key_pos)). An offset beyond max_distance is a ConfigError."""
  offsets = np.asarray(key_pos)[None, :] - np.asarray(query_pos)[:, None]
  if offsets.size and np.abs(offsets).max() > max_distance:
    raise errors.ConfigError(
        f"relative offset {int(np.abs(offsets).max())} is beyond the table's "
        f"{2 * max_distance + 1} offsets (max_distance {max_distance}).")
  return offsets + max_distance


def check_window(window: int):
  """A local attention window is centred on its pixel: a positive odd size."""
  if window < 1 or window % 2 == 0:
    raise errors.ConfigError(f"window={window}: a local window must be a positive odd size "
                             "(centred on its pixel), e.g. 7.")


def local_windows(x, window: int):
  """The window x window neighbourhood of every pixel, centred on it, as window**2 shifted copies
  of `x`: ([x shifted by offset (a - r, b - r) for a, b in range(window)], valid) with r =
  window // 2, each (B, H, W, C) (entry [i, j] of copy (a, b) is pixel (i + a - r, j + b - r)),
  row-major over (a, b), and valid (H, W, window, window) bool. Neighbours outside the image are
  zeros and `valid` is False there (attention masks them out). `window` must be odd.

  Shifted copies rather than one (B, H, W, window, window, C) stack: a consumer that reduces each
  copy at once (a dot product per offset) lets XLA fuse the slice into it, and never holds
  window**2 copies of the feature map (7x7 windows: 49x its memory)."""
  check_window(window)
  r = window // 2
  _, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  shifted = [xp[:, a:a + h, b:b + w] for a in range(window) for b in range(window)]
  ii = np.arange(h)[:, None] + np.arange(window)[None, :] - r  # (H, k): the neighbour's row
  jj = np.arange(w)[:, None] + np.arange(window)[None, :] - r
  valid = (((ii >= 0) & (ii < h))[:, None, :, None] & ((jj >= 0) & (jj < w))[None, :, None, :])
  return shifted, valid


# The ResNet roots of the BatchNorm families (sasa.py, axial.py).
BN_ROOTS = {
    "imagenet": "7x7/2 conv, BatchNorm, relu and 3x3/2 max-pool: output stride 4 (the papers')",
    "small": "3x3/1 conv, BatchNorm and relu, no pool: output stride 1 (28-64 px images)",
}


def conv_and_bn(*, train: bool, bn_axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32):
  """(conv, bn) partials of the BatchNorm ResNets (sasa.py, axial.py): bias-free convolutions
  (He-normal over the flattened fan-in) and BatchNorm (momentum 0.9, eps 1e-5), both computing in
  the activation dtype of `dtype`."""
  act = activation_dtype(dtype)
  conv = functools.partial(nn.Conv, use_bias=False,
                           kernel_init=flat_init(nn.initializers.he_normal()), dtype=act,
                           param_dtype=param_dtype)
  bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, axis_name=bn_axis_name, dtype=act,
                         param_dtype=param_dtype)
  return conv, bn


def bn_conv_root(x, width: int, root: str, *, train: bool, bn_axis_name: Optional[str] = None,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
  """A torchvision-style ResNet root in the caller's compact scope: `conv_root` (no bias) and
  `bn_root` (BatchNorm, momentum 0.9, eps 1e-5), relu, then for `imagenet` the 3x3/2 max-pool."""
  if root not in BN_ROOTS:
    raise errors.ConfigError(f"Unknown ResNet root {root!r}; known: "
                             + "; ".join(f"{k!r} ({v})" for k, v in BN_ROOTS.items()) + ".")
  big = root == "imagenet"
  conv, bn = conv_and_bn(train=train, bn_axis_name=bn_axis_name, dtype=dtype,
                         param_dtype=param_dtype)
  x = conv(width, (7, 7) if big else (3, 3), strides=2 if big else 1,
           padding=3 if big else 1, name="conv_root")(x)
  x = bn(name="bn_root")(x)
  x = nn.relu(x)
  if big:
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  return x


class UnitStage(nn.Module):
  """A ResNet stage of the BatchNorm families (sasa.py, axial.py): units `unit1`, `unit2`, ...,
  where `unit(u)` gives unit u's module class with its arguments bound (a functools.partial;
  unit 0 carries the stage's stride). Called as `stage(x, train)`."""
  num_units: int
  unit: Callable[[int], Callable[..., nn.Module]]

  @nn.compact
  def __call__(self, x, train: bool):
    for u in range(self.num_units):
      x = self.unit(u)(name=f"unit{u + 1}")(x, train)
    return x


def bn_resnet_classifier(images, *, family: str, num_layers, base_width: int, root: str,
                         num_classes: int, train: bool, stage: Callable[[int, int], nn.Module],
                         bn_axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
                         param_dtype: Dtype = jnp.float32):
  """The conv-stem classifier of the BatchNorm ResNets, in the caller's compact scope: checks,
  `bn_conv_root`, `stage(s, num_units)(x, train)` for every stage s (named `block{s + 1}` by the
  caller's `stage`), global average pool, zero-init `head` (`num_classes=0`: the pooled
  features)."""
  if images.ndim != 4:
    raise errors.ConfigError(f"images must be (B, H, W, C); got shape {images.shape}.")
  num_layers = tuple(int(n) for n in num_layers)
  if not num_layers or any(n < 1 for n in num_layers):
    raise errors.ConfigError(f"{family} num_layers={num_layers}: needs at least one stage "
                             "and at least one unit per stage.")
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  x = bn_conv_root(images.astype(activation_dtype(dtype)), base_width, root, train=train,
                   bn_axis_name=bn_axis_name, **kw)
  for s, n in enumerate(num_layers):
    x = stage(s, n)(x, train)
  x = jnp.mean(x, axis=(1, 2))  # (B, C)
  return classifier_head(x, num_classes, kernel_init=nn.initializers.zeros, **kw)
