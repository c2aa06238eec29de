"""A run resumed in its workdir: what it may and may not change, checked before it trains.

`check_config` compares the config with the workdir's config.json (`config_checks.resume_changes`
lists the keys whose change would alter the data order, the schedule or the model; a longer
total is allowed and its decay stretched), `check_data_order` the process count a streamed data
set started with (data_order.json), and `save_config` keeps the config each part of the run
was trained with.
"""
import json
import os

from absl import logging
import jax
import ml_collections

from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import data as data_lib
from vit_jax import errors
from vit_jax import optim
from vit_jax import workdirs


def check_config(workdir: str, config, *, start_step: int, total_steps: int,
                 steps_per_epoch: int, allow_config_change: bool) -> None:
  """A resumed run's config against the workdir's config.json: a change that alters the data
  order, the schedule or the model is an error listing the keys (config_checks.RESUME_FREE lists
  what may change); a longer total duration is allowed. `allow_config_change` turns the error
  into a warning."""
  path = os.path.join(workdir, workdirs.CONFIG)
  if not start_step or not os.path.exists(path):
    return
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  lines = config_checks.resume_changes(saved, config)
  try:
    old_total, old_warmup = optim.resolve_durations(saved, steps_per_epoch)[:2]
  except (ValueError, KeyError, AttributeError):
    old_total = None
  if old_total is not None and total_steps != old_total:
    # The decay follows the total: another total moves the learning rate at the resume step.
    new_warmup = optim.resolve_durations(config, steps_per_epoch)[1]
    lr = lambda cfg, total, warmup: float(optim.make_schedule(
        cfg.lr, total_steps=total, warmup_steps=warmup)(start_step))
    before, after = lr(saved, old_total, old_warmup), lr(config, total_steps, new_warmup)
    change = (f"total duration: {old_total} -> {total_steps} steps, which moves the learning "
              f"rate at the resume step {start_step} from {before:.4g} to {after:.4g}")
    if total_steps < old_total:
      lines.append(change + " (a longer total may resume: its decay is stretched over the "
                   "steps that are left)")
    else:
      logging.warning("%s: the %s decay is stretched over the steps that are left (the "
                      "steps taken keep the schedule they had).", change, config.lr.decay)
  if not lines:
    return
  msg = (f"{workdir} holds a run at step {start_step} started with another config; these keys "
         "changed: " + "; ".join(lines))
  if not allow_config_change:
    raise errors.ConfigError(
        msg + ". Use another --workdir, or pass --allow_config_change to resume anyway.")
  logging.warning("%s. Resuming anyway (--allow_config_change).", msg)


def check_data_order(workdir: str, source, start_step: int, allow_change: bool) -> None:
  """In-memory sources give every step the same global batch whatever the process count; TFDS
  sources stream a part of the split per host, so their order depends on it. The count a
  streamed run started with is kept in data_order.json; resuming with another is an error."""
  if isinstance(source, data_lib.ArraySource) or source.detection:  # global orders
    return
  path, count = os.path.join(workdir, "data_order.json"), jax.process_count()
  if start_step and os.path.exists(path):
    with open(path) as f:
      before = json.load(f)["process_count"]
    if before != count and not allow_change:
      raise errors.ConfigError(
          f"{workdir} was trained with {before} processes and {source.name} is streamed per "
          f"process, so with {count} the examples of every later step would change. Resume with "
          f"{before} processes, or pass --allow_config_change to accept the new order.")
  if jax.process_index() == 0 and (not start_step or not os.path.exists(path)):
    checkpoint.write_atomic(path, json.dumps({"process_count": count}, indent=2))


def save_config(workdir: str, config, start_step: int) -> None:
  """config.json: the config the run was started with; a changed config that was allowed to
  resume is written too, and the previous one kept as config.step{N}.json."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, workdirs.CONFIG)
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    if start_step:
      os.replace(path, os.path.join(workdir, f"config.step{start_step}.json"))
  checkpoint.write_atomic(path, text)
