"""Tests for vit_jax/detection/boxes.py: conversions, IoU and GIoU against hand-computed values."""
import numpy as np

from vit_jax.detection import boxes


def test_conversions_round_trip():
  b = np.array([[0.5, 0.4, 0.2, 0.6], [0.1, 0.9, 0.05, 0.1]])
  xyxy = np.asarray(boxes.cxcywh_to_xyxy(b))
  np.testing.assert_allclose(xyxy, [[0.4, 0.1, 0.6, 0.7], [0.075, 0.85, 0.125, 0.95]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(boxes.xyxy_to_cxcywh(xyxy)), b, atol=1e-7)


def test_iou_and_giou_hand_computed():
  a = np.array([[0., 0., 2., 2.]])
  b = np.array([
      [1., 1., 3., 3.],  # overlap 1, union 7, hull 9: IoU 1/7, GIoU 1/7 - 2/9
      [0., 0., 2., 2.],  # identical: 1, 1
      [3., 0., 4., 1.],  # disjoint: union 5, hull 4 x 2 = 8: IoU 0, GIoU -3/8
      [0.5, 0.5, 1.5, 1.5],  # inside: IoU 1/4, hull = a: GIoU 1/4
  ])
  iou, union = boxes.pairwise_iou(a, b)
  np.testing.assert_allclose(np.asarray(iou)[0], [1 / 7, 1, 0, 1 / 4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(union)[0], [7, 4, 5, 4], rtol=1e-6)
  giou = np.asarray(boxes.generalized_iou(a, b))[0]
  np.testing.assert_allclose(giou, [1 / 7 - 2 / 9, 1, -3 / 8, 1 / 4], rtol=1e-6)


def test_giou_far_apart_tends_to_minus_one_and_is_batched():
  a = np.array([[[0., 0., 1., 1.]], [[0., 0., 1., 1.]]])  # (2, 1, 4)
  b = np.array([[[99., 99., 100., 100.]], [[0., 0., 1., 1.]]])
  giou = np.asarray(boxes.generalized_iou(a, b))
  assert giou.shape == (2, 1, 1)
  np.testing.assert_allclose(giou[:, 0, 0], [2 / 10000 - 1, 1.0], rtol=1e-6)
