"""CvT, the Convolutional vision Transformer (Wu et al., 2021).

Three stages. Each starts with a convolutional token embedding (a strided, padded conv: kernel
7/3/3, stride 4/2/2, padding 2/1/1, then LayerNorm) and runs pre-LN blocks whose attention takes
queries, keys and values from convolutional projections of the token map: a 3x3 depth-wise conv
without bias + BatchNorm (stride 1 for queries, 2 for keys and values), then a Dense layer. Only
the last stage has a cls token, which bypasses the convolutions and is prepended to q, k and v.
No position embeddings. The attention scale is width**-0.5 of the full stage width (not of a
head's), as in the official code and HF's. The MLP uses the exact (erf) GELU, as torch's
`nn.GELU()` in both reference implementations; LayerNorm epsilon 1e-5 everywhere. The head reads
the final LayerNorm of the cls token.

BatchNorm: `nn.BatchNorm(use_running_average=not train)` in the collection `batch_stats`
(momentum 0.9 = torch's 0.1, epsilon 1e-5). `model.init` returns {'params', 'batch_stats'};
training calls `apply(variables, x, train=True, mutable=['batch_stats'])`; evaluation uses the
running averages. Under `jit` with a sharded batch the statistics are over the global batch;
under `pmap` set `bn_axis_name` to the mapped axis to average them across devices.

Parameter tree (`i` stage, `j` block):

    stage_{i}/embed/{proj (conv), norm}        stage_2/cls_token (1, 1, C)
    stage_{i}/block_{j}/{norm1, norm2, mlp/{Dense_0, Dense_1}}
    stage_{i}/block_{j}/attn/conv_proj_{q,k,v}/{conv (3, 3, 1, C), bn/{scale, bias}}
    stage_{i}/block_{j}/attn/{query, key, value}/kernel (C, H, C/H), out/kernel (H, C/H, C)
    norm, head
    batch_stats: stage_{i}/block_{j}/attn/conv_proj_{q,k,v}/bn/{mean, var}

Stochastic depth: in stage i, linspace(0, rate_i, depth_i) over its blocks with rates
(0, 0, droppath_rate), as the official configs (HF applies the stage's first rate to every block;
evaluation is the same).
"""
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


# name -> (embed dims, depths, heads): the official configs (HF's microsoft/cvt-13, -21, -w24).
VARIANTS = {
    "13": ((64, 192, 384), (1, 2, 10), (1, 3, 6)),
    "21": ((64, 192, 384), (1, 4, 16), (1, 3, 6)),
    "W24": ((192, 768, 1024), (2, 2, 20), (3, 12, 16)),
}
DROPPATH = {"13": 0.1, "21": 0.1}  # official configs' last-stage rate; W24's is not set here
NAMES = tuple(f"CvT-{v}" for v in VARIANTS)
NAME_RE = re.compile(r"^CvT-(?P<variant>[A-Za-z0-9]+)$")

class ConvProjection(layers.Module):
  """3x3 depth-wise conv (no bias), then BatchNorm; (B, H, W, C) -> (B, H', W', C)."""
  stride: int
  kernel_size: int = 3
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    c, k = x.shape[-1], self.kernel_size
    x = nn.Conv(c, (k, k), strides=(self.stride,) * 2, padding=((k // 2, k // 2),) * 2,
                feature_group_count=c, use_bias=False, kernel_init=layers.trunc_normal, name="conv",
                **self.kw)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=self.bn_axis_name, name="bn",
                        dtype=layers.activation_dtype(self.dtype),
                        param_dtype=self.param_dtype)(x)


class ConvAttention(layers.Module):
  """Multi-head attention over convolutional projections; x is (B, [1 +] h*w, C)."""
  num_heads: int
  with_cls: bool = False
  stride_q: int = 1
  stride_kv: int = 2
  kernel_size: int = 3
  qkv_bias: bool = True
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, h: int, w: int, train: bool):
    b, n, c = x.shape
    if c % self.num_heads:
      raise errors.ConfigError(f"width {c} is not divisible by num_heads={self.num_heads}")
    kw = self.kw
    dkw = self.dense_kw
    cls, x = (x[:, :1], x[:, 1:]) if self.with_cls else (None, x)
    grid = x.reshape(b, h, w, c)
    qkv = {}
    for name, stride in (("q", self.stride_q), ("k", self.stride_kv), ("v", self.stride_kv)):
      t = ConvProjection(stride, self.kernel_size, self.bn_axis_name, name=f"conv_proj_{name}",
                         **kw)(grid, train)
      t = t.reshape(b, -1, c)
      qkv[name] = jnp.concatenate([cls, t], axis=1) if self.with_cls else t
    heads, d = self.num_heads, c // self.num_heads
    proj = lambda name, use_bias: nn.DenseGeneral((heads, d), use_bias=use_bias,
                                                  kernel_init=layers.trunc_normal, name=name, **dkw)
    q = proj("query", self.qkv_bias)(qkv["q"])  # (B, Nq, H, d)
    k = proj("key", self.qkv_bias)(qkv["k"])
    v = proj("value", self.qkv_bias)(qkv["v"])
    y = jax.nn.dot_product_attention(q, k, v, scale=float(c) ** -0.5)  # full-width scale
    return nn.DenseGeneral(c, axis=(-2, -1), kernel_init=layers.trunc_normal, name="out", **dkw)(y)


class CvTBlock(layers.Module):
  """x + DropPath(ConvAttention(LN(x))), then x + DropPath(MLP(LN(x)))."""
  num_heads: int
  mlp_ratio: float = 4.0
  with_cls: bool = False
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, h: int, w: int, train: bool):
    kw = self.kw
    attention = ConvAttention(self.num_heads, with_cls=self.with_cls, qkv_bias=self.qkv_bias,
                              bn_axis_name=self.bn_axis_name, name="attn", **kw)
    mlp = layers.MlpBlock(int(x.shape[-1] * self.mlp_ratio), dropout_rate=self.dropout_rate,
                          approximate_gelu=False, kernel_init=layers.trunc_normal,
                          bias_init=nn.initializers.zeros, name="mlp", **kw)
    return layers.pre_norm_block(
        x, lambda y: attention(y, h, w, train), lambda y: mlp(y, deterministic=not train),
        epsilon=1e-5, dropout_rate=self.dropout_rate, droppath_rate=self.droppath_rate,
        deterministic=not train, **kw)


class ConvEmbed(layers.Module):
  """Convolutional token embedding: a strided, padded conv, then LayerNorm (B, H', W', C)."""
  features: int
  patch_size: int
  stride: int
  padding: int

  @nn.compact
  def __call__(self, x):
    kw = self.kw
    nkw = self.norm_kw
    k, p = self.patch_size, self.padding
    x = nn.Conv(self.features, (k, k), strides=(self.stride,) * 2, padding=((p, p), (p, p)),
                kernel_init=layers.trunc_normal, name="proj", **kw)(x)
    return nn.LayerNorm(epsilon=1e-5, name="norm", **nkw)(x)


class CvTStage(layers.Module):
  """Token embedding, [cls token], `depth` blocks; (B, H, W, Cin) -> (B, [1 +] h*w, C), h, w."""
  features: int
  depth: int
  num_heads: int
  patch_size: int
  stride: int
  padding: int
  droppath_rates: Sequence[float]
  with_cls: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    kw = self.kw
    in_h, in_w = x.shape[1:3]
    x = ConvEmbed(self.features, self.patch_size, self.stride, self.padding, name="embed",
                  **kw)(x)
    b, h, w, c = x.shape
    if h < 1 or w < 1:
      raise errors.ConfigError(
          f"{self.name}: a {in_h}x{in_w} map gives no tokens; use a larger input "
          f"or smaller patch_sizes/patch_strides.")
    x = nn.Dropout(self.dropout_rate)(x.reshape(b, h * w, c), deterministic=not train)
    if self.with_cls:
      cls = self.param("cls_token", layers.trunc_normal, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x], axis=1)
    for j in range(self.depth):
      x = CvTBlock(self.num_heads, self.mlp_ratio, with_cls=self.with_cls,
                   qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
                   droppath_rate=self.droppath_rates[j], bn_axis_name=self.bn_axis_name,
                   name=f"block_{j}", **kw)(x, h, w, train)
    return x, h, w


class ConvolutionalVisionTransformer(layers.Module):
  """CvT classifier (see the module docstring). `num_classes=0` returns the normalised cls token."""
  num_classes: int = 1000
  embed_dims: Sequence[int] = (64, 192, 384)
  depths: Sequence[int] = (1, 2, 10)
  num_heads: Sequence[int] = (1, 3, 6)
  patch_sizes: Sequence[int] = (7, 3, 3)
  patch_strides: Sequence[int] = (4, 2, 2)
  patch_paddings: Sequence[int] = (2, 1, 1)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  droppath_rate: float = 0.0  # the last stage's; earlier stages have none (official configs)
  bn_axis_name: Optional[str] = None  # the pmap axis to average BatchNorm statistics over

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4:
      raise errors.ConfigError(f"images must be (B, H, W, C); got shape {images.shape}.")
    per_stage = dict(embed_dims=self.embed_dims, depths=self.depths, num_heads=self.num_heads,
                     patch_sizes=self.patch_sizes, patch_strides=self.patch_strides,
                     patch_paddings=self.patch_paddings)
    n_stages = len(self.depths)
    bad = {k: len(v) for k, v in per_stage.items() if len(v) != n_stages}
    if bad:
      raise errors.ConfigError(
          f"per-stage settings must all have {n_stages} entries (len(depths)); "
          f"got {bad}.")
    kw = self.kw
    x = images.astype(layers.activation_dtype(self.dtype))
    for i in range(n_stages):
      last = i == n_stages - 1
      rates = np.linspace(0.0, self.droppath_rate if last else 0.0, self.depths[i]).tolist()
      x, h, w = CvTStage(self.embed_dims[i], self.depths[i], self.num_heads[i],
                         self.patch_sizes[i], self.patch_strides[i], self.patch_paddings[i],
                         tuple(rates), with_cls=last, mlp_ratio=self.mlp_ratio,
                         qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
                         bn_axis_name=self.bn_axis_name, name=f"stage_{i}", **kw)(x, train)
      if not last:
        x = x.reshape(x.shape[0], h, w, -1)
    return layers.classifier_head(x, self.num_classes, pool="token", norm_epsilon=1e-5, **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`CvT-13`, `CvT-21`, `CvT-W24` -> ConvolutionalVisionTransformer kwargs; None otherwise."""
  m = layers.match_variant(name, NAME_RE, VARIANTS, "CvT", ", ".join(NAMES))
  if not m:
    return None
  dims, depths, heads = VARIANTS[m["variant"]]
  return dict(embed_dims=dims, depths=depths, num_heads=heads,
              droppath_rate=DROPPATH.get(m["variant"], 0.0))


# ------------------------------------------------------------------ Hugging Face import.
def model_kwargs_from_hf(config) -> dict:
  """ConvolutionalVisionTransformer kwargs matching a transformers `CvtConfig`. Raises on the
  settings this implementation fixes (cls token only in the last stage, 3x3 dw_bn projections
  with padding 1, q stride 1, one mlp ratio and qkv bias for all stages)."""
  get = lambda k: list(layers.hf_config_get(config, k))
  n = len(get("depth"))
  fixed = dict(cls_token=[False] * (n - 1) + [True], qkv_projection_method=["dw_bn"] * n,
               kernel_qkv=[3] * n, padding_kv=[1] * n, padding_q=[1] * n, stride_q=[1] * n,
               stride_kv=[2] * n)
  for key, want in fixed.items():
    if get(key) != want:
      raise errors.ConfigError(f"CvtConfig.{key}={get(key)} is not supported (only {want}).")
  for key in ("mlp_ratio", "qkv_bias"):
    if len(set(get(key))) != 1:
      raise errors.ConfigError(f"CvtConfig.{key} must be the same in every stage, got {get(key)}.")
  return dict(num_classes=layers.hf_config_get(config, "num_labels"),
              embed_dims=tuple(get("embed_dim")), depths=tuple(get("depth")),
              num_heads=tuple(get("num_heads")), patch_sizes=tuple(get("patch_sizes")),
              patch_strides=tuple(get("patch_stride")),
              patch_paddings=tuple(get("patch_padding")), mlp_ratio=get("mlp_ratio")[0],
              qkv_bias=get("qkv_bias")[0])


def from_hf_state_dict(state_dict: Mapping[str, Any], config) -> dict:
  """Variables {'params', 'batch_stats'} from the state dict (numpy arrays) of HF's
  `CvtForImageClassification`; `config` is its `CvtConfig` (or a dict of its fields). The model
  to load into is `ConvolutionalVisionTransformer(**model_kwargs_from_hf(config))`."""
  kwargs = model_kwargs_from_hf(config)
  sd = layers.TorchStateDict(state_dict, what="CvT",
                             ignore=re.compile(r".*num_batches_tracked"))
  n = len(kwargs["depths"])
  for i, depth in enumerate(kwargs["depths"]):
    src, dst = f"cvt.encoder.stages.{i}", (f"stage_{i}",)
    emb = src + ".embedding.convolution_embeddings"
    sd.conv(emb + ".projection", dst + ("embed", "proj"))
    sd.layer_norm(emb + ".normalization", dst + ("embed", "norm"))
    if i == n - 1:
      sd.put(dst + ("cls_token",), sd.take(src + ".cls_token"))
    for j in range(depth):
      s, d = f"{src}.layers.{j}", dst + (f"block_{j}",)
      att = s + ".attention.attention"
      for name, full in (("q", "query"), ("k", "key"), ("v", "value")):
        conv = f"{att}.convolution_projection_{full}.convolution_projection"
        sd.conv(conv + ".convolution", d + ("attn", f"conv_proj_{name}", "conv"))
        sd.batch_norm(conv + ".normalization", d + ("attn", f"conv_proj_{name}", "bn"))
      sd.attention(att + ".projection_query", att + ".projection_key",
                   att + ".projection_value", s + ".attention.output.dense", d + ("attn",),
                   kwargs["num_heads"][i])
      sd.layer_norm(s + ".layernorm_before", d + ("norm1",))
      sd.layer_norm(s + ".layernorm_after", d + ("norm2",))
      sd.linear(s + ".intermediate.dense", d + ("mlp", "Dense_0"))
      sd.linear(s + ".output.dense", d + ("mlp", "Dense_1"))
  sd.layer_norm("layernorm", ("norm",))
  if sd.has("classifier.weight"):
    sd.linear("classifier", ("head",))
  return sd.variables()
