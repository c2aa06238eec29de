"""DETR's set prediction loss (Carion et al., 2020): Hungarian matching, then cross-entropy over
all predictions (matched ones to their object's class, the rest to "no object", whose weight is
`eos_coef` = 0.1), and for matched ones the L1 distance of (cx, cy, w, h) (weight 5) and 1 - GIoU
(weight 2); the same for every auxiliary decoder output, each with its own matching, all summed.

Normalisation as DETR's: the cross-entropy is torch's weighted mean, sum(w * nll) / sum(w) over
all B * Q predictions; the box terms are summed over matched pairs and divided by the number of
real objects in the (global) batch, at least 1. Under jit the batch is the global one, so this
is DETR's count averaged over workers.

`outputs`: the model's dict (`logits` (B, Q, K+1), `boxes` (B, Q, 4), optionally `aux_logits`
(L-1, B, Q, K+1), `aux_boxes`); `targets`: `labels` (B, T), `boxes` (B, T, 4) (cx, cy, w, h),
`mask` (B, T) (see vit_jax/detection/matching.py).
"""
from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from vit_jax.detection import boxes as box_ops
from vit_jax.detection import matching

_SAFE_BOX = (0.5, 0.5, 1.0, 1.0)  # stands in for padding, so that no NaN enters the gradient


def _check(outputs, targets):
  for key in ("labels", "boxes", "mask"):
    if key not in targets:
      raise ValueError(f"DETR targets lack {key!r}; they need labels (B, T), boxes (B, T, 4) "
                       f"(cx, cy, w, h) and mask (B, T). Got keys {sorted(targets)}.")
  b, q, _ = outputs["logits"].shape
  if targets["boxes"].shape[:1] != (b,) or targets["boxes"].shape[-1] != 4:
    raise ValueError(f"DETR target boxes have shape {targets['boxes'].shape}; need (B={b}, T, 4).")


def layer_losses(logits, pred_boxes, targets, *, eos_coef: float = 0.1, class_weight=1.0,
                 bbox_weight=5.0, giou_weight=2.0, num_boxes=None) -> Dict[str, jax.Array]:
  """Unweighted `loss_ce`, `loss_bbox`, `loss_giou` of one decoder layer's predictions."""
  num_classes = logits.shape[-1] - 1
  mask = targets["mask"].astype(bool)
  if num_boxes is None:
    num_boxes = jnp.maximum(mask.sum(), 1).astype(jnp.float32)
  match = matching.hungarian_match(logits, pred_boxes, targets, class_weight=class_weight,
                                   bbox_weight=bbox_weight, giou_weight=giou_weight)  # (B, T)
  q = logits.shape[1]
  assigned = (match[:, :, None] == jnp.arange(q)) & mask[:, :, None]  # (B, T, Q)
  labels = targets["labels"].astype(jnp.int32)
  target_classes = jnp.where(assigned.any(1), (assigned * labels[:, :, None]).sum(1),
                             num_classes)  # (B, Q)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target_classes[..., None], axis=-1)[..., 0]
  w = jnp.where(target_classes == num_classes, eos_coef, 1.0)
  loss_ce = (w * nll).sum() / w.sum()

  matched = jnp.einsum("btq,bqc->btc", assigned.astype(pred_boxes.dtype), pred_boxes)
  safe = jnp.asarray(_SAFE_BOX, pred_boxes.dtype)
  src = jnp.where(mask[..., None], matched, safe)
  tgt = jnp.where(mask[..., None], targets["boxes"].astype(pred_boxes.dtype), safe)
  loss_bbox = (jnp.abs(src - tgt).sum(-1) * mask).sum() / num_boxes
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(src)[..., None, :],
                                 box_ops.cxcywh_to_xyxy(tgt)[..., None, :])[..., 0, 0]
  loss_giou = ((1 - giou) * mask).sum() / num_boxes
  return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


def detr_loss(outputs, targets, *, eos_coef: float = 0.1, class_weight: float = 1.0,
              bbox_weight: float = 5.0, giou_weight: float = 2.0,
              aux: bool = True) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """(loss, metrics): the weighted sum over the last layer and, with `aux`, every auxiliary one;
  metrics hold the last layer's unweighted terms and `loss`. The matching cost uses the same
  weights as the loss (class 1, L1 5, GIoU 2: DETR's)."""
  _check(outputs, targets)
  kw = dict(eos_coef=eos_coef, class_weight=class_weight, bbox_weight=bbox_weight,
            giou_weight=giou_weight,
            num_boxes=jnp.maximum(targets["mask"].astype(bool).sum(), 1).astype(jnp.float32))
  weighted = lambda t: (class_weight * t["loss_ce"] + bbox_weight * t["loss_bbox"]
                        + giou_weight * t["loss_giou"])
  last = layer_losses(outputs["logits"], outputs["boxes"], targets, **kw)
  loss = weighted(last)
  metrics = dict(last)
  if aux and "aux_logits" in outputs:
    for i in range(outputs["aux_logits"].shape[0]):
      terms = layer_losses(outputs["aux_logits"][i], outputs["aux_boxes"][i], targets, **kw)
      loss = loss + weighted(terms)
  metrics["loss"] = loss
  return loss, metrics
