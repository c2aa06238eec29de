"""Image classification: softmax cross-entropy on one-hot (possibly mixed) labels, with label
smoothing and DeiT's distillation; evaluated by top-1 accuracy and the mean loss."""
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from vit_jax import errors
from vit_jax import tasks
from vit_jax.evaluators import classification as classification_eval

# Data sets whose examples are boxes, not one class per image (vit_jax.tasks.detection's).
DETECTION_DATASETS = ("fashion_mnist_canvases",)


class Classification(tasks.Task):
  name = "classification"
  batch_keys = ("image", "label")
  metric_names = ("train_accuracy",)
  result_names = ("accuracy", "num_examples")
  uses_teacher = True

  def __init__(self, config):
    super().__init__(config)
    self.smoothing = float(config.get("label_smoothing", 0.0))
    self.distill = dict(config.get("distill") or {})

  def loss(self, out, batch, teacher_out=None):
    loss, logits = loss_terms(out, batch["label"], teacher_out, smoothing=self.smoothing,
                              **self.distill)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1))
    return loss, {"train_accuracy": acc}

  def headline(self, result, prefix: str = "", note: str = "") -> str:
    return (f"accuracy{note}: {result[prefix + 'accuracy']:.4f} on "
            f"{result[prefix + 'num_examples']} images")

  def eval_step(self, model, *, axis_name: Optional[str] = None) -> Callable:
    return eval_step(model, axis_name=axis_name)

  def evaluate(self, runner, variables, source, config, split: str,
               should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Top-1 accuracy and loss over every example of `split` (the last batch padded, masked)."""
    return classification_eval.ClassificationEvaluator(
        lambda p, b: runner.eval_step(p, runner.to_device_batch(b)), source, split=split,
        pp=config.pp_eval, batch_size=config.eval_batch_size, fetch=runner.fetch,
        should_stop=should_stop).run(variables)

  @classmethod
  def check(cls, config, need) -> None:
    need(config.dataset.name not in DETECTION_DATASETS,
         f"dataset.name={config.dataset.name!r} is a detection data set (boxes, no class per "
         "image): train it with loss='detr' and a DETR model.")


def eval_step(model, *, axis_name: Optional[str] = None) -> Callable:
  """(variables, batch) -> sums of correct predictions, loss and real examples (mask)."""
  def step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1)) * mask
    loss = optax.softmax_cross_entropy(logits, batch["label"]) * mask
    out = dict(correct=correct.sum(), loss=loss.sum(), count=mask.sum())
    return jax.lax.psum(out, axis_name) if axis_name else out
  return step


def loss_terms(out, labels, teacher_logits=None, *, smoothing: float = 0.0, teacher: str = "",
               model: str = "", type: str = "hard", alpha: float = 0.5, tau: float = 1.0):
  """(loss, logits for accuracy) of a training output.

  `out` is the logits, or (cls_logits, dist_logits) from a distilled DeiT. Without a teacher
  both heads learn the labels (the mean of their losses). With `teacher_logits`, DeiT's
  distillation (Touvron et al. 2021, eq. 2 and 3): "hard": (1 - alpha) CE(cls, labels) +
  alpha CE(dist, argmax teacher) (DeiT: alpha 0.5); "soft": (1 - alpha) CE(cls, labels) +
  alpha tau^2 KL(softmax(teacher / tau) || softmax(dist / tau)) / classes (DeiT's code divides
  the summed KL by batch x classes; DeiT: alpha 0.1, tau 3). A model
  with one head distils through that head (Hinton et al. 2015). `teacher` and `model` name the
  teacher's source (config.distill) and are not used here.
  """
  del teacher, model
  cls, dist = out if isinstance(out, (tuple, list)) else (out, None)
  cls, dist = [None if x is None else x.astype(jnp.float32) for x in (cls, dist)]
  if smoothing:
    labels = labels * (1.0 - smoothing) + smoothing / labels.shape[-1]
  ce = lambda logits, target: optax.softmax_cross_entropy(logits, target).mean()
  base = ce(cls, labels)
  logits = cls if dist is None else (cls + dist) / 2
  if teacher_logits is None:
    return (base if dist is None else (base + ce(dist, labels)) / 2), logits
  student = cls if dist is None else dist
  teacher_logits = teacher_logits.astype(jnp.float32)
  if type == "hard":
    target = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
    kd = ce(student, target)
  elif type == "soft":
    # DeiT's code (facebookresearch/deit, losses.py, DistillationLoss): the KL divergence summed
    # over the batch and the classes, divided by their product (outputs_kd.numel()): the mean
    # over every element, not over examples only, which is what its alpha 0.1, tau 3 go with.
    log_p_t = jax.nn.log_softmax(teacher_logits / tau, -1)
    kd = (tau ** 2) * jnp.mean(
        jnp.exp(log_p_t) * (log_p_t - jax.nn.log_softmax(student / tau, -1)))
  else:
    raise errors.ConfigError(f"distill.type must be 'hard' or 'soft', not {type!r}")
  return (1.0 - alpha) * base + alpha * kd, logits
