"""Object detection (DETR): the set loss on boxes and labels (vit_jax/detection/loss.py, weights
from config.detr), evaluated by COCO-style mAP over the whole split (vit_jax/evaluators/
detection.py, detections gathered across processes)."""
from typing import Callable, Dict, Optional

from vit_jax import data as data_lib
from vit_jax import tasks
from vit_jax.detection import loss as detection_loss
from vit_jax.evaluators import detection as detection_eval
from vit_jax.tasks.classification import DETECTION_DATASETS

LOSS_TERMS = ("loss_ce", "loss_bbox", "loss_giou")  # detr_loss's last-layer terms, logged
WEIGHTS = ("eos_coef", "class_weight", "bbox_weight", "giou_weight", "aux")  # config.detr
# The pp ops that keep boxes valid: those that do not move pixels (boxes do not follow them).
PP_OPS = ("decode", "value_range")


class Detection(tasks.Task):
  name = "detr"
  batch_keys = ("image", "image_mask", "boxes", "labels", "mask")
  metric_names = tuple(f"train_{k}" for k in LOSS_TERMS)
  result_names = ("map", "map50", "map75", "num_images")
  one_call = True  # the outputs put the decoder layers first (`aux_*`), not the batch

  def __init__(self, config):
    super().__init__(config)
    self.weights = dict(config.detr)

  def inputs(self, batch) -> tuple:
    return (batch["image"],) + ((batch["image_mask"],) if "image_mask" in batch else ())

  def loss(self, out, batch, teacher_out=None):
    loss, parts = detection_loss.detr_loss(out, batch, **self.weights)
    return loss, {f"train_{k}": parts[k] for k in LOSS_TERMS}

  def headline(self, result, prefix: str = "", note: str = "") -> str:
    return (f"mAP{note}: {result[prefix + 'map']:.4f}, mAP@0.5 {result[prefix + 'map50']:.4f} "
            f"on {result[prefix + 'num_images']} images")

  def evaluate(self, runner, variables, source, config, split: str,
               should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """COCO-style mAP (`map`, `map50`, `map75`, `num_images`) over the whole split whatever the
    process count (the detections are gathered across processes)."""
    return detection_eval.DetectionEvaluator(
        runner.predict(), lambda: data_lib.eval_iterator(
            source, split=split, pp=config.pp_eval, batch_size=int(config.eval_batch_size)),
        fetch=runner.gather_features, should_stop=should_stop).run(variables)

  @classmethod
  def check(cls, config, need) -> None:
    """A DETR model on a detection data set; weights that can learn; nothing that DETR's loss
    cannot take: images mixed or repeated, class targets, pixels moved by the pp."""
    need(config.model_name.startswith("DETR"),
         f"loss='detr' needs a DETR model (DETR-Mu, DETR-R50, ...), not {config.model_name!r}.")
    need(config.dataset.name in DETECTION_DATASETS,
         f"loss='detr' needs a detection data set ({', '.join(DETECTION_DATASETS)}), not "
         f"dataset.name={config.dataset.name!r}.")
    detr = config.get("detr") or {}
    unknown = sorted(set(detr.keys()) - set(WEIGHTS))
    need(not unknown, f"detr.{unknown[0] if unknown else ''}: unknown key; the DETR loss takes "
         f"{', '.join(WEIGHTS)}.")
    for key in WEIGHTS[:4]:
      v = detr.get(key)
      need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
           f"detr.{key}={v!r}: must be a number >= 0.")
    need(0 < detr.get("eos_coef") <= 1, f"detr.eos_coef={detr.get('eos_coef')!r}: the weight of "
         "'no object' predictions must be in (0, 1] (DETR: 0.1).")
    need(isinstance(detr.get("aux"), bool),
         f"detr.aux={detr.get('aux')!r}: must be True or False.")
    need(any(detr.get(k) for k in WEIGHTS[1:4]),
         "detr.class_weight, bbox_weight and giou_weight are all 0: nothing would be learnt.")
    tasks.refuse(config, need, "loss='detr'", (
        ("fewshot.shots", "few-shot probes of class labels"), ("mixup", "mixup"),
        ("cutmix", "CutMix"), ("distill.teacher", "distillation"),
        ("label_smoothing", "label smoothing")))
    need(config.get("repeated_aug", 1) == 1,
         f"repeated_aug={config.get('repeated_aug')!r}: loss='detr' does not support repeated "
         "augmentation; set it to 1.")
    tasks.pp_only(config, need, "loss='detr'", PP_OPS, "the boxes do not follow the pixels")
