"""COCO-style mean average precision of boxes, computed as pycocotools' COCOeval does it for
iouType="bbox", area range "all" and maxDets=100, on in-memory detections (no json, no crowd).

Per image and class: detections sorted by score (stable) and cut to `max_dets`; at each IoU
threshold t (0.5, 0.55, ..., 0.95) each detection in turn takes the unmatched ground truth of
highest IoU >= t (of equal ones, the later). Per class over all images: detections sorted by score
(stable, image order first), cumulative true and false positives, precision made non-increasing
from the right, sampled at 101 recall points (0, 0.01, ..., 1; 0 beyond the reached recall). AP
of a (class, threshold) is the mean over the recall points; classes without ground truth are left
out. mAP = the mean over classes and thresholds; mAP@0.5 the mean over classes at t = 0.5.
tests/detection/test_mean_ap.py checks it against pycocotools on random detections.
"""
from typing import Dict, Mapping, Sequence

import numpy as np

IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1)
RECALL_POINTS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1)


def _iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """Pairwise IoU of xyxy boxes (N, 4), (M, 4) -> (N, M), float64."""
  lt = np.maximum(dt[:, None, :2], gt[None, :, :2])
  rb = np.minimum(dt[:, None, 2:], gt[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  union = area(dt)[:, None] + area(gt)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _as_arrays(entry: Mapping, what: str, scores: bool):
  b = np.asarray(entry["boxes"], np.float64).reshape(-1, 4)
  labels = np.asarray(entry["labels"]).reshape(-1)
  if len(labels) != len(b):
    raise ValueError(f"{what}: {len(b)} boxes but {len(labels)} labels.")
  if not scores:
    return b, labels, None
  s = np.asarray(entry["scores"], np.float64).reshape(-1)
  if len(s) != len(b):
    raise ValueError(f"{what}: {len(b)} boxes but {len(s)} scores.")
  return b, labels, s


def coco_map(detections: Sequence[Mapping], ground_truths: Sequence[Mapping], *,
             max_dets: int = 100, iou_thresholds=IOU_THRESHOLDS) -> Dict[str, float]:
  """`detections[i]`: dict(boxes (N, 4) xyxy, scores (N,), labels (N,)) of image i;
  `ground_truths[i]`: dict(boxes (M, 4) xyxy, labels (M,)). Units are free (pixels or relative)
  but must agree. Returns `map` (mAP@[.5:.95]), `map50`, `map75` (when 0.75 is a threshold) and
  `num_classes` (classes with ground truth); `map` is -1 when no image has ground truth."""
  if len(detections) != len(ground_truths):
    raise ValueError(f"coco_map: {len(detections)} images of detections but "
                     f"{len(ground_truths)} of ground truth.")
  thresholds = np.asarray(iou_thresholds, np.float64)
  # per class: lists of (scores, matched (T, n) bool) per image, and the count of ground truths
  per_class: Dict[int, list] = {}
  num_gt: Dict[int, int] = {}
  for i, (det, gt) in enumerate(zip(detections, ground_truths)):
    db, dl, ds = _as_arrays(det, f"detections[{i}]", True)
    gb, gl, _ = _as_arrays(gt, f"ground_truths[{i}]", False)
    for c in np.unique(np.concatenate([dl, gl])):
      c = int(c)
      g = gb[gl == c]
      num_gt[c] = num_gt.get(c, 0) + len(g)
      sel = np.flatnonzero(dl == c)
      order = np.argsort(-ds[sel], kind="mergesort")[:max_dets]
      d, s = db[sel][order], ds[sel][order]
      ious = _iou(d, g) if len(d) and len(g) else np.zeros((len(d), len(g)))
      matched = np.zeros((len(thresholds), len(d)), bool)
      for ti, t in enumerate(thresholds):
        taken = np.zeros(len(g), bool)
        for di in range(len(d)):
          best, m = min(t, 1 - 1e-10), -1
          for gi in range(len(g)):
            if taken[gi] or ious[di, gi] < best:
              continue
            best, m = ious[di, gi], gi
          if m >= 0:
            taken[m] = True
            matched[ti, di] = True
      per_class.setdefault(c, []).append((s, matched))

  ap = []  # (classes with ground truth, thresholds)
  for c in sorted(per_class):
    if not num_gt[c]:
      continue
    scores = np.concatenate([s for s, _ in per_class[c]])
    matched = np.concatenate([m for _, m in per_class[c]], axis=1)
    order = np.argsort(-scores, kind="mergesort")
    matched = matched[:, order]
    row = []
    for tps in matched:
      tp = np.cumsum(tps, dtype=np.float64)
      fp = np.cumsum(~tps, dtype=np.float64)
      recall = tp / num_gt[c]
      precision = tp / (fp + tp + np.spacing(1))
      precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
      idx = np.searchsorted(recall, RECALL_POINTS, side="left")
      q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)]
                   if len(precision) else 0.0, 0.0)
      row.append(q.mean())
    ap.append(row)
  if not ap:
    return {"map": -1.0, "map50": -1.0, "num_classes": 0}
  ap = np.asarray(ap)
  out = {"map": float(ap.mean()), "num_classes": len(ap)}
  for name, t in (("map50", 0.5), ("map75", 0.75)):
    hit = np.flatnonzero(np.isclose(thresholds, t))
    if len(hit):
      out[name] = float(ap[:, hit[0]].mean())
  return out
