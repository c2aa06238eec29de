"""Tests for DETR through vit_jax/train.py (config.loss="detr"): a tiny DETR-Mu trains a few steps
on the canvases in the one trainer, logs DETR's loss terms and reports mAP on the validation and
test splits; what DETR's loss cannot take is rejected before anything runs."""
import json
import os

import numpy as np
import pytest

from configs import detr_fashion_mnist
from vit_jax import config_checks
from vit_jax import errors
from vit_jax import models
from vit_jax import train
from vit_jax.data import canvases
from vit_jax.detection import mean_ap
from vit_jax.evaluators import detection
from vit_jax import workdirs

# The smallest DETR-Mu that still has every part: one stage of the BiT stem, one encoder layer,
# two decoder layers (so one auxiliary output), 6 queries (the canvases' most objects).
TINY = dict(bit_layers=(1,), bit_width=8, bit_gn_groups=4, hidden_size=16, num_heads=2,
            mlp_dim=32, encoder_layers=1, decoder_layers=2, num_queries=6)


def _tiny_config():
  c = detr_fashion_mnist.get_config()
  c.model.update(TINY)
  c.batch_size = c.eval_batch_size = 8  # the 8 fake devices of tests/conftest.py
  c.total_steps, c.log_every_steps, c.eval_every_steps = 3, 1, 2
  c.checkpoint_every_steps = None
  c.lr.warmup_steps, c.lr.base = 0, 1e-3
  c.eval_split, c.test_split = "val[:12]", "test[:8]"  # 12: a padded last evaluation batch
  c.export_npz = False
  return c


# 2-3 minutes here: compiling the update takes about a minute and is never cached (the matching's
# host callback keeps it out of JAX's persistent cache), the checkpoint save 15-20 s.
@pytest.mark.slow
def test_tiny_detr_trains_and_reports_map(tmp_path, monkeypatch):
  scored = []  # (detections, ground truths, result) of every mAP computed
  coco_map = mean_ap.coco_map
  monkeypatch.setattr(mean_ap, "coco_map", lambda d, g, **kw: scored.append(
      (d, g, coco_map(d, g, **kw))) or scored[-1][2])
  result = train.train_and_evaluate(_tiny_config(), str(tmp_path), progress_every_secs=1e9)
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  train_rows = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3]
  for r in train_rows:
    assert {"train_loss_ce", "train_loss_bbox", "train_loss_giou", "grad_norm"} <= set(r)
    assert "train_accuracy" not in r
    # The total is the weighted last layer plus the auxiliary layer: more than the last alone.
    last = r["train_loss_ce"] + 5 * r["train_loss_bbox"] + 2 * r["train_loss_giou"]
    assert np.isfinite(r["train_loss"]) and r["train_loss"] > last > 0
  # The evaluation during training (step 2) and the final one, on 12 and 8 canvases.
  assert any("val_map50" in r and r["step"] == 2 for r in rows)
  assert result["split"] == "val" and result["num_images"] == 12
  assert result["test_split"] == "test[:8]" and result["test_num_images"] == 8
  # The last two mAPs are the final ones, of val[:12] and test[:8]: every canvas once, in split
  # order, with its own objects (the padded rows of val's last batch left out), and the reported
  # numbers are COCO's mAP of the model's detections on them (mean_ap equals pycocotools:
  # tests/detection/test_mean_ap.py).
  assert [len(dets) for dets, _, _ in scored] == [12, 12, 8]  # val at step 2; val, test at 3
  source = canvases.CanvasSource()
  for (dets, gts, out), (prefix, base, n) in zip(scored[-2:], [("", "val", 12),
                                                               ("test_", "test", 8)]):
    want = detection.ground_truth(source.batch(base, range(n)))
    assert len(dets) == len(gts) == n
    for g, w in zip(gts, want):
      np.testing.assert_array_equal(g["labels"], w["labels"])
      np.testing.assert_array_equal(g["boxes"], w["boxes"])
    assert all(len(d["scores"]) == TINY["num_queries"] for d in dets)  # every query a detection
    for key in ("map", "map50", "map75"):
      assert result[prefix + key] == out[key], (prefix + key, result[prefix + key])
  assert "accuracy" not in result and "test_accuracy" not in result
  assert result["metrics"]["final_test_map50"] == result["test_map50"]
  done = json.load(open(os.path.join(tmp_path, workdirs.COMPLETE)))
  assert done["step"] == 3 and done["test_map"] == result["test_map"]
  # The README's picture from this workdir: every query drawn (threshold 0), 4 test canvases.
  from experiments import detr_picture  # pylint: disable=g-import-not-at-top
  png = tmp_path / "detections.png"
  assert detr_picture.main([f"--workdir={tmp_path}", f"--out={png}", "--num=4",
                            "--threshold=0"]) == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The final test mAP scored the trained model's detections (DETR's post-processing of its
  # outputs on those 8 canvases, here computed again by the picture's code on one device).
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  again = detr_picture.detections(predict.load(str(tmp_path)), source.batch("test", range(8)),
                                  threshold=0)
  for got, want in zip(scored[-1][0], again):
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=0, atol=1e-5)


def _validate(c):
  """As the real run on one CPU device (the config's eval batch of 100 is not one of 8)."""
  config_checks.validate(c, device_count=1, process_count=1,
                         model_fields=models.fields(c.model_name))


def test_the_shipped_detr_config_is_valid():
  _validate(detr_fashion_mnist.get_config())


@pytest.mark.parametrize("key, value, message", [
    ("fewshot.shots", (1, 5), r"fewshot\.shots=\(1, 5\): loss='detr' does not support few-shot"),
    ("mixup", 0.2, r"mixup=0\.2: loss='detr' does not support mixup"),
    ("cutmix", 1.0, r"cutmix=1\.0: loss='detr' does not support CutMix"),
    ("distill.teacher", "workdirs/t", r"distill\.teacher='workdirs/t': loss='detr' does not"),
    ("pp_train", "flip_lr|value_range(-1,1)", r"pp_train: op 'flip_lr' with loss='detr'"),
    ("loss", "focal", r"loss='focal': use classification or detr"),
    ("detr.eos_coef", 0.0, r"detr\.eos_coef=0\.0: .* must be in \(0, 1\]"),
    ("model_name", "ViT-Mu/7", r"loss='detr' needs a DETR model"),
])
def test_what_detr_cannot_take_is_rejected_in_one_line(key, value, message):
  c = detr_fashion_mnist.get_config()
  node = c
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match=message) as e:
    _validate(c)
  assert "\n" not in str(e.value)


def test_canvases_need_the_detr_loss():
  c = detr_fashion_mnist.get_config()
  c.loss = "classification"
  with pytest.raises(errors.ConfigError, match="is a detection data set"):
    _validate(c)


def test_fewer_queries_than_objects_is_named_before_compiling(tmp_path):
  c = _tiny_config()
  c.model.num_queries = 4
  with pytest.raises(errors.ConfigError, match=r"model\.num_queries=4: .* up to 6 objects"):
    train.train_and_evaluate(c, str(tmp_path))
