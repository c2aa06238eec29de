"""Vision Transformer (Dosovitskiy et al., 2021) with the published parameter tree.

Names are those of the published `.npz` files (docs/reference.md, "ViT checkpoint layout"), old
global numbering:
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`.
With `scan=True` the blocks live stacked under `Transformer/encoderblock` (leading axis = layer);
`scan_to_unrolled` / `unrolled_to_scan` convert between the two layouts.
"""
import functools
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import errors
from vit_jax.models import layers

Dtype = Any

# name -> (hidden_size, mlp_dim, num_heads, num_layers). "Mu" is a CPU-sized model for this repo's
# Fashion-MNIST runs; the others are the paper's and DeiT's.
VARIANTS = {
    "Mu": (128, 512, 4, 6),
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
    "H": (1280, 5120, 16, 32),
}
NAME_RE = re.compile(r"^ViT-(?P<variant>[A-Za-z]+)/(?P<patch>\d+)$")
# Hybrids "R50+ViT-B/16": (depth in the name, patch in the name) -> (units per stage of the ResNet
# stem, token patch size on its feature map), as in the published files. The stem's output stride
# is 4 for the root alone, else 4 * 2**(stages - 1). R+ViT-Ti/16 is root + 8x8 patches, so in fact
# /32 (7x7 tokens at 224 px, 6,337,704 parameters); its published name is kept.
HYBRID_RE = re.compile(r"^R(?P<depth>\d*)\+ViT-(?P<variant>[A-Za-z]+)/(?P<patch>\d+)$")
HYBRID_STEMS = {
    ("", 16): ((), 8),
    ("26", 32): ((2, 2, 2, 2), 1),
    ("50", 16): ((3, 4, 9), 1),
    ("50", 32): ((3, 4, 6, 3), 1),
}

# Initialisers by `init_style`. "vit": the JAX release's (xavier_uniform Dense kernels, MLP biases
# normal(1e-6), position embedding normal(0.02), cls and head zeros). "deit": timm's, which DeiT
# trains with (truncated normal(0.02) for every Dense kernel including the head, the cls token and
# the position embedding; zero biases).
# (Sampled over 2-D views: layers.flat_init says why.)
_TRUNC = layers.flat_init(nn.initializers.truncated_normal(stddev=0.02))
INITS = {
    "vit": dict(dense=nn.initializers.xavier_uniform(), attn_bias=nn.initializers.zeros,
                mlp_bias=nn.initializers.normal(stddev=1e-6),
                posemb=nn.initializers.normal(stddev=0.02), token=nn.initializers.zeros,
                head=nn.initializers.zeros),
    "deit": dict(dense=_TRUNC, attn_bias=nn.initializers.zeros, mlp_bias=nn.initializers.zeros,
                 posemb=_TRUNC, token=_TRUNC, head=_TRUNC),
}


def inits(style: str) -> dict:
  if style not in INITS:
    raise errors.ConfigError(f"Unknown init_style {style!r}; known: {', '.join(INITS)}.")
  return INITS[style]


# Position information, `posemb`: "learn" (a learned (1, N, D) table added to the tokens, the
# published models), "sincos2d" (fixed 2-D sin-cos, added), "relbias" (no absolute embedding; each
# block's attention gets a learned bias per head and 2-D offset between two patches, as BEiT and
# Swin: `RelativePositionBias`), "rope2d" (no absolute embedding; axial 2-D rotary embeddings turn
# queries and keys inside attention: `layers.rope_2d_axial`). With relbias and rope2d, the logit of
# two patches depends on their positions only through their offset.
POSEMBS = ("learn", "sincos2d", "relbias", "rope2d")

REMAT_POLICIES = ("nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


class RelativePositionBias(nn.Module):
  """A block's learned relative position bias (BEiT, Swin): (1, heads, N, N) for `Attention`.

  `grid_bias` (2h-1, 2w-1, heads) holds one value per head and offset (row, column) between the
  query's and the key's patch (index (dy + h-1, dx + w-1)). With a class token in front
  (`num_prefix_tokens=1`), `cls_bias` (3, heads) holds BEiT's three extra terms: class token to
  any patch, any patch to the class token, class token to itself. Both start at zero, as BEiT's.
  At another image size the table is resized bicubically when weights load
  (`vit_jax.pretrained`: `resize_relative_bias_grids`); `cls_bias` is kept.
  """
  num_heads: int
  grid: Tuple[int, int]
  num_prefix_tokens: int = 0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    h, w = self.grid
    table = self.param("grid_bias", nn.initializers.zeros, (2 * h - 1, 2 * w - 1, self.num_heads),
                       self.param_dtype)
    index = layers.relative_position_index_2d(h, w)  # (N, N) into the flattened table
    bias = table.reshape(-1, self.num_heads)[index]  # (N, N, heads)
    if self.num_prefix_tokens > 1:
      raise errors.ConfigError(
          f"posemb='relbias' supports one class token, got {self.num_prefix_tokens} prefix "
          "tokens: use classifier='token', 'gap' or 'map'.")
    if self.num_prefix_tokens:
      cls = self.param("cls_bias", nn.initializers.zeros, (3, self.num_heads), self.param_dtype)
      n = h * w
      bias = jnp.concatenate([jnp.broadcast_to(cls[1], (n, 1, self.num_heads)), bias], axis=1)
      first = jnp.concatenate([cls[2][None], jnp.broadcast_to(cls[0], (n, self.num_heads))])
      bias = jnp.concatenate([first[None], bias], axis=0)  # (1 + N, 1 + N, heads)
    return jnp.transpose(bias, (2, 0, 1))[None]  # (1, heads, N, N)


class Encoder1DBlock(layers.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  `posemb` "relbias" and "rope2d" act here (see POSEMBS); `grid` and `num_prefix_tokens` say
  where the tokens sit."""
  mlp_dim: int
  num_heads: int
  posemb: str = "learn"
  grid: Tuple[int, int] = (14, 14)
  num_prefix_tokens: int = 1
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: Any = 0.0  # float, or a traced scalar under nn.scan
  init_style: str = "vit"  # vit | deit: see INITS
  approximate_gelu: bool = True  # tanh GELU (the JAX release); False: exact erf GELU (DeiT)

  @nn.compact
  def __call__(self, x, deterministic: bool):
    kw = self.kw
    init = inits(self.init_style)
    attention = layers.Attention(self.num_heads, dropout_rate=self.attention_dropout_rate,
                                 kernel_init=init["dense"], bias_init=init["attn_bias"],
                                 name="MultiHeadDotProductAttention_1", **kw)
    mlp = layers.MlpBlock(self.mlp_dim, dropout_rate=self.dropout_rate,
                          approximate_gelu=self.approximate_gelu, kernel_init=init["dense"],
                          bias_init=init["mlp_bias"], name="MlpBlock_3", **kw)
    bias = qk_transform = None
    if self.posemb == "relbias":
      bias = RelativePositionBias(self.num_heads, tuple(self.grid), self.num_prefix_tokens,
                                  param_dtype=self.param_dtype, name="RelativePositionBias")()
    elif self.posemb == "rope2d":
      qk_transform = functools.partial(layers.rope_2d_axial, grid=tuple(self.grid),
                                       num_prefix_tokens=self.num_prefix_tokens)
    x = layers.pre_norm_block(
        x, lambda y: attention(y, bias=bias, qk_transform=qk_transform,
                               deterministic=deterministic),
        lambda y: mlp(y, deterministic=deterministic), epsilon=1e-6,
        dropout_rate=self.dropout_rate, droppath_rate=self.droppath_rate,
        deterministic=deterministic, norm_names=("LayerNorm_0", "LayerNorm_2"), **kw)
    # Per-layer tokens for probing/visualisation; a no-op unless `intermediates` is mutable.
    self.sow("intermediates", "tokens", x)
    return x


class _ScanBlock(nn.Module):
  """Carry adapter for nn.scan: (x, layer_index) -> (x', None)."""
  block_kwargs: Any
  num_layers: int
  droppath_rate: float

  @nn.compact
  def __call__(self, x, layer_index, deterministic):
    # A Python 0.0 when there is no stochastic depth: a traced zero would still draw random masks.
    rate = (self.droppath_rate * layer_index / max(self.num_layers - 1, 1)
            if self.droppath_rate else 0.0)
    x = Encoder1DBlock(droppath_rate=rate, name="block", **self.block_kwargs)(x, deterministic)
    return x, None


class Encoder(layers.Module):
  """Position embedding, `num_layers` blocks, final LayerNorm (`Transformer/...` in checkpoints)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  posemb: str = "learn"  # see POSEMBS
  grid: Tuple[int, int] = (14, 14)  # token grid, for sincos2d, relbias and rope2d
  num_prefix_tokens: int = 1  # cls token(s) in front of the grid
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0  # linearly increasing from 0 at the first block to this at the last
  scan: bool = False
  remat_policy: Optional[str] = None
  init_style: str = "vit"
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    _, n, d = x.shape
    if self.posemb == "learn":
      pe = PosEmbed(name="posembed_input", param_dtype=self.param_dtype,
                    initializer=inits(self.init_style)["posemb"])(n, d)
    elif self.posemb == "sincos2d":
      pe = layers.posemb_sincos_2d(*self.grid, d)
      if self.num_prefix_tokens:
        pe = jnp.concatenate([jnp.zeros((1, self.num_prefix_tokens, d)), pe], axis=1)
    elif self.posemb in ("relbias", "rope2d"):
      pe = None  # relative: inside every block's attention
    else:
      raise errors.ConfigError(
          f"Unknown posemb {self.posemb!r}: use one of {', '.join(map(repr, POSEMBS))}.")
    if pe is not None:
      x = x + pe.astype(x.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    block_kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                        dropout_rate=self.dropout_rate,
                        attention_dropout_rate=self.attention_dropout_rate,
                        init_style=self.init_style, approximate_gelu=self.approximate_gelu,
                        posemb=self.posemb, grid=tuple(self.grid),
                        num_prefix_tokens=self.num_prefix_tokens,
                        **self.kw)
    if self.scan:
      block = _ScanBlock
      if self.remat_policy:
        block = nn.remat(block, policy=_policy(self.remat_policy), static_argnums=(3,))
      scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast), length=self.num_layers)
      x, _ = scanned(block_kwargs, self.num_layers, self.droppath_rate, name="encoderblock")(
          x, jnp.arange(self.num_layers, dtype=jnp.float32), not train)
    else:
      block = Encoder1DBlock
      if self.remat_policy:
        block = nn.remat(block, policy=_policy(self.remat_policy), static_argnums=(2,))
      for i in range(self.num_layers):
        rate = self.droppath_rate * i / max(self.num_layers - 1, 1)
        x = block(droppath_rate=rate, name=f"encoderblock_{i}", **block_kwargs)(x, not train)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm",
                        dtype=layers.activation_dtype(self.dtype),
                        param_dtype=self.param_dtype)(x)


class PosEmbed(nn.Module):
  """Learned position embedding `pos_embedding` of shape (1, N, D), normal(0.02) by default."""
  param_dtype: Dtype = jnp.float32
  initializer: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, n, d):
    return self.param("pos_embedding", self.initializer, (1, n, d), self.param_dtype)


def _policy(name: str):
  if name not in REMAT_POLICIES:
    raise errors.ConfigError(f"Unknown remat_policy {name!r}; known: {', '.join(REMAT_POLICIES)}")
  return getattr(jax.checkpoint_policies, name)


class VisionTransformer(layers.Module):
  """ViT classifier. `num_classes=0` returns the pooled (pre-head) representation.

  `resnet`, when set, is a dict for `resnet.stem` (a hybrid: the ResNet's feature map becomes the
  token grid); `None` is a pure ViT.
  """
  num_classes: int
  patch_size: Tuple[int, int] = (16, 16)
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  classifier: str = "token"  # token | gap | map
  representation_size: Optional[int] = None
  posemb: str = "learn"  # learn | sincos2d | relbias | rope2d: see POSEMBS
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  droppath_rate: float = 0.0
  head_bias_init: float = 0.0
  scan: bool = False
  remat_policy: Optional[str] = None
  resnet: Optional[Any] = None
  init_style: str = "vit"  # vit | deit: see INITS (DeiT's models use "deit")
  approximate_gelu: bool = True  # False: exact erf GELU, as DeiT (timm) and HF's ViT/DeiT use

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    kw = self.kw
    init = inits(self.init_style)
    x = images.astype(layers.activation_dtype(self.dtype))  # f32 under mixed precision
    if self.resnet is not None:
      from vit_jax.models import resnet  # the hybrid's stem; resnet.py never imports vit.py
      x = resnet.stem(x, **dict(self.resnet), **kw)

    x = layers.PatchEmbed(self.hidden_size, tuple(self.patch_size), name="embedding", **kw)(x)
    b, h, w, d = x.shape
    x = jnp.reshape(x, (b, h * w, d))  # (B, N, D)

    if self.classifier == "token":
      cls = self.param("cls", init["token"], (1, 1, d), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]).astype(x.dtype), x], axis=1)
    elif self.classifier not in ("gap", "map"):
      raise errors.ConfigError(
          f"Unknown classifier {self.classifier!r}: use 'token', 'gap' or 'map'.")

    x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                posemb=self.posemb, grid=(h, w),
                num_prefix_tokens=int(self.classifier == "token"),
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                droppath_rate=self.droppath_rate, scan=self.scan,
                remat_policy=self.remat_policy, init_style=self.init_style,
                approximate_gelu=self.approximate_gelu, name="Transformer", **kw)(
                    x, train=train)

    if self.classifier == "token":
      x = x[:, 0]
    elif self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = layers.MAPHead(self.num_heads, self.mlp_dim, name="MAPHead_0", **kw)(x)

    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits",
                           **self.dense_kw)(x))
    return layers.classifier_head(x, self.num_classes, kernel_init=init["head"],
                                  bias_init=nn.initializers.constant(self.head_bias_init), **kw)


def config_from_name(name: str) -> Optional[dict]:
  """`ViT-B/16` or `R50+ViT-B/16` -> VisionTransformer kwargs; None for other names."""
  known = f"{', '.join(VARIANTS)} (e.g. ViT-B/16)"
  m = (layers.match_variant(name, NAME_RE, VARIANTS, "ViT", known)
       or layers.match_variant(name, HYBRID_RE, VARIANTS, "ViT", known))
  if not m:
    return None
  d, mlp, heads, depth = VARIANTS[m["variant"]]
  p = int(m["patch"])
  kwargs = dict(hidden_size=d, mlp_dim=mlp, num_heads=heads, num_layers=depth, patch_size=(p, p))
  if m.re is HYBRID_RE:
    key = (m["depth"], p)
    if key not in HYBRID_STEMS:
      raise errors.ConfigError(f"Unknown hybrid {name!r}; known: {', '.join(_HYBRID_NAMES)}.")
    stages, p = HYBRID_STEMS[key]
    kwargs.update(patch_size=(p, p), resnet=dict(num_layers=stages, width_factor=1))
  return kwargs


_HYBRID_NAMES = tuple(f"R{d}+ViT-<variant>/{p}" for d, p in HYBRID_STEMS)
NAMES = tuple(f"ViT-{v}/<patch>" for v in VARIANTS) + _HYBRID_NAMES


# ------------------------------------------------------------------ scan <-> unrolled layout.
def scan_to_unrolled(params, num_layers: Optional[int] = None):
  """Params of a scanned ViT (`Transformer/encoderblock/block/...` stacked) -> `encoderblock_{i}`."""
  params = dict(params)
  enc = dict(params["Transformer"])
  stacked = enc.pop("encoderblock")["block"]
  n = num_layers or jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(n):
    enc[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  params["Transformer"] = enc
  return params


def unrolled_to_scan(params):
  """Params of an unrolled ViT (`encoderblock_{i}`) -> the scanned layout (leading layer axis)."""
  params = dict(params)
  enc = dict(params["Transformer"])
  keys = sorted((k for k in enc if re.fullmatch(r"encoderblock_\d+", k)),
                key=lambda k: int(k.split("_")[1]))
  blocks = [enc.pop(k) for k in keys]
  enc["encoderblock"] = {"block": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)}
  params["Transformer"] = enc
  return params


# ------------------------------------------------------------------ Hugging Face import.
# Hub checkpoints written by transformers < 5 (which `save_pretrained` still writes) use the
# older names on the left; order matters. The same for ViT (`vit.`) and DeiT (`deit.`) keys.
HF_LEGACY_NAMES = (
    ("encoder.layer.", "layers."),
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
)


def read_hf_backbone(sd: layers.TorchStateDict, prefix: str, num_layers: int, num_heads: int):
  """Reads the part of a Hugging Face ViT or DeiT state dict (current names, keys under `prefix`,
  e.g. 'vit.' or 'deit.') that a ViT with a class token has: the class token, the learned position
  embedding, the patch embedding, the blocks and the final norm, into `sd`'s tree under this
  module's names (`cls`, `embedding`, `Transformer/...`). Heads and extra tokens are the
  caller's."""
  e = prefix + "embeddings."
  sd.put(("cls",), sd.take(e + "cls_token"))
  sd.put(("Transformer", "posembed_input", "pos_embedding"), sd.take(e + "position_embeddings"))
  sd.conv(e + "patch_embeddings.projection", ("embedding",))
  for i in range(num_layers):
    src, dst = f"{prefix}layers.{i}", ("Transformer", f"encoderblock_{i}")
    sd.layer_norm(src + ".layernorm_before", dst + ("LayerNorm_0",))
    sd.attention(*(f"{src}.attention.{n}_proj" for n in "qkvo"),
                 dst + ("MultiHeadDotProductAttention_1",), num_heads)
    sd.layer_norm(src + ".layernorm_after", dst + ("LayerNorm_2",))
    sd.linear(src + ".mlp.fc1", dst + ("MlpBlock_3", "Dense_0"))
    sd.linear(src + ".mlp.fc2", dst + ("MlpBlock_3", "Dense_1"))
  sd.layer_norm(prefix + "layernorm", ("Transformer", "encoder_norm"))
