"""Box arithmetic on the last axis: (cx, cy, w, h) <-> (x0, y0, x1, y1), areas, pairwise IoU and
generalized IoU (Rezatofighi et al., 2019). Works on jax and numpy arrays alike (jnp ops)."""
import jax.numpy as jnp


def cxcywh_to_xyxy(b):
  cx, cy, w, h = jnp.moveaxis(jnp.asarray(b), -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(b):
  x0, y0, x1, y1 = jnp.moveaxis(jnp.asarray(b), -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def area(b):
  """Area of xyxy boxes (..., 4) -> (...). Degenerate boxes (x1 < x0) get a negative area."""
  b = jnp.asarray(b)
  return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def pairwise_iou(a, b):
  """IoU and union of every pair: xyxy boxes a (..., N, 4), b (..., M, 4) -> two (..., N, M)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a)[..., :, None] + area(b)[..., None, :] - inter
  return inter / union, union


def generalized_iou(a, b):
  """Pairwise generalized IoU of xyxy boxes a (..., N, 4), b (..., M, 4) -> (..., N, M), in
  [-1, 1]: IoU - (C - union) / C, C the area of the smallest box enclosing both.

  Boxes must be proper (x1 >= x0, y1 >= y0) with a positive union; DETR's boxes are, coming from
  a sigmoid width and height. As in DETR, no epsilon: a zero-area pair gives NaN.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  iou, union = pairwise_iou(a, b)
  lt = jnp.minimum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / enclosing
