"""Tests for vit_jax/detection/matching.py: the assignment against brute force over all
permutations, the cost against a direct computation, padding and the jitted callback."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.detection import boxes as box_ops
from vit_jax.detection import matching


def _brute_force(cost):
  """Minimum total cost of assigning each column to a distinct row: (value, rows per column)."""
  q, t = cost.shape
  best = (np.inf, None)
  for rows in itertools.permutations(range(q), t):
    v = cost[list(rows), list(range(t))].sum()
    if v < best[0]:
      best = (v, rows)
  return best


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  b, q, t = 3, 5, 4
  cost = rng.normal(size=(b, q, t))
  mask = rng.random((b, t)) < 0.7
  mask[0] = True  # one image with every target real
  mask[1] = False  # one with none
  out = matching.assign(cost, mask)
  assert out.shape == (b, t) and out.dtype == np.int32
  assert (out[~mask] == -1).all() and (out[mask] >= 0).all()
  for i in range(b):
    cols = np.flatnonzero(mask[i])
    if not len(cols):
      continue
    rows = out[i, cols]
    assert len(set(rows)) == len(rows)  # distinct predictions
    want, _ = _brute_force(cost[i][:, cols])
    np.testing.assert_allclose(cost[i][rows, cols].sum(), want, rtol=1e-12)


def test_cost_matrix_matches_direct_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4)).astype(np.float32)  # 3 classes + no object
  pred = np.concatenate([rng.uniform(0.3, 0.7, (2, 3, 2)), rng.uniform(0.1, 0.3, (2, 3, 2))], -1)
  tgt = np.concatenate([rng.uniform(0.3, 0.7, (2, 2, 2)), rng.uniform(0.1, 0.3, (2, 2, 2))], -1)
  labels = np.array([[0, 2], [1, 1]])
  cost = np.asarray(matching.cost_matrix(jnp.asarray(logits), jnp.asarray(pred, jnp.float32),
                                         jnp.asarray(labels), jnp.asarray(tgt, jnp.float32)))
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for i, qi, ti in itertools.product(range(2), range(3), range(2)):
    giou = float(box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred[i, qi][None]),
                                         box_ops.cxcywh_to_xyxy(tgt[i, ti][None]))[0, 0])
    want = -prob[i, qi, labels[i, ti]] + 5 * np.abs(pred[i, qi] - tgt[i, ti]).sum() - 2 * giou
    np.testing.assert_allclose(cost[i, qi, ti], want, rtol=1e-5, atol=1e-6)


def test_jitted_match_equals_host_assignment():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
  pred = jnp.asarray(rng.uniform(0.2, 0.5, (2, 6, 4)), jnp.float32)
  targets = {"labels": jnp.array([[0, 1, 0], [1, 0, 0]]),
             "boxes": jnp.asarray(rng.uniform(0.2, 0.5, (2, 3, 4)), jnp.float32),
             "mask": jnp.array([[True, True, False], [True, False, False]])}
  got = jax.jit(matching.hungarian_match)(logits, pred, targets)
  cost = matching.cost_matrix(logits, pred, targets["labels"], targets["boxes"])
  np.testing.assert_array_equal(np.asarray(got), matching.assign(cost, targets["mask"]))
  assert np.asarray(got)[0, 2] == -1 and np.asarray(got)[1, 1] == -1


def test_more_objects_than_queries_is_a_clear_error():
  with pytest.raises(ValueError, match="3 objects but the model makes only 2 predictions"):
    matching.assign(np.zeros((1, 2, 3)), np.ones((1, 3), bool))


def test_non_finite_costs_still_assign():
  cost = np.array([[[np.nan, 1.0], [0.0, np.inf], [2.0, 0.5]]])
  out = matching.assign(cost, np.ones((1, 2), bool))
  np.testing.assert_array_equal(out, [[1, 2]])
