"""Hungarian matching of DETR's predictions to the ground-truth objects, image by image.

Cost of giving prediction q the object t (DETR, Carion et al. 2020, sec. 3.1):
    class_weight * -p_q(label_t) + bbox_weight * |box_q - box_t|_1 - giou_weight * GIoU(q, t)
with p the softmax over the K+1 classes and boxes in (cx, cy, w, h) for the L1 term; the assignment
minimising the summed cost matches every object to a distinct prediction (Q >= objects).

Where the assignment is solved, and why: on the host, by scipy's exact solver
(`scipy.optimize.linear_sum_assignment`), called from inside jit through `jax.pure_callback`. The
costs are computed on the device with the rest of the step; only the small (B, Q, T) cost array
goes to the host and a (B, T) index array comes back, so the whole train step (forward, matching,
loss, gradients) stays one jitted function, which is what the trainer compiles. An exact O(n^3)
solve of 100 x <=100 costs about a millisecond per image on the host, while a jittable
alternative is either approximate (auction, Sinkhorn) or a long sequential `while_loop` that
runs slowly on accelerators; the matching has no gradient either way (costs are stop-gradient'ed).
The price is a host round trip per step (and, under sharding, a gather of the costs).

Targets are padded to a fixed T objects per image: `labels` (B, T) int, `boxes` (B, T, 4)
(cx, cy, w, h), `mask` (B, T) bool, True for real objects.
"""
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from vit_jax.detection import boxes as box_ops

# A non-finite cost (a NaN prediction) is replaced by this before the solver, which rejects
# non-finite input; the loss itself still carries the NaN, so the trainer's checks see it.
_BAD_COST = 1e9


def cost_matrix(logits, pred_boxes, tgt_labels, tgt_boxes, *, class_weight: float = 1.0,
                bbox_weight: float = 5.0, giou_weight: float = 2.0):
  """DETR's matching cost (B, Q, T) of logits (B, Q, K+1), pred_boxes (B, Q, 4) against
  tgt_labels (B, T), tgt_boxes (B, T, 4); padded targets get finite costs (ignored later)."""
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (B, Q, K+1)
  cost_class = -jnp.take_along_axis(prob, jnp.broadcast_to(
      tgt_labels[:, None, :], prob.shape[:2] + tgt_labels.shape[1:]).astype(jnp.int32), axis=-1)
  cost_bbox = jnp.abs(pred_boxes[:, :, None, :] - tgt_boxes[:, None, :, :]).sum(-1)
  safe_tgt = jnp.where(box_ops.area(box_ops.cxcywh_to_xyxy(tgt_boxes))[..., None] > 0, tgt_boxes,
                       jnp.asarray([0.5, 0.5, 1.0, 1.0], tgt_boxes.dtype))
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred_boxes),
                                 box_ops.cxcywh_to_xyxy(safe_tgt))
  return class_weight * cost_class + bbox_weight * cost_bbox - giou_weight * giou


def assign(cost: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Optimal assignment per image on the host: cost (B, Q, T), mask (B, T) -> (B, T) int32, the
  prediction matched to each real target and -1 for padding."""
  cost, mask = np.asarray(cost, np.float64), np.asarray(mask, bool)
  b, q, t = cost.shape
  out = np.full((b, t), -1, np.int32)
  for i in range(b):
    cols = np.flatnonzero(mask[i])
    if not len(cols):
      continue
    if len(cols) > q:
      raise ValueError(f"Image {i} has {len(cols)} objects but the model makes only {q} "
                       "predictions; raise num_queries or keep fewer objects per image.")
    c = cost[i][:, cols]
    c = np.where(np.isfinite(c), c, _BAD_COST)
    rows, picked = scipy.optimize.linear_sum_assignment(c)
    out[i, cols[picked]] = rows
  return out


def hungarian_match(logits, pred_boxes, targets, **weights):
  """(B, T) int32: for each real target the index of its prediction, -1 for padding. Jittable
  (the solver runs on the host through `jax.pure_callback`); no gradient flows through it."""
  cost = jax.lax.stop_gradient(cost_matrix(logits, pred_boxes, targets["labels"],
                                           targets["boxes"], **weights))
  mask = targets["mask"].astype(bool)
  return jax.pure_callback(assign, jax.ShapeDtypeStruct(mask.shape, jnp.int32), cost, mask,
                           vmap_method="sequential")
