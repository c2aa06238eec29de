"""The PyTorch side of the side-by-side benchmarks: Hugging Face transformers models, random init.

Each of our model names maps to the same architecture in transformers: ViT-*/p ->
`ViTForImageClassification`, Swin-* -> `SwinForImageClassification`, R50+ViT-*/p -> transformers'
`BitBackbone` (post-activation bottlenecks with weight standardisation and GroupNorm, stages
(3, 4, 9)) + a 1x1 patch projection + transformers' `ViTLayer` blocks, because transformers 5 no
longer ships a ViT-hybrid class. Shapes come from our own model definition, so the two sides
always build the same network (the parameter counts agree). Activation: tanh-approximate GELU for
ViT (as the published ViT and ours), exact GELU for Swin (as both implementations); attention is
torch's `scaled_dot_product_attention` ("sdpa", transformers' default).

torch and transformers are benchmark-only dependencies (`pip install -e .[torch]`).
"""
from typing import Callable, Tuple

import numpy as np

from vit_jax import models


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("The PyTorch side needs torch and transformers: pip install -e '.[torch]' "
                      "(or run with --no-torch).") from e
  return torch, transformers


def versions() -> dict:
  torch, transformers = _torch()
  return dict(torch=torch.__version__, transformers=transformers.__version__,
              torch_threads=torch.get_num_threads())


def set_threads(n: int) -> int:
  """Gives torch `n` intra-op threads (the number XLA:CPU uses); returns what torch reports."""
  torch, _ = _torch()
  torch.set_num_threads(n)
  return torch.get_num_threads()


def build(name: str, *, num_classes: int = 1000, image_size: int = 224):
  """The transformers model for one of our names (random init, float32)."""
  torch, transformers = _torch()
  ours = models.get_model(name, num_classes=num_classes)
  if type(ours).__name__ == "SwinTransformer":
    cfg = transformers.SwinConfig(
        image_size=image_size, patch_size=ours.patch_size, embed_dim=ours.embed_dim,
        depths=list(ours.depths), num_heads=list(ours.num_heads), window_size=ours.window_size,
        mlp_ratio=ours.mlp_ratio, drop_path_rate=ours.droppath_rate, num_labels=num_classes)
    return transformers.SwinForImageClassification(cfg)
  if type(ours).__name__ != "VisionTransformer":
    raise ValueError(f"No transformers counterpart for {name!r} ({type(ours).__name__}); "
                     "use a ViT-*, R50+ViT-* or Swin-* name.")
  vit_cfg = transformers.ViTConfig(
      hidden_size=ours.hidden_size, intermediate_size=ours.mlp_dim,
      num_attention_heads=ours.num_heads, num_hidden_layers=ours.num_layers,
      image_size=image_size, patch_size=ours.patch_size[0], num_labels=num_classes,
      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
      attn_implementation="sdpa")  # what ViTForImageClassification picks; stated for the hybrid
  if ours.resnet is None:
    return transformers.ViTForImageClassification(vit_cfg)
  return _hybrid(torch, transformers, vit_cfg, tuple(ours.resnet["num_layers"]), image_size)


def _hybrid(torch, transformers, vit_cfg, stages: Tuple[int, ...], image_size: int):
  from transformers.models.vit import modeling_vit  # pylint: disable=g-import-not-at-top
  if not stages:
    raise ValueError("Only hybrids with ResNet stages (e.g. R50+ViT-B/16) have a transformers "
                     "counterpart here.")
  nn = torch.nn
  widths = [256 * 2 ** i for i in range(len(stages))]
  bit_cfg = transformers.BitConfig(
      layer_type="bottleneck", depths=list(stages), hidden_sizes=widths, global_padding="SAME",
      embedding_dynamic_padding=True, out_features=[f"stage{len(stages)}"])
  stride = 4 * 2 ** (len(stages) - 1)
  tokens = (image_size // stride) ** 2 + 1
  d = vit_cfg.hidden_size

  class HybridViT(nn.Module):
    """BiT stem -> 1x1 conv to tokens -> cls + posemb -> ViT blocks -> LayerNorm -> head."""

    def __init__(self):
      super().__init__()
      self.backbone = transformers.BitBackbone(bit_cfg)
      self.proj = nn.Conv2d(widths[-1], d, kernel_size=1)
      self.cls = nn.Parameter(torch.zeros(1, 1, d))
      self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
      self.layers = nn.ModuleList(modeling_vit.ViTLayer(vit_cfg)
                                  for _ in range(vit_cfg.num_hidden_layers))
      self.norm = nn.LayerNorm(d, eps=vit_cfg.layer_norm_eps)
      self.classifier = nn.Linear(d, vit_cfg.num_labels)

    def forward(self, pixel_values):
      x = self.backbone(pixel_values).feature_maps[-1]
      x = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
      for layer in self.layers:
        x = layer(x)
      return _Out(self.classifier(self.norm(x)[:, 0]))

  return HybridViT()


class _Out:
  def __init__(self, logits):
    self.logits = logits


def make_step(name: str, batch: int, *, mode: str, lr: float = 1e-3, weight_decay: float = 0.0,
              grad_clip_norm: float = 1.0, image_size: int = 224, num_classes: int = 1000,
              seed: int = 0, autocast_bf16: bool = False) -> Tuple[Callable[[], None], int]:
  """(step, number of parameters). `step()` runs one train step (forward, cross-entropy,
  backward, global-norm clipping, AdamW, zero_grad) or one inference forward on a fixed random
  batch, and returns when it is done (torch on CPU is synchronous). `autocast_bf16`: the forward
  and loss under `torch.autocast("cpu", dtype=torch.bfloat16)` (float32 weights and optimizer:
  torch's mixed precision, the counterpart of our `dtype=bfloat16`)."""
  torch, _ = _torch()
  import contextlib  # pylint: disable=g-import-not-at-top
  cast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast_bf16
          else contextlib.nullcontext)
  torch.manual_seed(seed)
  model = build(name, num_classes=num_classes, image_size=image_size)
  rng = np.random.default_rng(seed)
  images = torch.from_numpy(rng.standard_normal((batch, 3, image_size, image_size),
                                                dtype=np.float32))
  labels = torch.from_numpy(rng.integers(0, num_classes, batch))
  n_params = sum(p.numel() for p in model.parameters())
  if mode == "inference":
    model.eval()

    def infer():
      with torch.inference_mode(), cast():
        model(pixel_values=images).logits.sum().item()
    return infer, n_params
  if mode != "train":
    raise ValueError(f"mode must be 'train' or 'inference', got {mode!r}.")
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

  def train_step():
    with cast():
      logits = model(pixel_values=images).logits
      loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    if grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
  return train_step, n_params
