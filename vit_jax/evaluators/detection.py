"""COCO-style mAP of a DETR-style model over a data set (vit_jax/detection/mean_ap.py).

Post-processing as DETR's: per prediction, softmax over the K+1 classes; the score is the largest
probability of a real class and the label its class (the "no object" probability is dropped, not
thresholded); every one of the Q predictions is a detection (Q <= 100 = COCO's maxDets). Boxes
stay relative (cx, cy, w, h -> x0, y0, x1, y1 in [0, 1]): IoU does not change when both axes are
scaled, so mAP needs no image sizes.

With several processes each one post-processes its own rows (its contiguous part of the split,
vit_jax/data/pipeline.py's eval_iterator); the detections and targets of every process are then
gathered to all of them, bit for bit, and the mAP is that of the whole split in split order, as
one process computes it (padded rows left out).
"""
from typing import Callable, Dict, Iterable, Optional

import numpy as np

from vit_jax import evaluators
from vit_jax.detection import mean_ap
from vit_jax.evaluators import fewshot


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _xyxy(b):
  cx, cy, w, h = np.moveaxis(b, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _detection_arrays(logits: np.ndarray, boxes: np.ndarray) -> Dict[str, np.ndarray]:
  """logits (B, Q, K+1), boxes (B, Q, 4) cxcywh -> boxes xyxy (B, Q, 4), scores and labels
  (B, Q)."""
  prob = _softmax(np.asarray(logits, np.float64))[..., :-1]
  return {"boxes": _xyxy(np.asarray(boxes, np.float64)), "scores": prob.max(-1),
          "labels": prob.argmax(-1)}


def _per_image(arrays: Dict[str, np.ndarray]) -> list:
  return [{k: v[i] for k, v in arrays.items()} for i in range(len(arrays["labels"]))]


def postprocess(logits: np.ndarray, boxes: np.ndarray):
  """logits (B, Q, K+1), boxes (B, Q, 4) cxcywh -> per image dict(boxes xyxy, scores, labels)."""
  return _per_image(_detection_arrays(logits, boxes))


def ground_truth(batch) -> list:
  """Padded targets (labels (B, T), boxes (B, T, 4) cxcywh, mask (B, T)) -> per image dicts."""
  boxes, labels, mask = (np.asarray(batch[k]) for k in ("boxes", "labels", "mask"))
  return [{"boxes": _xyxy(boxes[i][mask[i]].astype(np.float64)), "labels": labels[i][mask[i]]}
          for i in range(len(boxes))]


def gather_rows(x: np.ndarray, allgather: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """This process's rows (n, ...) -> every process's, in process order (P * n, ...), with the
  same dtype and bits: `allgather` ((n, ...) -> (P, n, ...), the same n on every process) is given
  the rows as bytes, so float64 scores and int64 labels survive JAX's 32-bit default."""
  x = np.ascontiguousarray(x)
  raw = x.view(np.uint8).reshape(len(x), x[:1].nbytes if len(x) else 0)
  return np.asarray(allgather(raw)).reshape(-1).view(x.dtype).reshape((-1,) + x.shape[1:])


class DetectionEvaluator:
  """`predict_fn(params, batch) -> {"logits", "boxes", ...}` (device or numpy values; `fetch`
  turns them into numpy, this process's rows), run over every batch of `batches()` (a fresh
  iterable per run; this process's part of the split). A batch holds the targets (`labels`,
  `boxes`, `mask`) and, for a padded last batch, `valid` (B,): the examples that count.
  `allgather` ((n, ...) -> (P, n, ...) across the P processes; by default JAX's, identity with
  one process) collects every process's rows before the mAP, so every process returns the mAP of
  the whole split; every process must run the same number of batches of the same shapes."""

  def __init__(self, predict_fn: Callable, batches: Callable[[], Iterable[Dict]], *,
               fetch: Callable = np.asarray, max_dets: int = 100,
               should_stop: Optional[Callable[[], bool]] = None,
               allgather: Optional[Callable[[np.ndarray], np.ndarray]] = None):
    self.predict_fn, self.batches, self.fetch = predict_fn, batches, fetch
    self.max_dets, self.should_stop = max_dets, should_stop
    self.allgather = allgather or fewshot._process_allgather  # pylint: disable=protected-access

  def run(self, params) -> Dict[str, float]:
    local = []  # per batch: this process's detections, targets and `valid`, (B, ...) arrays
    for batch in self.batches():
      evaluators.check(self.should_stop)
      out = self.predict_fn(params, batch)
      rows = {f"det_{k}": v for k, v in _detection_arrays(self.fetch(out["logits"]),
                                                          self.fetch(out["boxes"])).items()}
      rows.update({k: np.asarray(batch[k]) for k in ("boxes", "labels", "mask")})
      rows["valid"] = np.asarray(batch.get("valid", np.ones(len(batch["labels"]), bool)), bool)
      local.append(rows)
    dets, gts = [], []
    if local:
      rows = {k: gather_rows(np.concatenate([r[k] for r in local]), self.allgather)
              for k in local[0]}
      keep = rows.pop("valid")
      rows = {k: v[keep] for k, v in rows.items()}
      dets = _per_image({k[len("det_"):]: v for k, v in rows.items() if k.startswith("det_")})
      gts = ground_truth(rows)
    result = mean_ap.coco_map(dets, gts, max_dets=self.max_dets)
    result["num_images"] = len(dets)
    return result
