"""Tests for vit_jax/detection/mean_ap.py: hand-computed cases and equality with pycocotools'
COCOeval on random detections."""
import contextlib
import io

import numpy as np
import pytest

from vit_jax.detection import mean_ap


def test_perfect_detections_score_one():
  gt = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 30]], "labels": [1, 2]}]
  det = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 30]], "labels": [1, 2], "scores": [0.9, 0.8]}]
  out = mean_ap.coco_map(det, gt)
  # 1 up to COCO's epsilon in precision = tp / (tp + fp + eps).
  assert out == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0, "num_classes": 2},
                              abs=1e-12)


def test_hand_computed_precision_recall():
  # One class, two objects. Detections by score: a hit on object A (IoU 1), a miss (no overlap),
  # a hit on object B with IoU 0.6 (a box of width 6 inside B's 10): precision 1, 1/2, 2/3 at
  # recall 1/2, 1/2, 1. Made non-increasing from the right: 1 for recall <= 1/2, 2/3 above. At
  # t = 0.5: AP = (51 * 1 + 50 * 2/3) / 101; at t >= 0.65 B is missed: AP = 51 / 101.
  gt = [{"boxes": [[0, 0, 10, 10], [50, 0, 60, 10]], "labels": [0, 0]}]
  det = [{"boxes": [[0, 0, 10, 10], [100, 100, 110, 110], [50, 0, 56, 10]], "labels": [0, 0, 0],
          "scores": [0.9, 0.8, 0.7]}]
  out = mean_ap.coco_map(det, gt)
  ap50 = (51 + 50 * 2 / 3) / 101
  np.testing.assert_allclose(out["map50"], ap50)
  # thresholds 0.5, 0.55, 0.6 still match B (IoU 0.6 >= 0.6); 0.65 ... 0.95 do not.
  np.testing.assert_allclose(out["map"], (3 * ap50 + 7 * 51 / 101) / 10)


def test_images_are_pooled_per_class_not_averaged():
  # Image A: a hit (IoU 1) at score 0.9; image B: a miss at 0.95, its object undetected. Pooled:
  # a miss then a hit over 2 objects, precision 0, 1/2 at recall 0, 1/2, made 1/2 at every
  # recall point up to 1/2: AP = 51 * 0.5 / 101 at every threshold (A alone: 1, B alone: 0; their
  # mean, 1/2, would be wrong).
  gt = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}, {"boxes": [[20, 20, 30, 30]], "labels": [0]}]
  det = [{"boxes": [[0, 0, 10, 10]], "labels": [0], "scores": [0.9]},
         {"boxes": [[50, 50, 60, 60]], "labels": [0], "scores": [0.95]}]
  out = mean_ap.coco_map(det, gt)
  assert out == pytest.approx({"map": 25.5 / 101, "map50": 25.5 / 101, "map75": 25.5 / 101,
                               "num_classes": 1}, abs=1e-12)
  assert mean_ap.coco_map(det[:1], gt[:1])["map"] == pytest.approx(1.0, abs=1e-12)
  assert mean_ap.coco_map(det[1:], gt[1:])["map"] == 0.0


def test_class_without_ground_truth_is_left_out_and_one_without_detections_counts_zero():
  gt = [{"boxes": [[0, 0, 10, 10], [0, 0, 5, 5]], "labels": [0, 1]}]
  det = [{"boxes": [[0, 0, 10, 10], [30, 30, 40, 40]], "labels": [0, 2], "scores": [0.5, 0.9]}]
  out = mean_ap.coco_map(det, gt)
  assert out["num_classes"] == 2  # class 0: AP 1, class 1: AP 0, class 2 (no objects) left out
  np.testing.assert_allclose(out["map"], 0.5)
  assert mean_ap.coco_map([{"boxes": [], "labels": [], "scores": []}],
                          [{"boxes": [], "labels": []}])["map"] == -1.0


def test_mismatched_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="2 images of detections but 1 of ground truth"):
    mean_ap.coco_map([{}, {}], [{}])
  with pytest.raises(ValueError, match=r"detections\[0\]: 1 boxes but 2 scores"):
    mean_ap.coco_map([{"boxes": [[0, 0, 1, 1]], "labels": [0], "scores": [1, 2]}],
                     [{"boxes": [], "labels": []}])


def _random_case(rng, num_images, num_classes):
  gts, dets = [], []
  for _ in range(num_images):
    n = rng.integers(0, 6)
    xy = rng.uniform(0, 80, (n, 2))
    gb = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], 1).round(1)
    gl = rng.integers(0, num_classes, n)
    # Detections: jittered copies of some objects (some with the wrong class), plus noise boxes.
    keep = rng.random(n) < 0.8
    jitter = gb[keep] + rng.normal(0, 3, (keep.sum(), 4))
    dl = np.where(rng.random(keep.sum()) < 0.8, gl[keep], rng.integers(0, num_classes,
                                                                       keep.sum()))
    m = rng.integers(0, 4)
    xy = rng.uniform(0, 80, (m, 2))
    noise = np.concatenate([xy, xy + rng.uniform(5, 40, (m, 2))], 1)
    db = np.concatenate([jitter, noise]).round(2)
    db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 0.5)
    dets.append({"boxes": db, "labels": np.concatenate([dl, rng.integers(0, num_classes, m)]),
                 "scores": rng.random(len(db)).round(3)})  # rounding makes some ties
    gts.append({"boxes": gb, "labels": gl})
  return dets, gts


def _pycocotools(dets, gts, num_classes):
  coco = pytest.importorskip("pycocotools.coco")
  cocoeval = pytest.importorskip("pycocotools.cocoeval")
  xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
  anns, results = [], []
  for i, (d, g) in enumerate(zip(dets, gts)):
    for b, l in zip(g["boxes"], g["labels"]):
      w, h = b[2] - b[0], b[3] - b[1]
      anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(l), "bbox": xywh(b),
                   "area": float(w * h), "iscrowd": 0})
    for b, l, s in zip(d["boxes"], d["labels"], d["scores"]):
      results.append({"image_id": i, "category_id": int(l), "bbox": xywh(b), "score": float(s)})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco.COCO()
    gt.dataset = {"images": [{"id": i} for i in range(len(gts))], "annotations": anns,
                  "categories": [{"id": c} for c in range(num_classes)]}
    gt.createIndex()
    dt = gt.loadRes(results)
    ev = cocoeval.COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  # precision (thresholds, recall points, classes, area ranges, maxDets); -1: class left out
  precision = ev.eval["precision"][:, :, :, 0, -1]
  return ev.stats, precision[precision > -1].mean()


@pytest.mark.parametrize("seed", range(3))
def test_equals_pycocotools_on_random_detections(seed):
  rng = np.random.default_rng(seed)
  dets, gts = _random_case(rng, num_images=12, num_classes=4)
  stats, _ = _pycocotools(dets, gts, 4)
  out = mean_ap.coco_map(dets, gts)
  assert 0.05 < out["map"] < 0.95  # a case that is neither trivial nor empty
  np.testing.assert_allclose([out["map"], out["map50"], out["map75"]], stats[:3], atol=1e-12)


def test_max_dets_cuts_per_image_and_class_like_pycocotools():
  rng = np.random.default_rng(5)
  dets, gts = _random_case(rng, num_images=6, num_classes=2)
  # Several detections for some (image, class): max_dets=1 must keep the same ones.
  stats_all = mean_ap.coco_map(dets, gts)
  cut = mean_ap.coco_map(dets, gts, max_dets=1)
  assert cut["map"] < stats_all["map"]
  ref = _pycocotools_maxdets(dets, gts, 2, 1)
  np.testing.assert_allclose(cut["map"], ref, atol=1e-12)


def _pycocotools_maxdets(dets, gts, num_classes, max_dets):
  cocoeval = pytest.importorskip("pycocotools.cocoeval")
  original = cocoeval.Params.setDetParams

  def params(self):
    original(self)
    self.maxDets = [max_dets, max_dets, max_dets]
  cocoeval.Params.setDetParams = params
  try:
    return _pycocotools(dets, gts, num_classes)[1]
  finally:
    cocoeval.Params.setDetParams = original
