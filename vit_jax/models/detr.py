"""DETR, detection with a transformer encoder-decoder (Carion et al., 2020).

A backbone gives a feature map (B, h, w, C); a 1x1 conv projects it to D channels; a post-norm
transformer encoder runs over the h*w tokens, with fixed 2-D sine position encodings added to its
queries and keys in every layer; a post-norm decoder turns `num_queries` learned object queries
(zero inputs plus a learned query position embedding added to queries and keys) into D-vectors,
attending to the encoder's output (keys get the sine encodings). Shared heads read every decoder
layer through the decoder's final LayerNorm: a Dense to `num_classes + 1` logits (the last one is
"no object") and a 3-layer MLP (D, D, 4) whose sigmoid is the box (cx, cy, w, h), relative to the
image (the unpadded one, as DETR's targets are normalised).

Backbones (`backbone`):
- "resnet": a torchvision-style ResNet (v1.5: the stride sits in the 3x3 conv; 7x7/2 conv, BN,
  relu, 3x3/2 max-pool, bottleneck stages) whose BatchNorms are frozen, as in the paper: scale,
  bias and the running mean and variance are fixed, y = x * s + (b - m * s), s = scale /
  sqrt(var + 1e-5). All four live in the `batch_stats` collection, not in `params`: the optimizer
  never sees them, the parameter count equals transformers' (which keeps them as buffers:
  41,501,895 for DETR-R50 with its default 2 labels), and a trainer that already carries
  `batch_stats` (BatchNorm models) passes them through unchanged. Initialised to the identity;
  meaningful only with converted weights (from_hf_state_dict).
- "bit": our BiT ResNet stem (vit_jax/models/resnet.py, GroupNorm + weight-standardised convs),
  which trains from scratch; `DETR-Mu` uses it for 128x128 Fashion-MNIST canvases on a CPU. (This
  file imports resnet.py for it, as the hybrid ViT does for its stem.)

Padding: `mask` (B, H, W), True on real pixels (transformers' `pixel_mask`), is down-sampled to the
feature map by nearest neighbour (torch's `interpolate`: source index floor(i * H / h)); padded
tokens are masked out as keys in the encoder and in the decoder's cross-attention, and the sine
encodings count positions over real pixels only (cumulative sums of the mask, normalised to
[0, 2 pi]).

Outputs (a dict): `logits` (B, Q, K+1) and `boxes` (B, Q, 4) of the last decoder layer,
`aux_logits` (L-1, B, Q, K+1) and `aux_boxes` (L-1, B, Q, 4) of the earlier ones (DETR's
auxiliary decoding losses).

Parameter tree (D width; `i` layer; transformers' names in docs of `from_hf_state_dict`):

    backbone/...    resnet: stem_conv, stage{s}_unit{u}/{conv1, conv2, conv3[, shortcut_conv]}
                    (s, u from 1; the BN variables stem_bn, .../bn{1,2,3}, .../shortcut_bn are
                    in batch_stats); bit: resnet.stem's conv_root, gn_root, block{s}/unit{u}
    input_proj/{kernel (1, 1, C, D), bias}
    encoder_layer_{i}/{self_attn, norm1, mlp/{Dense_0, Dense_1}, norm2}
    decoder_layer_{i}/{self_attn, norm1, cross_attn, norm2, mlp/{Dense_0, Dense_1}, norm3}
    decoder_norm, query_embed (Q, D), class_head, box_head/{Dense_0, Dense_1, Dense_2}
    attention: {query, key, value}/kernel (D, H, D/H), bias (H, D/H); out/kernel (H, D/H, D)

Differences from transformers that change nothing in evaluation with `auxiliary_loss=False` (its
default): with `auxiliary_loss=True` transformers' decoder feeds the normalised output of each
layer to the next one (the original DETR normalises a copy for the heads only, as here); its
dropouts sit after the attention and MLP outputs only, while the original DETR (and this module)
also drops attention weights and the MLP's hidden activations (all at `dropout_rate`, 0.1 in the
paper).
"""
import functools
import math
import re
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import errors
from vit_jax.models import layers
from vit_jax.models import resnet

Dtype = Any
BN_EPS = 1e-5  # torchvision's FrozenBatchNorm2d and transformers' DetrFrozenBatchNorm2d
LN_EPS = 1e-5  # torch's LayerNorm default, which DETR uses
NEG_INF = -1e9  # attention bias of padded keys

BACKBONES = {
    "resnet": "torchvision-style ResNet with frozen BatchNorm (the paper's)",
    "bit": "our BiT ResNet stem (GroupNorm + StdConv, trainable from scratch)",
}


# ------------------------------------------------------------------------------ backbones.
class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed scale, bias, mean and var, all in `batch_stats` (see the module
  docstring): y = x * s + (bias - mean * s), s = scale / sqrt(var + 1e-5)."""

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    get = lambda name, init: self.variable("batch_stats", name, init, (c,), jnp.float32).value
    scale = get("scale", jnp.ones)
    bias = get("bias", jnp.zeros)
    mean = get("mean", jnp.zeros)
    var = get("var", jnp.ones)
    s = scale * jax.lax.rsqrt(var + BN_EPS)
    return x * s.astype(x.dtype) + (bias - mean * s).astype(x.dtype)


def _conv(features, kernel, stride, name):
  """A torch `Conv2d(k, stride, padding=k // 2, bias=False)` (He-normal fan-out, torchvision's)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                 conv_general_dilated=layers.conv_general_dilated, name=name)


class FrozenBNBottleneck(nn.Module):
  """1x1 -> BN -> relu -> 3x3 (stride) -> BN -> relu -> 1x1 (4x) -> BN -> + shortcut -> relu."""
  features: int  # output channels (4x the inner width), as transformers' `hidden_sizes`
  stride: int = 1

  @nn.compact
  def __call__(self, x):
    inner = self.features // 4
    residual = x
    if x.shape[-1] != self.features or self.stride != 1:
      residual = _conv(self.features, 1, self.stride, "shortcut_conv")(x)
      residual = FrozenBatchNorm(name="shortcut_bn")(residual)
    y = nn.relu(FrozenBatchNorm(name="bn1")(_conv(inner, 1, 1, "conv1")(x)))
    y = nn.relu(FrozenBatchNorm(name="bn2")(_conv(inner, 3, self.stride, "conv2")(y)))
    y = FrozenBatchNorm(name="bn3")(_conv(self.features, 1, 1, "conv3")(y))
    return nn.relu(y + residual)


class FrozenBNResNet(nn.Module):
  """The paper's backbone: stem (7x7/2 conv, frozen BN, relu, 3x3/2 max-pool), then bottleneck
  stages (`depths` units, `widths` output channels, stride 2 from the second stage on).
  ResNet-50: depths (3, 4, 6, 3), widths (256, 512, 1024, 2048), output stride 32."""
  depths: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (256, 512, 1024, 2048)
  stem_width: int = 64

  @nn.compact
  def __call__(self, x):
    if len(self.depths) != len(self.widths):
      raise errors.ConfigError(f"FrozenBNResNet: depths {tuple(self.depths)} and widths "
                               f"{tuple(self.widths)} need one entry per stage each.")
    x = _conv(self.stem_width, 7, 2, "stem_conv")(x)
    x = nn.relu(FrozenBatchNorm(name="stem_bn")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    for s, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for u in range(depth):
        x = FrozenBNBottleneck(width, stride=2 if s and not u else 1,
                               name=f"stage{s + 1}_unit{u + 1}")(x)
    return x


class BiTBackbone(nn.Module):
  """Our BiT ResNet stem (post-activation units) as a feature extractor; see resnet.stem."""
  num_layers: Sequence[int] = (1, 1, 1)
  base_width: int = 16
  root: str = "imagenet"
  gn_groups: int = 8

  @nn.compact
  def __call__(self, x):
    return resnet.stem(x, num_layers=self.num_layers, base_width=self.base_width, root=self.root,
                       gn_groups=self.gn_groups)


# ------------------------------------------------------------------------------ position, masks.
def downsample_mask(mask: jax.Array, h: int, w: int) -> jax.Array:
  """(B, H, W) bool -> (B, h, w) by nearest neighbour as torch's `interpolate` picks it: source
  index min(floor(i * float32(H / h)), H - 1)."""
  def index(src, dst):
    scale = np.float32(src) / np.float32(dst)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64),
                      src - 1)
  return mask[:, index(mask.shape[1], h)][:, :, index(mask.shape[2], w)]


def sine_position_encoding(mask: jax.Array, num_feats: int, temperature: float = 10_000.,
                           scale: float = 2 * math.pi) -> jax.Array:
  """DETR's 2-D sine encodings: (B, h, w) bool mask (True: real) -> (B, h, w, 2 * num_feats).

  y and x are the cumulative counts of real positions down and across, normalised to (0, scale];
  each becomes num_feats channels [sin(p / t_0), cos(p / t_0), sin(p / t_1), ...] with
  t_k = temperature ** (2k / num_feats); the y channels come first.
  """
  m = mask.astype(jnp.float32)
  y = jnp.cumsum(m, axis=1)
  x = jnp.cumsum(m, axis=2)
  eps = 1e-6
  y = y / (y[:, -1:, :] + eps) * scale
  x = x / (x[:, :, -1:] + eps) * scale
  dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)
  dim_t = jnp.asarray(dim_t, jnp.float32)

  def encode(p):  # (B, h, w) -> (B, h, w, num_feats), sin and cos interleaved
    p = p[..., None] / dim_t
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
        p.shape[:-1] + (-1,))
  return jnp.concatenate([encode(y), encode(x)], axis=-1)


# ------------------------------------------------------------------------------ transformer.
class DetrAttention(nn.Module):
  """Multi-head attention whose queries, keys and values come from three inputs (DETR adds the
  position encodings to queries and keys only). Layout of layers.Attention."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in, k_in, v_in, key_mask=None, *, deterministic: bool):
    """q_in (B, Nq, D); k_in, v_in (B, Nk, D); key_mask (B, Nk) True for keys to attend to."""
    d_model = q_in.shape[-1]
    if d_model % self.num_heads:
      raise errors.ConfigError(
          f"DETR width {d_model} is not divisible by num_heads={self.num_heads}.")
    head_dim = d_model // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), name=name,
                                        kernel_init=nn.initializers.xavier_uniform(),
                                        **layers.dense_kwargs(self.dtype))
    q = proj("query")(q_in) / np.sqrt(head_dim).astype(np.float32)  # (B, Nq, H, d)
    k = proj("key")(k_in)
    v = proj("value")(v_in)
    logits = layers.einsum("bqhd,bkhd->bhqk", q, k, self.dtype)
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, NEG_INF)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    y = layers.einsum("bhqk,bkhd->bqhd", weights, v, self.dtype)
    return nn.DenseGeneral(d_model, axis=(-2, -1), name="out",
                           kernel_init=nn.initializers.xavier_uniform(),
                           **layers.dense_kwargs(self.dtype))(y)


class DetrMlp(nn.Module):
  """Dense -> relu -> dropout -> Dense."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(), name=name,
                                     **layers.dense_kwargs(self.dtype))
    y = nn.relu(dense(self.mlp_dim, "Dense_0")(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    return dense(x.shape[-1], "Dense_1")(y)


def _norm(name):
  return nn.LayerNorm(epsilon=LN_EPS, name=name)


class EncoderLayer(nn.Module):
  """Post-norm: x = LN(x + drop(attn(x + pos, x + pos, x))); x = LN(x + drop(mlp(x)))."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, pos, key_mask, *, deterministic: bool):
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = DetrAttention(self.num_heads, self.dropout_rate, self.dtype, name="self_attn")(
        x + pos, x + pos, x, key_mask, deterministic=deterministic)
    x = _norm("norm1")(x + drop(y))
    y = DetrMlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        x, deterministic=deterministic)
    return _norm("norm2")(x + drop(y))


class DecoderLayer(nn.Module):
  """Post-norm: self-attention (queries and keys + query_pos), cross-attention (queries +
  query_pos, keys memory + pos, values memory), MLP; each followed by add and LayerNorm."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, query_pos, memory, pos, key_mask, *, deterministic: bool):
    drop = lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    att = lambda name: DetrAttention(self.num_heads, self.dropout_rate, self.dtype, name=name)
    y = att("self_attn")(x + query_pos, x + query_pos, x, deterministic=deterministic)
    x = _norm("norm1")(x + drop(y))
    y = att("cross_attn")(x + query_pos, memory + pos, memory, key_mask,
                          deterministic=deterministic)
    x = _norm("norm2")(x + drop(y))
    y = DetrMlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(
        x, deterministic=deterministic)
    return _norm("norm3")(x + drop(y))


class BoxHead(nn.Module):
  """DETR's box MLP: Dense(D) -> relu -> Dense(D) -> relu -> Dense(4) -> sigmoid (cx, cy, w, h)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j, n in enumerate((x.shape[-1], x.shape[-1], 4)):
      x = nn.Dense(n, name=f"Dense_{j}", **layers.dense_kwargs(self.dtype))(x)
      x = nn.relu(x) if j < 2 else jax.nn.sigmoid(x)
    return x


class DETR(nn.Module):
  """DETR: backbone -> 1x1 projection -> encoder-decoder -> class and box heads per decoder layer.

  `num_classes` counts the real classes; the class head has one more output ("no object").
  Call: `model.apply(variables, images (B, H, W, C), mask (B, H, W) or None, train=...)` -> dict
  (see the module docstring). Variables: `params` and, for backbone="resnet", `batch_stats`.
  """
  num_classes: int
  hidden_size: int = 256
  num_heads: int = 8
  mlp_dim: int = 2048
  encoder_layers: int = 6
  decoder_layers: int = 6
  num_queries: int = 100
  dropout_rate: float = 0.1
  backbone: str = "resnet"  # see BACKBONES
  # backbone="resnet": units and output channels per stage, stem channels.
  resnet_depths: Tuple[int, ...] = (3, 4, 6, 3)
  resnet_widths: Tuple[int, ...] = (256, 512, 1024, 2048)
  resnet_stem_width: int = 64
  # backbone="bit": resnet.stem's options.
  bit_layers: Tuple[int, ...] = (1, 1, 1)
  bit_width: int = 16
  bit_root: str = "imagenet"
  bit_gn_groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, mask=None, *, train: bool = False):
    if self.backbone not in BACKBONES:
      raise errors.ConfigError(f"Unknown DETR backbone {self.backbone!r}; known: "
                               + "; ".join(f"{k!r} ({v})" for k, v in BACKBONES.items()) + ".")
    if self.num_classes < 1:
      raise errors.ConfigError(
          f"DETR needs num_classes >= 1 (real classes, without 'no object'), got "
          f"{self.num_classes}.")
    deterministic = not train
    b, h_img, w_img = images.shape[:3]
    if mask is None:
      mask = jnp.ones((b, h_img, w_img), bool)
    elif mask.shape != (b, h_img, w_img):
      raise errors.ConfigError(f"DETR mask has shape {mask.shape}; it needs (B, H, W) = "
                               f"{(b, h_img, w_img)}, True on real pixels and False on padding.")
    images = images.astype(jnp.float32)
    if self.backbone == "resnet":
      feats = FrozenBNResNet(tuple(self.resnet_depths), tuple(self.resnet_widths),
                             self.resnet_stem_width, name="backbone")(images)
    else:
      feats = BiTBackbone(tuple(self.bit_layers), self.bit_width, self.bit_root,
                          self.bit_gn_groups, name="backbone")(images)
    _, h, w, _ = feats.shape
    d = self.hidden_size
    if d % 2:
      raise errors.ConfigError(
          f"DETR hidden_size {d} must be even (half the sine channels are y, half x).")
    x = nn.Conv(d, (1, 1), conv_general_dilated=layers.conv_general_dilated,
                name="input_proj")(feats).reshape(b, h * w, d)  # (B, N, D)
    feat_mask = downsample_mask(mask.astype(bool), h, w)  # (B, h, w)
    pos = sine_position_encoding(feat_mask, d // 2).reshape(b, h * w, d)
    key_mask = feat_mask.reshape(b, h * w)

    kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
              dtype=self.dtype)
    for i in range(self.encoder_layers):
      x = EncoderLayer(**kw, name=f"encoder_layer_{i}")(x, pos, key_mask,
                                                        deterministic=deterministic)
    memory = x

    query_pos = self.param("query_embed", nn.initializers.normal(1.0), (self.num_queries, d))
    query_pos = jnp.broadcast_to(query_pos[None], (b, self.num_queries, d))
    y = jnp.zeros_like(query_pos)
    decoder_norm = _norm("decoder_norm")
    outs = []
    for i in range(self.decoder_layers):
      y = DecoderLayer(**kw, name=f"decoder_layer_{i}")(y, query_pos, memory, pos, key_mask,
                                                        deterministic=deterministic)
      outs.append(decoder_norm(y))
    hs = jnp.stack(outs)  # (L, B, Q, D)

    logits = nn.Dense(self.num_classes + 1, name="class_head",
                      **layers.dense_kwargs(self.dtype))(hs)
    boxes = BoxHead(self.dtype, name="box_head")(hs)
    logits, boxes = logits.astype(jnp.float32), boxes.astype(jnp.float32)
    return {"logits": logits[-1], "boxes": boxes[-1], "aux_logits": logits[:-1],
            "aux_boxes": boxes[:-1]}


# ------------------------------------------------------------------------------ registry.
# DETR-R50: the paper's model (transformers' DetrConfig defaults). DETR-Mu: a CPU-sized model for
# 128x128 Fashion-MNIST canvases (BiT stem 7x7/2 + pool + stages (1, 1, 1) at width 16: output
# stride 16, 8x8 tokens of 256 channels; width 64, 2+2 layers, 16 queries).
VARIANTS = {
    "DETR-R50": dict(),
    "DETR-R101": dict(resnet_depths=(3, 4, 23, 3)),
    "DETR-Mu": dict(backbone="bit", hidden_size=64, num_heads=4, mlp_dim=256, encoder_layers=2,
                    decoder_layers=2, num_queries=16, dropout_rate=0.0),
}
NAMES = tuple(VARIANTS)


def config_from_name(name: str) -> Optional[dict]:
  return dict(VARIANTS[name]) if name in VARIANTS else None


# ------------------------------------------------------------------------------ transformers.
# timm ResNets that transformers' DETR checkpoints on the Hub use (`use_timm_backbone=True`,
# e.g. facebook/detr-resnet-50): torchvision's layout (stride in the 3x3 conv), widths 256..2048.
TIMM_RESNETS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def _num_labels(config) -> int:
  """`num_labels` of a DetrConfig, or len(id2label) of a config.json dict that lacks it."""
  if isinstance(config, dict) and "num_labels" not in config and "id2label" in config:
    return len(config["id2label"])
  return layers.hf_config_get(config, "num_labels")


def model_kwargs_from_hf(config) -> dict:
  """DETR kwargs for transformers' `DetrConfig` (or its config.json as a dict): either a timm
  ResNet-50/101 backbone (`use_timm_backbone=True`, the Hub's checkpoints) or a transformers
  `ResNetConfig` (bottleneck units, relu, stride in the 3x3 conv, last stage out)."""
  get = functools.partial(layers.hf_config_get, config)
  for key, want in (("position_embedding_type", "sine"), ("activation_function", "relu"),
                    ("dilation", False)):
    if get(key) != want:
      raise errors.ConfigError(f"DETR conversion supports {key}={want!r}, got {get(key)!r}.")
  if get("encoder_attention_heads") != get("decoder_attention_heads") or (
      get("encoder_ffn_dim") != get("decoder_ffn_dim")):
    raise errors.ConfigError("DETR conversion needs equal encoder and decoder heads and ffn dims.")
  if get("use_timm_backbone"):
    name = get("backbone")
    if name not in TIMM_RESNETS:
      raise errors.ConfigError(
          f"DETR conversion supports the timm backbones {sorted(TIMM_RESNETS)}, "
          f"got {name!r}.")
    depths, widths, stem = TIMM_RESNETS[name], (256, 512, 1024, 2048), 64
  else:
    bb = get("backbone_config")
    if bb is None:
      raise errors.ConfigError("DETR conversion needs a timm ResNet backbone or a ResNetConfig "
                               "backbone_config; the config has neither.")
    bget = functools.partial(layers.hf_config_get, bb)
    checks = {"layer_type": "bottleneck", "hidden_act": "relu",
              "downsample_in_bottleneck": False, "downsample_in_first_stage": False}
    for key, want in checks.items():
      if bget(key) != want:
        raise errors.ConfigError(
            f"DETR conversion supports ResNet backbones with {key}={want!r}, got "
            f"{bget(key)!r}.")
    n_stages = len(bget("depths"))
    if list(bget("out_features")) != [f"stage{n_stages}"]:
      raise errors.ConfigError(
          f"DETR conversion needs the backbone's last stage as its only output "
          f"(out_features=['stage{n_stages}']), got {bget('out_features')}.")
    depths, widths = tuple(bget("depths")), tuple(bget("hidden_sizes"))
    stem = bget("embedding_size")
  return dict(num_classes=_num_labels(config), hidden_size=get("d_model"),
              num_heads=get("encoder_attention_heads"), mlp_dim=get("encoder_ffn_dim"),
              encoder_layers=get("encoder_layers"), decoder_layers=get("decoder_layers"),
              num_queries=get("num_queries"), dropout_rate=get("dropout"), backbone="resnet",
              resnet_depths=tuple(depths), resnet_widths=tuple(widths), resnet_stem_width=stem)


def _modern_names(state_dict: Mapping[str, Any]) -> dict:
  """Legacy DETR checkpoint names -> transformers 5's (what its own conversion mapping renames):
  backbone.conv_encoder -> backbone, out_proj -> o_proj, layers.{i}.fc1/fc2 -> layers.{i}.mlp.*;
  and a timm ResNet backbone's names -> those of transformers' ResNetBackbone (conv1/bn1 ->
  embedder, layer{s}.{u}.conv{j}/bn{j} -> encoder.stages.{s-1}.layers.{u}.layer.{j-1},
  downsample.0/1 -> shortcut)."""
  out = {}
  bb = "model.backbone.model."
  for key, value in state_dict.items():
    key = key.replace("model.backbone.conv_encoder.", "model.backbone.")
    key = key.replace(".out_proj.", ".o_proj.")
    key = re.sub(r"layers\.(\d+)\.fc([12])\.", r"layers.\1.mlp.fc\2.", key)
    if key.startswith(bb):
      rest = key[len(bb):]
      rest = re.sub(r"^conv1\.", "embedder.embedder.convolution.", rest)
      rest = re.sub(r"^bn1\.", "embedder.embedder.normalization.", rest)
      m = re.match(r"^layer(\d+)\.(\d+)\.(.*)$", rest)
      if m:
        stage, unit, leaf = int(m[1]) - 1, m[2], m[3]
        leaf = re.sub(r"^conv(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.convolution.", leaf)
        leaf = re.sub(r"^bn(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.normalization.", leaf)
        leaf = leaf.replace("downsample.0.", "shortcut.convolution.")
        leaf = leaf.replace("downsample.1.", "shortcut.normalization.")
        rest = f"encoder.stages.{stage}.layers.{unit}.{leaf}"
      key = bb + rest
    out[key] = value
  return out


def from_hf_state_dict(state_dict: Mapping[str, Any], config) -> dict:
  """Variables {'params', 'batch_stats'} from the state dict (numpy arrays) of transformers'
  `DetrForObjectDetection` (ResNet backbone); `config` is its DetrConfig (or its config.json as
  a dict). The model to load into is `DETR(**model_kwargs_from_hf(config))`. Legacy and timm
  names (the Hub's checkpoints) are renamed first (`_modern_names`).

  Names: model.backbone.model.embedder.embedder.{convolution, normalization} -> stem_conv,
  stem_bn; ...encoder.stages.{s}.layers.{u}.layer.{0,1,2} -> stage{s+1}_unit{u+1}/conv{1,2,3},
  bn{1,2,3}, .shortcut -> shortcut_conv, shortcut_bn; model.input_projection -> input_proj;
  model.{encoder,decoder}.layers.{i} -> {encoder,decoder}_layer_{i} (self_attn, encoder_attn ->
  cross_attn, *_layer_norm -> norm1..3, mlp.fc1/fc2 -> mlp/Dense_0/1); model.decoder.layernorm ->
  decoder_norm; model.query_position_embeddings -> query_embed; class_labels_classifier ->
  class_head; bbox_predictor.layers.{j} -> box_head/Dense_{j}.
  """
  kwargs = model_kwargs_from_hf(config)
  heads = kwargs["num_heads"]
  sd = layers.TorchStateDict(_modern_names(state_dict), what="DETR",
                             ignore=re.compile(r".*num_batches_tracked"))

  def frozen_bn(src, dst):
    for theirs, ours in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                         ("running_var", "var")):
      sd.put(("backbone",) + dst + (ours,), sd.take(f"{src}.{theirs}"), "batch_stats")

  def conv_bn(src, conv, bn):
    sd.conv(src + ".convolution", ("backbone", conv))
    frozen_bn(src + ".normalization", (bn,))

  bb = "model.backbone.model."
  conv_bn(bb + "embedder.embedder", "stem_conv", "stem_bn")
  for s, depth in enumerate(kwargs["resnet_depths"]):
    for u in range(depth):
      src, unit = f"{bb}encoder.stages.{s}.layers.{u}", f"stage{s + 1}_unit{u + 1}"
      for j in range(3):
        sd.conv(f"{src}.layer.{j}.convolution", ("backbone", unit, f"conv{j + 1}"))
        frozen_bn(f"{src}.layer.{j}.normalization", (unit, f"bn{j + 1}"))
      if sd.has(f"{src}.shortcut.convolution.weight"):
        sd.conv(f"{src}.shortcut.convolution", ("backbone", unit, "shortcut_conv"))
        frozen_bn(f"{src}.shortcut.normalization", (unit, "shortcut_bn"))
  sd.conv("model.input_projection", ("input_proj",))

  def attention(src, dst):
    sd.attention(src + ".q_proj", src + ".k_proj", src + ".v_proj", src + ".o_proj", dst, heads)

  for i in range(kwargs["encoder_layers"]):
    src, dst = f"model.encoder.layers.{i}", (f"encoder_layer_{i}",)
    attention(src + ".self_attn", dst + ("self_attn",))
    sd.layer_norm(src + ".self_attn_layer_norm", dst + ("norm1",))
    sd.linear(src + ".mlp.fc1", dst + ("mlp", "Dense_0"))
    sd.linear(src + ".mlp.fc2", dst + ("mlp", "Dense_1"))
    sd.layer_norm(src + ".final_layer_norm", dst + ("norm2",))
  for i in range(kwargs["decoder_layers"]):
    src, dst = f"model.decoder.layers.{i}", (f"decoder_layer_{i}",)
    attention(src + ".self_attn", dst + ("self_attn",))
    sd.layer_norm(src + ".self_attn_layer_norm", dst + ("norm1",))
    attention(src + ".encoder_attn", dst + ("cross_attn",))
    sd.layer_norm(src + ".encoder_attn_layer_norm", dst + ("norm2",))
    sd.linear(src + ".mlp.fc1", dst + ("mlp", "Dense_0"))
    sd.linear(src + ".mlp.fc2", dst + ("mlp", "Dense_1"))
    sd.layer_norm(src + ".final_layer_norm", dst + ("norm3",))
  sd.layer_norm("model.decoder.layernorm", ("decoder_norm",))
  sd.put(("query_embed",), sd.take("model.query_position_embeddings.weight"))
  sd.linear("class_labels_classifier", ("class_head",))
  for j in range(3):
    sd.linear(f"bbox_predictor.layers.{j}", ("box_head", f"Dense_{j}"))
  return sd.variables()
