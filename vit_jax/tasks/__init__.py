"""What the one trainer learns: one task per `config.loss`, looked up in TASKS.

A task is everything of training and evaluation that depends on what is learnt; the trainer
(vit_jax/trainer.py: the update and eval steps) and the loop (vit_jax/train.py) ask it and know
nothing else of it:

  batch_keys       what the update reads of a training batch (besides `row`)
  inputs(batch)    the model's positional inputs, e.g. (images,) or (images, image_mask)
  num_classes(k)   the model's num_classes for a data set of k classes (generation: 0)
  one_call         True: the training forward sees the whole (micro-)batch in one call (an output
                   that is not per example, as DETR's decoder layers); otherwise a model that
                   draws random numbers runs per example (each its own key, trainer.py)
  loss(out, batch, teacher_out) -> (loss, metrics)   the metrics are `metric_names`
  eval_step(model, axis_name)  (variables, batch) -> summed statistics of a batch, which
                   `evaluate` turns into its metrics
  evaluate(runner, variables, source, config, split, should_stop) -> metrics of a whole split
  result_names     the metrics of `evaluate` a run's result repeats for the test split (test_*)
  headline(result) the main figure of a result, as the console prints it
  uses_teacher     whether config.distill may give it a teacher
  check(config, need)  what config_checks refuses for it (`need(ok, message)` raises)

A new task is a module here with a `Task` subclass and its row in TASKS (an explicit table, not
filled by imports).
"""
from typing import Callable, Dict, Optional, Tuple

from vit_jax import errors


class Task:
  """The base: a task made from a config (it keeps the values it reads, e.g. loss weights)."""
  name: str = ""
  batch_keys: Tuple[str, ...] = ("image",)
  metric_names: Tuple[str, ...] = ()
  result_names: Tuple[str, ...] = ()
  one_call: bool = False
  uses_teacher: bool = False

  def __init__(self, config):
    self.config = config

  def inputs(self, batch) -> tuple:
    return (batch["image"],)

  def num_classes(self, data_classes: int) -> int:
    """The model's `num_classes` for a data set of `data_classes` classes."""
    return data_classes

  def loss(self, out, batch, teacher_out=None):
    raise NotImplementedError

  def headline(self, result, prefix: str = "", note: str = "") -> str:
    """The result's main figure for the console, e.g. 'accuracy: 0.9048 on 6000 images'
    (`prefix` 'test_': the test split's; `note` follows the metric's name)."""
    raise NotImplementedError

  def eval_step(self, model, *, axis_name: Optional[str] = None) -> Optional[Callable]:
    return None

  def evaluate(self, runner, variables, source, config, split: str,
               should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    raise NotImplementedError

  @classmethod
  def check(cls, config, need) -> None:
    """What the config may not ask of this task (`need(ok, message)` raises ConfigError)."""


def _table():
  # Imported here: each task module imports the evaluators and losses it uses.
  from vit_jax.tasks import classification  # pylint: disable=g-import-not-at-top
  from vit_jax.tasks import detection  # pylint: disable=g-import-not-at-top
  from vit_jax.tasks import generation  # pylint: disable=g-import-not-at-top
  return {"classification": classification.Classification, "detr": detection.Detection,
          "generation": generation.Generation}


NAMES = ("classification", "detr", "generation")  # the keys of TASKS, for messages and checks


def task_class(name: str):
  table = _table()
  if name not in table:
    raise errors.ConfigError(f"loss={name!r}: use {' or '.join(repr(n) for n in table)}.")
  return table[name]


def get(config) -> Task:
  """The task `config.loss` names (default "classification"), built from `config`."""
  return task_class(config.get("loss", "classification"))(config)


def refuse(config, need, who: str, keys) -> None:
  """`need` each (dotted key, what it is) of `keys` unset: `who` does not support it."""
  for key, what in keys:
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node.get(p) or {}
    value = node.get(leaf)
    need(not value, f"{key}={value!r}: {who} does not support {what}; unset it.")


def pp_only(config, need, who: str, ops, why: str) -> None:
  """`need` pp_train and pp_eval to use only `ops`."""
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  for key in ("pp_train", "pp_eval"):
    moved = [op.name for op in preprocess.parse(config[key]) if op.name not in ops]
    need(not moved, f"{key}: op {moved[0] if moved else ''!r} with {who}: {why}; use only "
         f"{', '.join(ops)}.")
