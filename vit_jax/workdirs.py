"""A training workdir read back: its config, its model and its weights.

One loader (`load`) for everything that reads a run of `vit_jax.train`: evaluation-only mode
(`train.evaluate_checkpoint`), `vit_jax.predict`, and the distillation teacher (`teacher`). It
takes the latest intact checkpoint, or the weights a finished run exported (params.npz and its
companions, EXPORTS) when there is none, on the devices here (a mesh that does not fit them falls
back to data parallelism: checkpoints restore on any mesh). What a checkpoint holds besides the
model is skipped: the optimizer state is restored and dropped, and the frozen teacher of a
distilled run is read from the checkpoint's own shapes (the reader does not rebuild it).

A workdir holds:
  config.json            the run's config (config.step{N}.json: the one before a resume at N)
  checkpoints/{step}/    orbax train states (vit_jax.checkpoint.TrainCheckpointer)
  metrics.jsonl, TensorBoard events
  EXPORTS                written at the end: params.npz, params_ema.npz (config.ema_decay),
                         batch_stats.npz and batch_stats_ema.npz (models with BatchNorm)
  complete.json          written last: the run trained to its end, evaluated and exported
"""
import json
import os
from typing import Any, NamedTuple, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import data as data_lib
from vit_jax import errors
from vit_jax import npz
from vit_jax import parallel
from vit_jax import trainer as trainer_lib

CONFIG = "config.json"
COMPLETE = "complete.json"
# (train-state key, file) of the weights a finished run exports, in the published .npz layout.
EXPORTS = (("params", "params.npz"), ("ema_params", "params_ema.npz"),
           ("batch_stats", "batch_stats.npz"), ("ema_batch_stats", "batch_stats_ema.npz"))


class Run(NamedTuple):
  """A workdir's model and weights (host numpy arrays)."""
  config: ml_collections.ConfigDict  # fitted to the devices here
  model: Any
  variables: dict  # {"params", and "batch_stats" for models with BatchNorm}
  ema_variables: Optional[dict]  # the same from the EMA (config.ema_decay), else None
  step: Optional[int]  # the checkpoint's step; None: the exported weights
  image_shape: Tuple[int, int, int]  # (H, W, C) after config.pp_eval
  num_classes: int


def _has_run_config(path: str) -> bool:
  """A directory with a config.json of ours (Hugging Face's has a model_type)."""
  cfg = os.path.join(path, CONFIG)
  if not (os.path.isdir(path) and os.path.exists(cfg)):
    return False
  with open(cfg) as f:
    return "model_type" not in json.load(f)


def is_workdir(path: str) -> bool:
  """A training workdir of ours: our config.json, and checkpoints or an exported params.npz."""
  return _has_run_config(path) and (os.path.isdir(os.path.join(path, "checkpoints")) or
                                    os.path.exists(os.path.join(path, EXPORTS[0][1])))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise errors.MissingFileError(f"{workdir} is not a training workdir: it has no {CONFIG}.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_state(ckpt: checkpoint.TrainCheckpointer, trainer: trainer_lib.Trainer,
                  step: Optional[int] = None):
  """The train state of `step` (default: the latest intact one) restored into the trainer's
  shapes and shardings. Parts of the checkpoint the trainer has no place for (the frozen teacher
  of a distilled run, read by a trainer without one) are restored by their stored shapes,
  replicated, and dropped. A checkpoint saved before the EMA of the BatchNorm statistics was kept
  gets it from the statistics themselves (with a warning)."""
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise errors.MissingFileError(f"No checkpoint in {ckpt.directory}.")
  abstract, shardings = dict(trainer.abstract_state), dict(trainer.shardings)
  stored = ckpt.stored_tree(step) or {}
  derived = [k for k in abstract if k.startswith("ema_") and k != "ema_params"
             and k not in stored and k[len("ema_"):] in stored and "ema_params" in stored]
  for k in derived:
    del abstract[k], shardings[k]
  replicated = parallel.replicated(trainer.runner.mesh)
  skipped = [k for k in stored if k not in abstract and k == "teacher"]
  for k in skipped:
    abstract[k] = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored[k],
        is_leaf=lambda x: hasattr(x, "shape"))
    shardings[k] = jax.tree_util.tree_map(lambda _: replicated, abstract[k])
  state = ckpt.restore(abstract, step, shardings=shardings)
  for k in skipped:
    del state[k]
  for k in derived:
    logging.warning("The checkpoint of step %d in %s has no %s (saved before the EMA of the "
                    "BatchNorm statistics was kept): it starts from the live %s.", step,
                    ckpt.directory, k, k[len("ema_"):])
    state[k] = jax.tree_util.tree_map(jnp.copy, state[k[len("ema_"):]])
  return state


def _exported(workdir: str, model, image_shape) -> Tuple[dict, Optional[dict]]:
  """(variables, EMA variables or None) from a finished run's exported .npz files."""
  shapes = jax.eval_shape(lambda: dict(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)), train=False)))
  zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  found = {key: os.path.join(workdir, name) for key, name in EXPORTS
           if os.path.exists(os.path.join(workdir, name))}

  def variables(prefix):
    if prefix + "params" not in found:
      return None
    out = {"params": npz.load_pretrained(found[prefix + "params"], zeros["params"])}
    for k in trainer_lib.MODEL_STATE:
      if k in zeros:
        if prefix + k not in found:
          raise errors.MissingFileError(
              f"{workdir}: its model has BatchNorm but the workdir has no "
              f"{dict(EXPORTS)[prefix + k]} beside {dict(EXPORTS)[prefix + 'params']}.")
        out[k] = npz.load_pretrained(found[prefix + k], zeros[k])
    return out
  return variables(""), variables("ema_")


def load(workdir: str, *, config: Optional[ml_collections.ConfigDict] = None,
         num_classes: Optional[int] = None, image_shape=None) -> Run:
  """The model and weights of the run in `workdir`: its latest intact checkpoint, else its
  exported params.npz (and companions).

  `config` defaults to the workdir's config.json (evaluation-only mode passes the command line's);
  `num_classes` and `image_shape` (H, W, C after pp_eval) default to what the config's data set
  and pp_eval give (reading one evaluation batch)."""
  config = trainer_lib.for_these_devices(config if config is not None else read_config(workdir))
  if num_classes is None or image_shape is None:
    source = data_lib.get_source(config.dataset)
    batch = next(iter(data_lib.eval_iterator(
        source, split=config.eval_split, pp=config.pp_eval,
        batch_size=int(config.get("eval_batch_size", config.batch_size)))))
    num_classes = source.num_classes if num_classes is None else num_classes
    image_shape = batch["image"].shape[1:] if image_shape is None else image_shape
  image_shape = tuple(int(d) for d in image_shape)
  ckpt = checkpoint.TrainCheckpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is not None:
      trainer = trainer_lib.build_trainer(config, num_classes, image_shape, total_steps=1,
                                         warmup_steps=0)
      state = jax.device_get(restore_state(ckpt, trainer, step))
      model = trainer.model
      variables = trainer_lib.model_variables(state)
      ema = trainer_lib.model_variables(state, ema=True) if "ema_params" in state else None
    elif os.path.exists(os.path.join(workdir, EXPORTS[0][1])):
      model = trainer_lib.build_model(config, num_classes)
      variables, ema = _exported(workdir, model, image_shape)
    else:
      raise errors.MissingFileError(
          f"No checkpoint in {workdir} and no exported {EXPORTS[0][1]}: train there first.")
  finally:
    ckpt.close()
  return Run(config, model, variables, ema, step, image_shape, num_classes)


def _head_classes(workdir: str) -> Optional[int]:
  """The class count of a workdir's weights (the head kernel's last dimension), read from the
  latest checkpoint's metadata or the exported params.npz without loading the model; None when
  the model has no `head`."""
  ckpt = checkpoint.TrainCheckpointer(workdir)
  try:
    step = ckpt.latest_step()
    if step is not None:
      kernel = ((ckpt.stored_tree(step) or {}).get("params") or {}).get("head", {}).get("kernel")
      return None if kernel is None else int(kernel.shape[-1])
  finally:
    ckpt.close()
  path = os.path.join(workdir, EXPORTS[0][1])
  if not os.path.exists(path):
    return None
  kernel = npz.load_npz(path).get("head", {}).get("kernel")
  return None if kernel is None else int(kernel.shape[-1])


def teacher(config, num_classes: int, image_shape):
  """(module, variables) of `config.distill.teacher`, or None when it is empty.

  The teacher is a finished workdir of ours (read by `load`: its model and its final weights, not
  the EMA) or any source of `vit_jax.pretrained.load` (an .npz with `distill.model` naming its
  model, a Hugging Face directory, a zoo name). Its classes must be the data set's."""
  distill = config.get("distill") or {}
  source = distill.get("teacher") or ""
  if not source:
    return None
  mismatch = lambda n: ValueError(
      f"distill.teacher={source!r} predicts "
      f"{'no classes (no head)' if n is None else f'{n} classes'}, the data set has "
      f"{num_classes}: the teacher must be trained on the same classes.")
  if _has_run_config(source):
    if not is_workdir(source):
      raise errors.MissingFileError(
          f"distill.teacher={source!r} is a workdir without checkpoints or "
          f"{EXPORTS[0][1]}: train it to the end first.")
    if (os.path.isdir(os.path.join(source, "checkpoints")) and
        not os.path.exists(os.path.join(source, COMPLETE))):
      raise errors.MissingFileError(f"distill.teacher={source!r} is a run that has not finished "
                                    f"(no {COMPLETE}): train it to the end first.")
    # Checked before building: another class count would be a shape error naming the head.
    n = _head_classes(source)
    if n != num_classes:
      raise mismatch(n)
    run = load(source, num_classes=num_classes, image_shape=image_shape)
    module, variables = run.model, run.variables
  else:
    from vit_jax import pretrained  # pylint: disable=g-import-not-at-top
    # num_classes None keeps the source's own head (another count would be re-initialised).
    module, params = pretrained.load(source, model=distill.get("model") or None)
    variables = params if "params" in params else {"params": params}
    if module.num_classes != num_classes:
      raise mismatch(module.num_classes)
  return module, jax.tree_util.tree_map(jnp.asarray, variables)
