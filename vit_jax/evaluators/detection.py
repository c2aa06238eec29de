"""COCO-style mAP of a DETR-style model over a data set (vit_jax/detection/mean_ap.py).

Post-processing as DETR's: per prediction, softmax over the K+1 classes; the score is the largest
probability of a real class and the label its class (the "no object" probability is dropped, not
thresholded); every one of the Q predictions is a detection (Q <= 100 = COCO's maxDets). Boxes
stay relative (cx, cy, w, h -> x0, y0, x1, y1 in [0, 1]): IoU does not change when both axes are
scaled, so mAP needs no image sizes.
"""
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from vit_jax import evaluators
from vit_jax.detection import mean_ap


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _xyxy(b):
  cx, cy, w, h = np.moveaxis(b, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def postprocess(logits: np.ndarray, boxes: np.ndarray):
  """logits (B, Q, K+1), boxes (B, Q, 4) cxcywh -> per image dict(boxes xyxy, scores, labels)."""
  prob = _softmax(np.asarray(logits, np.float64))[..., :-1]
  xyxy = _xyxy(np.asarray(boxes, np.float64))
  return [{"boxes": xyxy[i], "scores": prob[i].max(-1), "labels": prob[i].argmax(-1)}
          for i in range(len(prob))]


def ground_truth(batch) -> list:
  """Padded targets (labels (B, T), boxes (B, T, 4) cxcywh, mask (B, T)) -> per image dicts."""
  boxes, labels, mask = (np.asarray(batch[k]) for k in ("boxes", "labels", "mask"))
  return [{"boxes": _xyxy(boxes[i][mask[i]].astype(np.float64)), "labels": labels[i][mask[i]]}
          for i in range(len(boxes))]


class DetectionEvaluator:
  """`predict_fn(params, batch) -> {"logits", "boxes", ...}` (device or numpy values; `fetch`
  turns them into numpy), run over every batch of `batches()` (a fresh iterable per run). A batch
  holds the targets (`labels`, `boxes`, `mask`) and, for a padded last batch, `valid` (B,): the
  examples that count."""

  def __init__(self, predict_fn: Callable, batches: Callable[[], Iterable[Dict]], *,
               fetch: Callable = np.asarray, max_dets: int = 100,
               should_stop: Optional[Callable[[], bool]] = None):
    self.predict_fn, self.batches, self.fetch = predict_fn, batches, fetch
    self.max_dets, self.should_stop = max_dets, should_stop

  def run(self, params) -> Dict[str, float]:
    dets, gts = [], []
    for batch in self.batches():
      evaluators.check(self.should_stop)
      out = self.predict_fn(params, batch)
      valid = np.asarray(batch.get("valid", np.ones(len(batch["labels"]), bool)), bool)
      for keep, d, g in zip(valid, postprocess(self.fetch(out["logits"]),
                                               self.fetch(out["boxes"])), ground_truth(batch)):
        if keep:
          dets.append(d)
          gts.append(g)
    result = mean_ap.coco_map(dets, gts, max_dets=self.max_dets)
    result["num_images"] = len(dets)
    return result
