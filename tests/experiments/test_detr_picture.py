"""experiments/detr_picture.py: which queries count as detections, what counts as found, and the
PNG. (tests/test_train_detr.py runs it on a trained workdir, with `make test-all`.)"""
import types

import numpy as np

from experiments import detr_picture


def test_found_needs_the_class_and_iou_half():
  gt_boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
  gt_labels = np.array([3, 7])
  det = dict(boxes=np.array([[0.0, 0.0, 0.5, 0.4],     # IoU 0.8 with the first, class 3: found
                             [0.5, 0.5, 1.0, 1.0]]),   # the second's box, but class 2: not found
             labels=np.array([3, 2]), scores=np.array([0.9, 0.9]))
  assert detr_picture.found(det, gt_boxes, gt_labels) == 1
  det["labels"] = np.array([3, 7])
  assert detr_picture.found(det, gt_boxes, gt_labels) == 2
  det["boxes"] = np.array([[0.0, 0.0, 0.25, 0.5], [0.5, 0.5, 1.0, 1.0]])  # IoU 0.5 exactly
  assert detr_picture.found(det, gt_boxes, gt_labels) == 2
  det["boxes"] = np.array([[0.0, 0.0, 0.2, 0.5], [0.5, 0.5, 1.0, 1.0]])  # IoU 0.4
  assert detr_picture.found(det, gt_boxes, gt_labels) == 1
  # One object, three detections of it: found once (at most the number of objects).
  three = dict(boxes=np.array([[0.0, 0.0, 0.5, 0.5]] * 3), labels=np.array([3, 3, 3]),
               scores=np.ones(3))
  assert detr_picture.found(three, gt_boxes[:1], gt_labels[:1]) == 1
  empty = dict(boxes=np.zeros((0, 4)), labels=np.zeros(0, int), scores=np.zeros(0))
  assert detr_picture.found(empty, gt_boxes, gt_labels) == 0


def _predictor(logits, boxes):
  model = types.SimpleNamespace(
      apply=lambda variables, x, mask, train: {"logits": logits, "boxes": boxes})
  return types.SimpleNamespace(model=model, variables={}, preprocess=lambda x: x)


def test_detections_keep_confident_real_classes_as_xyxy():
  # One canvas, three queries over 2 real classes + "no object".
  logits = np.log(np.array([[[0.8, 0.1, 0.1],     # class 0 at 0.8: kept
                             [0.1, 0.1, 0.8],     # "no object": dropped
                             [0.3, 0.4, 0.3]]]))  # class 1 at 0.4 < 0.5: dropped
  boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 1.0, 1.0], [0.2, 0.2, 0.1, 0.1]]])
  batch = {"image": np.zeros((1, 8, 8, 1), np.uint8), "image_mask": np.ones((1, 8, 8), bool)}
  (det,) = detr_picture.detections(_predictor(logits, boxes), batch, threshold=0.5)
  np.testing.assert_array_equal(det["labels"], [0])
  np.testing.assert_allclose(det["scores"], [0.8])
  np.testing.assert_allclose(det["boxes"], [[0.4, 0.3, 0.6, 0.7]])  # cx, cy, w, h -> x0 y0 x1 y1


def test_draw_writes_a_png(tmp_path):
  images = np.zeros((2, 32, 32, 1), np.uint8)
  gts = [(np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([1]))] * 2
  det = dict(boxes=np.array([[0.1, 0.1, 0.5, 0.6]]), labels=np.array([1]), scores=np.array([0.7]))
  out = tmp_path / "p.png"
  detr_picture.draw(str(out), images, gts, [det, det], ["a", "b"], columns=2)
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_of_another_loss_is_named_before_its_checkpoint_is_read(tmp_path, capsys):
  (tmp_path / "config.json").write_text('{"loss": "classification"}')  # no checkpoint at all
  assert detr_picture.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'p.png'}"]) == 2
  assert "is not a DETR run (its config's loss is 'classification')" in capsys.readouterr().err
  assert not (tmp_path / "p.png").exists()
