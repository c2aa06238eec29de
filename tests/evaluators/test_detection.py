"""Tests for vit_jax/evaluators/detection.py: post-processing, perfect and noisy predictions
against mean_ap directly, padded batches, stopping, and the gathering of rows across processes
(2 processes: tests/evaluators/test_detection_multihost.py)."""
import numpy as np
import pytest

from vit_jax import evaluators
from vit_jax.detection import mean_ap
from vit_jax.evaluators import detection


def _batches(rng, n_batches=3, b=4, t=3, k=5):
  out = []
  for _ in range(n_batches):
    xy = rng.uniform(0.2, 0.8, (b, t, 2))
    out.append({"labels": rng.integers(0, k, (b, t)),
                "boxes": np.concatenate([xy, rng.uniform(0.05, 0.3, (b, t, 2))], -1),
                "mask": rng.random((b, t)) < 0.7})
  return out


def _perfect(q=6, k=5, noise=0.0, seed=0):
  """A predict_fn that puts each real object in a query with its class, the rest "no object"."""
  rng = np.random.default_rng(seed)

  def predict(params, batch):
    del params
    b, t = batch["labels"].shape
    logits = np.full((b, q, k + 1), -5.0)
    logits[..., k] = 5.0
    boxes = np.full((b, q, 4), 0.5)
    for i in range(b):
      for j in np.flatnonzero(batch["mask"][i]):
        logits[i, j] = -5.0
        logits[i, j, batch["labels"][i, j]] = 5.0 + rng.normal()
        boxes[i, j] = batch["boxes"][i, j] + noise * rng.normal(size=4)
    return {"logits": logits, "boxes": boxes}
  return predict


def test_postprocess_drops_no_object_and_converts_boxes():
  logits = np.log(np.array([[[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]]))
  dets = detection.postprocess(logits, np.array([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.2, 0.2]]]))
  np.testing.assert_allclose(dets[0]["scores"], [0.3, 0.6])
  np.testing.assert_array_equal(dets[0]["labels"], [1, 0])
  np.testing.assert_allclose(dets[0]["boxes"], [[0.4, 0.3, 0.6, 0.7], [0.0, 0.1, 0.2, 0.3]])


def test_perfect_predictions_score_one_and_noisy_ones_match_mean_ap():
  data = _batches(np.random.default_rng(0))
  out = detection.DetectionEvaluator(_perfect(), lambda: data).run(None)
  assert out["num_images"] == 12 and out["map"] == pytest.approx(1.0, abs=1e-12)
  noisy = _perfect(noise=0.02, seed=1)
  got = detection.DetectionEvaluator(noisy, lambda: data).run(None)
  noisy = _perfect(noise=0.02, seed=1)  # the same draws again
  dets, gts = [], []
  for batch in data:
    out = noisy(None, batch)
    dets += detection.postprocess(out["logits"], out["boxes"])
    gts += detection.ground_truth(batch)
  want = mean_ap.coco_map(dets, gts)
  assert 0.2 < got["map"] < 0.95 and got["map"] == want["map"] and got["map50"] == want["map50"]


def test_padded_examples_do_not_count_and_stop_is_checked():
  data = _batches(np.random.default_rng(2), n_batches=1)
  data[0]["valid"] = np.array([True, True, False, False])
  # Noisy predictions, the first two images' drawn first: the mAP of those two images alone.
  out = detection.DetectionEvaluator(_perfect(noise=0.02, seed=3), lambda: data).run(None)
  alone = [{k: v[:2] for k, v in data[0].items()}]
  want = detection.DetectionEvaluator(_perfect(noise=0.02, seed=3), lambda: alone).run(None)
  everything = dict(data[0], valid=np.ones(4, bool))
  padded_too = detection.DetectionEvaluator(_perfect(noise=0.02, seed=3),
                                            lambda: [everything]).run(None)
  assert out["num_images"] == 2 and out == want and padded_too["map"] != out["map"]
  with pytest.raises(evaluators.Stopped):
    detection.DetectionEvaluator(_perfect(), lambda: data, should_stop=lambda: True).run(None)


def test_gather_rows_keeps_every_bit_and_the_process_order():
  # Two "processes" of 3 rows each; the allgather gets bytes and returns (2, 3, bytes).
  rng = np.random.default_rng(4)
  parts = [{"scores": rng.random((3, 5)), "labels": rng.integers(0, 2 ** 40, (3, 5)),
            "valid": rng.random(3) < 0.5, "boxes": rng.random((3, 5, 4)).astype(np.float32)}
           for _ in range(2)]
  for key in parts[0]:
    sent = []

    def allgather(x, key=key):
      sent.append(x.dtype)
      return np.stack([p[key].view(np.uint8).reshape(3, -1) for p in parts])
    got = detection.gather_rows(parts[0][key], allgather)
    assert sent == [np.uint8] and got.dtype == parts[0][key].dtype
    np.testing.assert_array_equal(got, np.concatenate([p[key] for p in parts]))
  empty = detection.gather_rows(np.zeros((0, 5)), lambda y: np.stack([y, y]))
  assert empty.shape == (0, 5) and empty.dtype == np.float64
