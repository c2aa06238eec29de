"""DeiT (Touvron et al., 2021): a ViT with DeiT's defaults, optionally with a distillation token.

`DeiT` is `vit.VisionTransformer` with DeiT's defaults (timm's initialisation, exact erf GELU,
stochastic depth 0.1), so `DeiT-B/16` has ViT-B/16's parameter tree and count (86,567,656).
`distilled=True` adds a second learned token: the sequence is [cls, dist, patches], the position
embedding has N + 2 slots, and a second head `head_dist` reads the dist token. Parameters beyond
ViT's: `dist` (1, 1, D) and `head_dist/{kernel, bias}`, so DeiT-B/16-distilled has
86,567,656 + 768 + 768 + 769,000 = 87,338,192 (the count of HF's
`DeiTForImageClassificationWithTeacher` with 1000 classes).

Outputs of a distilled model: in training (`train=True`) the tuple `(cls_logits, dist_logits)` —
the first for the true labels, the second for the teacher's (DeiT's hard or soft distillation
loss); in inference their average, as DeiT evaluates. `num_classes=0` returns the mean of the two
final tokens. `distill_head=False` keeps the dist token but drops `head_dist` and returns the
cls logits in both modes: HF's `DeiTForImageClassification` (which carries the dist token of the
distilled checkpoints but classifies from the cls token alone).

LayerNorm epsilon is 1e-6 as in DeiT's (timm) code; HF's DeiT configs say 1e-12. On the small
random models of the tests the logits differ by 2.6e-5 with HF's 1e-12 and by 4.5e-8 with 1e-6
(trained weights, with larger activations, are less sensitive). The patch embedding keeps ViT's lecun-normal
initialisation (timm leaves its conv at torch's default). Hybrid stems are not supported with a
distillation token.
"""
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from vit_jax import errors
from vit_jax.models import layers
from vit_jax.models import vit

NAME_RE = re.compile(r"^DeiT-(?P<variant>[A-Za-z]+)/(?P<patch>\d+)(?P<distilled>-distilled)?$")
PUBLISHED = ("Ti", "S", "B")  # the paper's variants; any vit.VARIANTS key (e.g. Mu) also works
NAMES = tuple(f"DeiT-{v}/16{d}" for d in ("", "-distilled") for v in PUBLISHED)
DROPPATH_RATE = 0.1  # DeiT's stochastic depth for all three sizes


class DeiT(vit.VisionTransformer):
  """ViT with DeiT's defaults; `distilled=True` adds the distillation token and head."""
  init_style: str = "deit"
  approximate_gelu: bool = False
  distilled: bool = False
  distill_head: bool = True  # with distilled: False = HF DeiTForImageClassification (cls only)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if not self.distilled:
      return super().__call__(images, train=train)
    if self.resnet is not None or self.classifier != "token":
      raise errors.ConfigError("A distilled DeiT needs classifier='token' and no resnet stem; got "
                               f"classifier={self.classifier!r}, resnet={self.resnet!r}.")
    if self.representation_size is not None:
      raise errors.ConfigError(
          "A distilled DeiT has no representation layer: set representation_size="
          "None.")
    kw = self.kw
    dkw = self.dense_kw
    init = vit.inits(self.init_style)
    x = layers.PatchEmbed(self.hidden_size, tuple(self.patch_size), name="embedding", **kw)(
        images.astype(layers.activation_dtype(self.dtype)))
    b, h, w, d = x.shape
    x = jnp.reshape(x, (b, h * w, d))  # (B, N, D)
    tokens = [jnp.tile(self.param(n, init["token"], (1, 1, d), self.param_dtype), [b, 1, 1])
              for n in ("cls", "dist")]
    x = jnp.concatenate([t.astype(x.dtype) for t in tokens] + [x], axis=1)  # (B, N + 2, D)
    x = vit.Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    posemb=self.posemb, grid=(h, w), num_prefix_tokens=2,
                    dropout_rate=self.dropout_rate,
                    attention_dropout_rate=self.attention_dropout_rate,
                    droppath_rate=self.droppath_rate, scan=self.scan,
                    remat_policy=self.remat_policy, init_style=self.init_style,
                    approximate_gelu=self.approximate_gelu, name="Transformer", **kw)(
                        x, train=train)
    x_cls, x_dist = x[:, 0], x[:, 1]
    if not self.num_classes:
      return ((x_cls + x_dist) / 2).astype(jnp.float32)
    head = lambda name: nn.Dense(self.num_classes, kernel_init=init["head"],
                                 bias_init=nn.initializers.constant(self.head_bias_init),
                                 name=name, **dkw)
    logits = head("head")(x_cls).astype(jnp.float32)
    if not self.distill_head:
      return logits
    logits_dist = head("head_dist")(x_dist).astype(jnp.float32)
    if train:
      return logits, logits_dist
    return (logits + logits_dist) / 2


def config_from_name(name: str) -> Optional[dict]:
  """`DeiT-S/16` or `DeiT-S/16-distilled` -> DeiT kwargs; None for other names."""
  m = layers.match_variant(name, NAME_RE, vit.VARIANTS, "DeiT",
                           f"{', '.join(NAMES)} (or any of {', '.join(vit.VARIANTS)})")
  if not m:
    return None
  d, mlp, heads, depth = vit.VARIANTS[m["variant"]]
  p = int(m["patch"])
  return dict(hidden_size=d, mlp_dim=mlp, num_heads=heads, num_layers=depth, patch_size=(p, p),
              droppath_rate=DROPPATH_RATE, distilled=bool(m["distilled"]))


# ------------------------------------------------------------------ Hugging Face import.
def model_kwargs_from_hf(config) -> dict:
  """DeiT kwargs matching a transformers `DeiTConfig` (num_classes from its `num_labels`)."""
  get = lambda k, *default: layers.hf_config_get(config, k, *default)
  if get("hidden_act", "gelu") != "gelu":
    raise errors.ConfigError(f"Only hidden_act='gelu' is supported, got {get('hidden_act')!r}.")
  p = get("patch_size")
  return dict(num_classes=get("num_labels"), hidden_size=get("hidden_size"),
              mlp_dim=get("intermediate_size"), num_heads=get("num_attention_heads"),
              num_layers=get("num_hidden_layers"), patch_size=(p, p), distilled=True)


def from_hf_state_dict(state_dict: Mapping[str, Any], config) -> dict:
  """Variables {'params': ...} of a distilled `DeiT` from the state dict (numpy arrays) of HF's
  `DeiTForImageClassificationWithTeacher` (two heads), `DeiTForImageClassification` (cls head
  only: build the model with `distill_head=False`) or `DeiTModel` (no head: `num_classes=0`).
  `config` is the transformers `DeiTConfig` (or a dict with its fields), read for the head count.
  Current and legacy (transformers < 5) key names are both accepted."""
  sd = layers.TorchStateDict(state_dict, what="DeiT", renames=vit.HF_LEGACY_NAMES,
                             ignore=re.compile(r".*mask_token|deit\.pooler\..*"))
  vit.read_hf_backbone(sd, "deit.", layers.hf_config_get(config, "num_hidden_layers"),
                       layers.hf_config_get(config, "num_attention_heads"))
  sd.put(("dist",), sd.take("deit.embeddings.distillation_token"))
  if sd.has("cls_classifier.weight"):
    sd.linear("cls_classifier", ("head",))
    sd.linear("distillation_classifier", ("head_dist",))
  elif sd.has("classifier.weight"):
    sd.linear("classifier", ("head",))
  return sd.variables()
