"""Tests for vit_jax/detection/loss.py: a hand-computed case, auxiliary layers, padding, gradients,
and (with torch) equality with transformers' DETR loss on random outputs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.detection import loss as loss_lib


def _hand_case():
  # One class + "no object"; two predictions, one object (label 0, box (0.5, 0.5, 0.4, 0.3)).
  # Prediction 1 (p(class 0) = 0.75, box (0.5, 0.5, 0.4, 0.4)) costs -0.75 + 5 * 0.1 - 2 * 0.75
  # = -1.75; prediction 0 (p = 0.5, box 0.2 x 0.2, IoU 1/3) costs -0.5 + 5 * 0.3 - 2/3 = 0.33,
  # so prediction 1 is matched: L1 0.1, GIoU 0.75 (it encloses the object: IoU 0.12 / 0.16).
  logits = jnp.array([[[0.0, 0.0], [np.log(3.0), 0.0]]])
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]]])
  targets = {"labels": jnp.array([[0, 0]]), "boxes": jnp.array([[[0.5, 0.5, 0.4, 0.3],
                                                                  [0.0, 0.0, 0.0, 0.0]]]),
             "mask": jnp.array([[True, False]])}
  # CE: weight 1 for the matched prediction (-log 0.75), 0.1 for the other as "no object"
  # (-log 0.5), torch's weighted mean.
  ce = (-np.log(0.75) + 0.1 * -np.log(0.5)) / 1.1
  return logits, boxes, targets, ce


def test_hand_computed_case():
  logits, boxes, targets, ce = _hand_case()
  loss, metrics = jax.jit(loss_lib.detr_loss)({"logits": logits, "boxes": boxes}, targets)
  np.testing.assert_allclose(metrics["loss_ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss_bbox"], 0.1, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_giou"], 0.25, rtol=1e-5)
  np.testing.assert_allclose(loss, ce + 5 * 0.1 + 2 * 0.25, rtol=1e-5)


def test_auxiliary_layers_are_matched_separately_and_summed():
  logits, boxes, targets, ce = _hand_case()
  # The auxiliary layer has the predictions in the other order: its own matching finds the same
  # pair, so it adds the same loss.
  outputs = {"logits": logits, "boxes": boxes, "aux_logits": logits[None, :, ::-1],
             "aux_boxes": boxes[None, :, ::-1]}
  loss, metrics = jax.jit(loss_lib.detr_loss)(outputs, targets)
  np.testing.assert_allclose(loss, 2 * (ce + 1.0), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss)
  no_aux, _ = jax.jit(functools.partial(loss_lib.detr_loss, aux=False))(outputs, targets)
  np.testing.assert_allclose(no_aux, ce + 1.0, rtol=1e-5)


def test_no_objects_and_finite_gradients():
  logits, boxes, targets, _ = _hand_case()
  empty = dict(targets, mask=jnp.zeros_like(targets["mask"]))
  loss, metrics = jax.jit(loss_lib.detr_loss)({"logits": logits, "boxes": boxes}, empty)
  # Both predictions go to "no object" (p = 0.5 and 0.25), both with weight 0.1.
  np.testing.assert_allclose(metrics["loss_ce"], (-np.log(0.5) - np.log(0.25)) / 2, rtol=1e-6)
  assert float(metrics["loss_bbox"]) == 0 and float(metrics["loss_giou"]) == 0
  grads = jax.jit(jax.grad(lambda o: loss_lib.detr_loss(o, targets)[0]))(
      {"logits": logits, "boxes": boxes})
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # Only the matched prediction's box gets a gradient.
  assert np.abs(np.asarray(grads["boxes"])[0, 0]).max() == 0
  assert np.abs(np.asarray(grads["boxes"])[0, 1]).max() > 0


def test_missing_target_key_is_a_clear_error():
  logits, boxes, targets, _ = _hand_case()
  with pytest.raises(ValueError, match="DETR targets lack 'mask'"):
    loss_lib.detr_loss({"logits": logits, "boxes": boxes},
                       {k: v for k, v in targets.items() if k != "mask"})


@pytest.mark.slow  # torch and transformers take ~15 s to import here
def test_equals_transformers_loss_on_random_outputs():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.loss import loss_for_object_detection as hf_loss
  rng = np.random.default_rng(0)
  layers, b, q, k, t = 3, 3, 6, 4, 4
  logits = rng.normal(size=(layers, b, q, k + 1)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (layers, b, q, 2)),
                          rng.uniform(0.05, 0.4, (layers, b, q, 2))], -1).astype(np.float32)
  counts = [4, 1, 2]
  labels = rng.integers(0, k, (b, t))
  tboxes = np.concatenate([rng.uniform(0.2, 0.8, (b, t, 2)), rng.uniform(0.05, 0.4, (b, t, 2))],
                          -1).astype(np.float32)
  mask = np.arange(t)[None] < np.array(counts)[:, None]
  cfg = transformers.DetrConfig(num_labels=k, auxiliary_loss=True, decoder_layers=layers)
  hf_targets = [{"class_labels": torch.tensor(labels[i, :n]), "boxes": torch.tensor(tboxes[i, :n])}
                for i, n in enumerate(counts)]
  want, want_terms, _ = hf_loss.ForObjectDetectionLoss(
      torch.tensor(logits[-1]), hf_targets, "cpu", torch.tensor(boxes[-1]), cfg,
      torch.tensor(logits), torch.tensor(boxes))
  outputs = {"logits": logits[-1], "boxes": boxes[-1], "aux_logits": logits[:-1],
             "aux_boxes": boxes[:-1]}
  got, terms = jax.jit(loss_lib.detr_loss)(jax.tree.map(jnp.asarray, outputs),
                                  {"labels": jnp.asarray(labels), "boxes": jnp.asarray(tboxes),
                                   "mask": jnp.asarray(mask)})
  for name in ("loss_ce", "loss_bbox", "loss_giou"):
    np.testing.assert_allclose(terms[name], want_terms[name].item(), rtol=1e-5)
  np.testing.assert_allclose(got, want.item(), rtol=1e-5)


def test_jitted_over_a_batch_sharded_across_devices():
  """The host callback under jit with the batch split over the 8 (fake CPU) devices, as the
  trainer shards it: the same loss as on one device."""
  devices = np.array(jax.devices())
  if len(devices) < 2:
    pytest.skip("needs several devices")
  mesh = jax.sharding.Mesh(devices, ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  b, q, t = len(devices), 4, 3
  outputs = {"logits": rng.normal(size=(b, q, 3)).astype(np.float32),
             "boxes": rng.uniform(0.2, 0.6, (b, q, 4)).astype(np.float32)}
  targets = {"labels": rng.integers(0, 2, (b, t)),
             "boxes": rng.uniform(0.2, 0.6, (b, t, 4)).astype(np.float32),
             "mask": rng.random((b, t)) < 0.6}
  want, _ = jax.jit(loss_lib.detr_loss)(outputs, targets)
  sharded = jax.device_put((outputs, targets), shard)
  got, _ = jax.jit(loss_lib.detr_loss)(*sharded)
  np.testing.assert_allclose(got, want, rtol=1e-6)
