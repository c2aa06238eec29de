"""Pyramid Vision Transformer, v1 (Wang et al., 2021) and v2 (Wang et al., 2022), in one module.

Four stages, each a patch embedding (a strided conv + LayerNorm) that shrinks the map, then
pre-LN blocks whose attention is spatial-reduction attention (SRA): queries from every token, keys
and values from the map reduced by a `sr x sr` stride-`sr` conv + LayerNorm (no reduction where
sr = 1). Exact erf GELU; LayerNorm epsilon 1e-6 everywhere (as HF's configs build it; the
official v1 code uses 1e-5 in the patch embedding and the reduction, a difference far below the
1e-4 parity tolerance).

- v1 (`version=1`): non-overlapping patch embeddings (kernel = stride), a learned position
  embedding per stage (its shape follows the input grid at `init`), a cls token in the last stage,
  a final LayerNorm and the head on the cls token.
- v2 (`version=2`): overlapping patch embeddings (kernel 7/3, stride 4/2, padding kernel // 2),
  no position embeddings; the MLP has a 3x3 depth-wise conv between its Dense layers (position
  information by zero padding); a LayerNorm closes each stage; the head reads the mean token.
  `linear_attention=True` (PVTv2-B2-Li) replaces the reduction by adaptive average pooling to 7x7,
  a 1x1 conv, LayerNorm and GELU, and adds a ReLU after the MLP's first Dense.

Parameter tree (`i` stage, `j` block):

    stage_{i}/patch_embed/{proj (conv), norm}
    stage_{i}/pos_embed (1, N[+1], C), stage_{3}/cls_token (1, 1, C)          v1 only
    stage_{i}/block_{j}/{norm1, norm2}
    stage_{i}/block_{j}/attn/{query, key, value, out}                         layers.Attention
    stage_{i}/block_{j}/attn/{sr (conv), sr_norm}                             where reduced
    stage_{i}/block_{j}/mlp/{Dense_0, dwconv (v2, depth-wise), Dense_1}
    stage_{i}/norm (v2)    norm (v1)    head

Stochastic depth: linspace(0, droppath_rate, sum(depths)) over all blocks, both residual branches.
Small inputs: every stage's map and every reduced map must be at least 1x1 (e.g. 28x28 works with
`patch_sizes=(2, 2, 2, 2)`, `strides=(2, 2, 2, 2)`, `sr_ratios=(4, 2, 1, 1)` for v1); a clear
error says which stage is too small.
"""
import math
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers


_V1_DEPTHS = {"Tiny": (2, 2, 2, 2), "Small": (3, 4, 6, 3), "Medium": (3, 4, 18, 3),
              "Large": (3, 8, 27, 3)}
# name -> (hidden sizes, depths, mlp ratios); all share heads (1, 2, 5, 8) and sr (8, 4, 2, 1).
_V2 = {
    "B0": ((32, 64, 160, 256), (2, 2, 2, 2), (8, 8, 4, 4)),
    "B1": ((64, 128, 320, 512), (2, 2, 2, 2), (8, 8, 4, 4)),
    "B2": ((64, 128, 320, 512), (3, 4, 6, 3), (8, 8, 4, 4)),
    "B3": ((64, 128, 320, 512), (3, 4, 18, 3), (8, 8, 4, 4)),
    "B4": ((64, 128, 320, 512), (3, 8, 27, 3), (8, 8, 4, 4)),
    "B5": ((64, 128, 320, 512), (3, 6, 40, 3), (4, 4, 4, 4)),
}
NAMES = (tuple(f"PVT-{v}" for v in _V1_DEPTHS) + tuple(f"PVTv2-{v}" for v in _V2)
         + ("PVTv2-B2-Li",))
NAME_RE = re.compile(r"^PVT(?P<v2>v2)?-(?P<variant>[A-Za-z0-9]+?)(?P<li>-Li)?$")


def _conv_init(groups: int = 1):
  """The PVT v2 conv initialisation: normal(0, sqrt(2 / fan_out)), fan_out = k*k*out / groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    std = math.sqrt(2.0 / (kh * kw * out // groups))
    return layers.flat_init(nn.initializers.normal(std))(key, shape, dtype)
  return init


def adaptive_avg_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) averaging weights of torch's AdaptiveAvgPool over one axis: output i averages
  inputs [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))."""
  m = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


class SpatialReductionAttention(layers.Module):
  """layers.Attention whose keys/values come from a reduced map; shares its scope with it, so
  `query`/`key`/`value`/`out` and `sr`/`sr_norm` are siblings under `attn/`."""
  num_heads: int
  sr_ratio: int = 1
  linear: bool = False
  qkv_bias: bool = True
  layernorm_eps: float = 1e-6
  dropout_rate: float = 0.0

  def setup(self):
    self.attention = layers.Attention(
        self.num_heads, qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=layers.trunc_normal,
        bias_init=nn.initializers.zeros)
    nn.share_scope(self, self.attention)

  @nn.compact
  def __call__(self, x, h: int, w: int, *, deterministic: bool):
    """x: (B, [1 +] h*w, C); a leading cls token (v1's last stage) needs sr_ratio = 1."""
    b, n, c = x.shape
    kw = self.kw
    nkw = self.norm_kw
    if not self.linear and self.sr_ratio == 1:
      return self.attention(x, deterministic=deterministic)
    if n != h * w:
      raise errors.ConfigError(
          f"spatial reduction needs exactly {h}x{w} tokens (no cls token); got {n}.")
    kv = x.reshape(b, h, w, c)
    if self.linear:
      ph, pw = adaptive_avg_pool_matrix(h, 7), adaptive_avg_pool_matrix(w, 7)
      kv = jnp.einsum("ih,bhwc,jw->bijc", ph.astype(kv.dtype), kv, pw.astype(kv.dtype))
      kv = nn.Conv(c, (1, 1), kernel_init=_conv_init(), name="sr",
                   conv_general_dilated=layers.conv_general_dilated, **kw)(kv)
    else:
      if min(h, w) < self.sr_ratio:
        raise errors.ConfigError(
            f"a {h}x{w} map is smaller than the spatial reduction {self.sr_ratio}; "
            f"use a larger input or smaller sr_ratios.")
      # A stride-sr sr x sr conv: layers.PatchEmbed has its parameters and is cheaper on CPU.
      kv = layers.PatchEmbed(c, (self.sr_ratio,) * 2, kernel_init=layers.trunc_normal, name="sr",
                             **kw)(kv)
    kv = nn.LayerNorm(epsilon=self.layernorm_eps, name="sr_norm", **nkw)(
        kv.reshape(b, -1, c))
    if self.linear:
      kv = nn.gelu(kv, approximate=False)
    return self.attention(x, kv, deterministic=deterministic)


class ConvMlp(layers.Module):
  """PVT v2's MLP: Dense -> [ReLU, linear variant] -> 3x3 depth-wise conv -> GELU -> Dense."""
  mlp_dim: int
  linear: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, h: int, w: int, *, deterministic: bool):
    kw = self.kw
    dkw = self.dense_kw
    b, _, c = x.shape
    y = nn.Dense(self.mlp_dim, kernel_init=layers.trunc_normal, name="Dense_0", **dkw)(x)
    if self.linear:
      y = nn.relu(y)
    y = nn.Conv(self.mlp_dim, (3, 3), padding=((1, 1), (1, 1)),
                feature_group_count=self.mlp_dim, kernel_init=_conv_init(self.mlp_dim),
                name="dwconv", **kw)(y.reshape(b, h, w, self.mlp_dim))
    y = nn.gelu(y.reshape(b, h * w, self.mlp_dim), approximate=False)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = nn.Dense(c, kernel_init=layers.trunc_normal, name="Dense_1", **dkw)(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class PVTBlock(layers.Module):
  """x + DropPath(SRA(LN(x))), then x + DropPath(MLP(LN(x))); x is (B, [1 +] h*w, C)."""
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  version: int
  linear: bool = False
  qkv_bias: bool = True
  layernorm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0

  @nn.compact
  def __call__(self, x, h: int, w: int, deterministic: bool):
    kw = self.kw
    attention = SpatialReductionAttention(
        self.num_heads, self.sr_ratio, linear=self.linear, qkv_bias=self.qkv_bias,
        layernorm_eps=self.layernorm_eps, dropout_rate=self.attention_dropout_rate, name="attn",
        **kw)
    mlp_dim = int(x.shape[-1] * self.mlp_ratio)
    if self.version == 1:
      mlp = layers.MlpBlock(mlp_dim, dropout_rate=self.dropout_rate, approximate_gelu=False,
                            kernel_init=layers.trunc_normal, bias_init=nn.initializers.zeros,
                            name="mlp", **kw)
      mlp_fn = lambda y: mlp(y, deterministic=deterministic)
    else:
      mlp = ConvMlp(mlp_dim, linear=self.linear, dropout_rate=self.dropout_rate, name="mlp", **kw)
      mlp_fn = lambda y: mlp(y, h, w, deterministic=deterministic)
    return layers.pre_norm_block(
        x, lambda y: attention(y, h, w, deterministic=deterministic), mlp_fn,
        epsilon=self.layernorm_eps, dropout_rate=self.dropout_rate,
        droppath_rate=self.droppath_rate, deterministic=deterministic, **kw)


class PatchEmbed(layers.Module):
  """Strided conv (v1: VALID, kernel = stride; v2: padding kernel // 2), then LayerNorm."""
  features: int
  patch_size: int
  stride: int
  overlap: bool
  layernorm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    kw = self.kw
    nkw = self.norm_kw
    k = self.patch_size
    if self.overlap:
      x = nn.Conv(self.features, (k, k), strides=(self.stride,) * 2,
                  padding=((k // 2, k // 2),) * 2, kernel_init=_conv_init(), name="proj", **kw)(x)
    elif k == self.stride:  # the same parameters as a VALID conv, cheaper on CPU
      x = layers.PatchEmbed(self.features, (k, k), kernel_init=layers.trunc_normal, name="proj",
                            **kw)(x)
    else:
      raise errors.ConfigError(f"PVT v1 patch embeddings need kernel == stride; got {k} and "
                               f"{self.stride} (set patch_sizes equal to strides).")
    return nn.LayerNorm(epsilon=self.layernorm_eps, name="norm", **nkw)(x)  # (B, H', W', C)


class PVTStage(layers.Module):
  """Patch embedding, [v1: cls token and position embedding], `depth` blocks, [v2: LayerNorm].
  Returns (tokens (B, [1 +] h*w, C), h, w)."""
  features: int
  depth: int
  num_heads: int
  mlp_ratio: float
  sr_ratio: int
  patch_size: int
  stride: int
  version: int
  droppath_rates: Sequence[float]
  with_cls: bool = False
  linear: bool = False
  qkv_bias: bool = True
  layernorm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    nkw = self.norm_kw
    v1, c = self.version == 1, self.features
    in_h, in_w = x.shape[1:3]
    x = PatchEmbed(c, self.patch_size, self.stride, overlap=not v1,
                   layernorm_eps=self.layernorm_eps, name="patch_embed", **kw)(x)
    b, h, w, _ = x.shape
    if h < 1 or w < 1:
      raise errors.ConfigError(
          f"{self.name}: a {in_h}x{in_w} map gives no patches; use a larger input "
          f"or smaller patch_sizes/strides.")
    x = x.reshape(b, h * w, c)
    if self.with_cls:
      cls = self.param("cls_token", layers.trunc_normal, (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x], axis=1)
    if v1:
      pe = self.param("pos_embed", layers.trunc_normal, (1, x.shape[1], c), self.param_dtype)
      x = nn.Dropout(self.dropout_rate)(x + pe.astype(x.dtype), deterministic=deterministic)
    for j in range(self.depth):
      x = PVTBlock(self.num_heads, self.mlp_ratio, self.sr_ratio, self.version,
                   linear=self.linear, qkv_bias=self.qkv_bias, layernorm_eps=self.layernorm_eps,
                   dropout_rate=self.dropout_rate,
                   attention_dropout_rate=self.attention_dropout_rate,
                   droppath_rate=self.droppath_rates[j], name=f"block_{j}", **kw)(
                       x, h, w, deterministic)
    if not v1:
      x = nn.LayerNorm(epsilon=self.layernorm_eps, name="norm", **nkw)(x)
    return x, h, w


class PyramidVisionTransformer(layers.Module):
  """PVT v1 or v2 classifier (see the module docstring). `num_classes=0` returns the pooled
  features (v1: the normalised cls token; v2: the mean of the last stage's tokens)."""
  num_classes: int = 1000
  version: int = 2  # 1 | 2
  hidden_sizes: Sequence[int] = (64, 128, 320, 512)
  depths: Sequence[int] = (2, 2, 2, 2)
  num_heads: Sequence[int] = (1, 2, 5, 8)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)  # conv kernels (v1: equal to the strides)
  strides: Sequence[int] = (4, 2, 2, 2)
  linear_attention: bool = False  # PVTv2-Li
  qkv_bias: bool = True
  layernorm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4:
      raise errors.ConfigError(f"images must be (B, H, W, C); got shape {images.shape}.")
    if self.version not in (1, 2):
      raise errors.ConfigError(f"version must be 1 or 2, got {self.version!r}.")
    per_stage = dict(hidden_sizes=self.hidden_sizes, depths=self.depths,
                     num_heads=self.num_heads, mlp_ratios=self.mlp_ratios,
                     sr_ratios=self.sr_ratios, patch_sizes=self.patch_sizes,
                     strides=self.strides)
    n_stages = len(self.depths)
    bad = {k: len(v) for k, v in per_stage.items() if len(v) != n_stages}
    if bad:
      raise errors.ConfigError(
          f"per-stage settings must all have {n_stages} entries (len(depths)); "
          f"got {bad}.")
    if self.linear_attention and self.version == 1:
      raise errors.ConfigError("linear_attention is a PVT v2 option; set version=2.")
    kw = self.kw
    v1 = self.version == 1
    rates = np.linspace(0.0, self.droppath_rate, sum(self.depths)).tolist()
    x = images.astype(layers.activation_dtype(self.dtype))
    for i in range(n_stages):
      start = sum(self.depths[:i])
      x, h, w = PVTStage(self.hidden_sizes[i], self.depths[i], self.num_heads[i],
                         self.mlp_ratios[i], self.sr_ratios[i], self.patch_sizes[i],
                         self.strides[i], self.version,
                         tuple(rates[start:start + self.depths[i]]),
                         with_cls=v1 and i == n_stages - 1, linear=self.linear_attention,
                         qkv_bias=self.qkv_bias, layernorm_eps=self.layernorm_eps,
                         dropout_rate=self.dropout_rate,
                         attention_dropout_rate=self.attention_dropout_rate,
                         name=f"stage_{i}", **kw)(x, not train)
      if i < n_stages - 1:
        x = x.reshape(x.shape[0], h, w, -1)
    # v1: the normalised cls token; v2: the mean token (each stage has its own final norm).
    return layers.classifier_head(x, self.num_classes, pool="token" if v1 else "mean",
                                  norm_epsilon=self.layernorm_eps if v1 else None, **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`PVT-Small`, `PVTv2-B2`, `PVTv2-B2-Li` -> PyramidVisionTransformer kwargs; None otherwise."""
  m = NAME_RE.match(name)
  if not m:
    return None
  table = _V2 if m["v2"] else _V1_DEPTHS
  if m["variant"] not in table or (m["li"] and (not m["v2"] or m["variant"] != "B2")):
    raise errors.ConfigError(f"Unknown PVT model {name!r}; known: {', '.join(NAMES)}.")
  if not m["v2"]:
    return dict(version=1, hidden_sizes=(64, 128, 320, 512), depths=_V1_DEPTHS[m["variant"]],
                mlp_ratios=(8, 8, 4, 4), patch_sizes=(4, 2, 2, 2), strides=(4, 2, 2, 2))
  hidden, depths, mlp = _V2[m["variant"]]
  return dict(version=2, hidden_sizes=hidden, depths=depths, mlp_ratios=mlp,
              patch_sizes=(7, 3, 3, 3), strides=(4, 2, 2, 2), linear_attention=bool(m["li"]))


# ------------------------------------------------------------------ Hugging Face import.
def model_kwargs_from_hf(config) -> dict:
  """PyramidVisionTransformer kwargs matching a transformers `PvtConfig` or `PvtV2Config`."""
  get = lambda k, *default: layers.hf_config_get(config, k, *default)
  version = 2 if get("model_type") == "pvt_v2" else 1
  if get("hidden_act", "gelu") != "gelu":
    raise errors.ConfigError(f"Only hidden_act='gelu' is supported, got {get('hidden_act')!r}.")
  kwargs = dict(num_classes=get("num_labels"), version=version,
                hidden_sizes=tuple(get("hidden_sizes")), depths=tuple(get("depths")),
                num_heads=tuple(get("num_attention_heads")),
                mlp_ratios=tuple(get("mlp_ratios")), patch_sizes=tuple(get("patch_sizes")),
                strides=tuple(get("strides")), qkv_bias=get("qkv_bias", True),
                layernorm_eps=get("layer_norm_eps", 1e-6))
  if version == 1:
    kwargs["sr_ratios"] = tuple(get("sequence_reduction_ratios"))
    if kwargs["patch_sizes"] != kwargs["strides"]:
      raise errors.ConfigError("PVT v1 patch embeddings need patch_sizes == strides; got "
                               f"{kwargs['patch_sizes']} and {kwargs['strides']}.")
  else:
    kwargs.update(sr_ratios=tuple(get("sr_ratios")), linear_attention=get("linear_attention", False))
  return kwargs


def from_hf_state_dict(state_dict: Mapping[str, Any], config) -> dict:
  """Variables {'params': ...} from the state dict (numpy arrays) of HF's
  `PvtForImageClassification` / `PvtV2ForImageClassification` (or `PvtModel` / `PvtV2Model`:
  no head, build with `num_classes=0`). `config`: the transformers config (or a dict of its
  fields), read for the stage layout; the model to load into is
  `PyramidVisionTransformer(**model_kwargs_from_hf(config))`."""
  kwargs = model_kwargs_from_hf(config)
  v1 = kwargs["version"] == 1
  sd = layers.TorchStateDict(state_dict, what="PVT" if v1 else "PVT v2")
  linear = kwargs.get("linear_attention", False)
  for i, depth in enumerate(kwargs["depths"]):
    stage = f"stage_{i}"
    if v1:
      emb = f"pvt.encoder.patch_embeddings.{i}"
      sd.conv(emb + ".projection", (stage, "patch_embed", "proj"))
      sd.layer_norm(emb + ".layer_norm", (stage, "patch_embed", "norm"))
      sd.put((stage, "pos_embed"), sd.take(emb + ".position_embeddings"))
      if i == len(kwargs["depths"]) - 1:
        sd.put((stage, "cls_token"), sd.take(emb + ".cls_token"))
    else:
      emb = f"pvt_v2.encoder.layers.{i}.patch_embedding"
      sd.conv(emb + ".proj", (stage, "patch_embed", "proj"))
      sd.layer_norm(emb + ".layer_norm", (stage, "patch_embed", "norm"))
      sd.layer_norm(f"pvt_v2.encoder.layers.{i}.layer_norm", (stage, "norm"))
    for j in range(depth):
      dst = (stage, f"block_{j}")
      if v1:
        src = f"pvt.encoder.block.{i}.{j}"
        att, out, sr, sr_norm = (src + ".attention.self", src + ".attention.output.dense",
                                 ".sequence_reduction", ".layer_norm")
        fc1, fc2 = src + ".mlp.dense1", src + ".mlp.dense2"
      else:
        src = f"pvt_v2.encoder.layers.{i}.blocks.{j}"
        att, out, sr, sr_norm = (src + ".attention", src + ".attention.proj",
                                 ".spatial_reduction", ".layer_norm")
        fc1, fc2 = src + ".mlp.dense1", src + ".mlp.dense2"
        sd.conv(src + ".mlp.dwconv.dwconv", dst + ("mlp", "dwconv"))
      sd.layer_norm(src + ".layer_norm_1", dst + ("norm1",))
      sd.layer_norm(src + ".layer_norm_2", dst + ("norm2",))
      sd.attention(att + ".query", att + ".key", att + ".value", out, dst + ("attn",),
                   kwargs["num_heads"][i])
      if linear or kwargs["sr_ratios"][i] > 1:
        sd.conv(att + sr, dst + ("attn", "sr"))
        sd.layer_norm(att + sr_norm, dst + ("attn", "sr_norm"))
      sd.linear(fc1, dst + ("mlp", "Dense_0"))
      sd.linear(fc2, dst + ("mlp", "Dense_1"))
  if v1:
    sd.layer_norm("pvt.encoder.layer_norm", ("norm",))
  if sd.has("classifier.weight"):
    sd.linear("classifier", ("head",))
  return sd.variables()
