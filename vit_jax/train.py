"""The one training loop, for every model family: config in, trained checkpoint and metrics out.

Reads top to bottom: set-up, data, model and optimizer, state (fresh, pretrained or resumed),
step functions (jit over a mesh, or pmap), the loop (log, evaluate, checkpoint, stop cleanly),
final evaluation and export.
"""
import collections
import json
import os
import re
import signal
from typing import Any, Callable, Dict, Optional

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import data as data_lib
from vit_jax import errors
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import npz
from vit_jax import optim
from vit_jax import parallel
from vit_jax import pretrained
from vit_jax import resume
from vit_jax import workdirs
from vit_jax import evaluators
from vit_jax.trainer import (Runner, build_trainer, for_these_devices, model_variables,
                             new_state)
from vit_jax.evaluators import fewshot


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """The loss, the gradient norm, a parameter or the optimizer state became NaN/inf; the last
  good checkpoint was kept."""


def evaluate(runner: Runner, params, source, config, split: str,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
  """The task's evaluation of `split` (vit_jax/tasks: top-1 accuracy and loss for
  classification, COCO-style mAP for detection), over every example of it."""
  return runner.task.evaluate(runner, params, source, config, split, should_stop)


TEST_PREFIX = "final_test"  # metrics of config.test_split, evaluated at the end only


def eval_prefix(config) -> str:
  """The metric prefix of config.eval_split: 'val' when it is carved from the training split's
  data ('train[99%:]' next to 'train[:99%]'), else the split's name ('test[:50]' -> 'test')."""
  base = split_name(config.eval_split)
  return "val" if base == split_name(config.train_split) else base


def split_name(split: str) -> str:
  """A metric prefix for a split string: 'test[:50]' -> 'test', 'train@seeded(...)' -> 'train'."""
  return re.split(r"[\[@+]", split, maxsplit=1)[0]


def _task_evaluator(runner, variables, source, config, should_stop):
  if not config.eval_split:
    return {}
  ev = evaluate(runner, variables, source, config, config.eval_split, should_stop)
  return {f"{eval_prefix(config)}_{k}": v for k, v in ev.items()}


def _fewshot_evaluator(runner, variables, source, config, should_stop):
  if not config.fewshot.shots:
    return {}
  return fewshot_evaluator(runner, source, config, should_stop).run(variables)


# The evaluators `config.evals` may name, run in its order every eval_every and at the end: the
# task's own on eval_split (metrics `val_*`, or the split's name), few-shot linear probes on the
# pooled features (fewshot.*; nothing while fewshot.shots is empty).
EVALUATORS = {"task": _task_evaluator, "fewshot": _fewshot_evaluator}


def evaluate_all(runner: Runner, params, source, config,
                 should_stop: Optional[Callable[[], bool]] = None, *,
                 ema=None) -> Dict[str, float]:
  """Every evaluator of `config.evals` (EVALUATORS) on the model's variables `params`; and the
  same on `ema` (the EMA weights' variables, metrics prefixed `ema_`) when given. Raises
  evaluators.Stopped when `should_stop()` turns true between two batches."""
  out = {}
  for prefix, variables in [("", params)] + ([("ema_", ema)] if ema is not None else []):
    for name in config.get("evals", tuple(EVALUATORS)):
      ev = EVALUATORS[name](runner, variables, source, config, should_stop)
      out.update({prefix + k: v for k, v in ev.items()})
  return out


def fewshot_evaluator(runner: Runner, source, config, should_stop=None):
  """Few-shot linear probes on the model's pooled representation (the head is ignored), on the
  data set `fewshot.dataset` names (built once per runner) or, when it names none, on `source`
  (the training data set)."""
  run_fn = runner.features()
  fs = config.fewshot
  fields = fs.get("dataset") or {}
  probe = {k: fields[k] for k in sorted(fields.keys())}  # name None: the training data set
  probe = {k: v for k, v in probe.items() if v is not None}
  if probe.get("name"):
    cache = runner.__dict__.setdefault("_fewshot_sources", {})
    key = json.dumps(probe, sort_keys=True)
    if key not in cache:
      cache[key] = data_lib.get_source(ml_collections.ConfigDict(probe))
    source = cache[key]
  return fewshot.FewShotEvaluator(
      run_fn, source, train_split=fs.train_split, test_split=fs.test_split, pp=config.pp_eval,
      shots=tuple(fs.shots), l2_reg=float(fs.l2_reg), num_trials=int(fs.num_trials),
      seed=int(config.seed), batch_size=int(config.eval_batch_size),
      gather=runner.gather_features, should_stop=should_stop)


class StopSignals:
  """SIGTERM (a preemption) and SIGINT (Ctrl-C) set a flag instead of killing the process; the
  loop checks it after every step and the evaluators between batches, then the run saves and
  returns. A second SIGINT interrupts at once (KeyboardInterrupt). Installed only in the main
  thread of a single-process run: with several processes JAX's preemption service (started by
  jax.distributed) takes SIGTERM and picks a step at which all processes stop."""

  def __init__(self, install: bool):
    self.signal = None
    self._previous = {}
    if install:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      raise KeyboardInterrupt()
    self.signal = signum
    logging.warning("Signal %d: stopping at the next step or evaluation batch and saving.",
                    signum)

  def __call__(self) -> bool:
    return self.signal is not None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class DispatchBound:
  """Keeps the host at most `ahead` train steps in front of the device.

  JAX dispatches asynchronously: without a bound the loop queues steps until its next host sync
  (the metrics fetched every `log_every` steps), and a stop signal then waits for all of them
  before the save, e.g. 33 queued steps, 52 s, in a loaded demo run; a preemption's grace period
  may be shorter. Waiting for step k - `ahead` after dispatching step k keeps the device fed
  (the next step is always queued) and bounds the time from a signal to the save by about
  `ahead` + 1 step times."""

  def __init__(self, ahead: int = 2, wait: Callable[[Any], Any] = jax.block_until_ready):
    if ahead < 1:
      raise ValueError(f"ahead must be at least 1, got {ahead}.")
    self.ahead, self._wait, self._in_flight = ahead, wait, collections.deque()

  def push(self, step_outputs) -> None:
    """Call after dispatching a step with its outputs (any pytree of arrays)."""
    self._in_flight.append(step_outputs)
    while len(self._in_flight) > self.ahead:
      self._wait(self._in_flight.popleft())


# ----------------------------------------------------------------------------------- training.


def _write_json(path: str, obj) -> None:
  """Writes `obj` as JSON to `path` atomically (`checkpoint.write_atomic`)."""
  checkpoint.write_atomic(path, json.dumps(obj, indent=2, default=str))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False,
                       progress_every_secs: float = 10.0) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir` and returns the final evaluation metrics.

  A workdir whose run is complete (complete.json) is left as it is: the result says
  `already_complete` (with the step and the metrics it ended with) and nothing is written.
  """
  # ----- Checks: everything the config can get wrong, before any data is read.
  config_checks.validate(config, device_count=jax.device_count(),
                         process_count=jax.process_count(),
                         model_fields=models.fields(config.model_name))
  os.makedirs(workdir, exist_ok=True)
  complete_path = os.path.join(workdir, workdirs.COMPLETE)
  ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=int(config.keep_checkpoints),
                                      async_save=bool(config.checkpoint_async))
  start_step = ckpt.latest_step() or 0

  # ----- Data.
  source = data_lib.get_source(config.dataset)
  batch_size = int(config.batch_size)
  steps_per_epoch = data_lib.steps_per_epoch(source, config.train_split, batch_size)
  total_steps, warmup, log_every, eval_every, ckpt_every = optim.resolve_durations(
      config, steps_per_epoch)
  resume.check_config(workdir, config, start_step=start_step, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, allow_config_change=allow_config_change)
  resume.check_data_order(workdir, source, start_step, allow_config_change)
  if os.path.exists(complete_path) and start_step >= total_steps:
    ckpt.close()
    with open(complete_path) as f:
      done = json.load(f)
    return dict(done, already_complete=True, step=start_step)
  resume.save_config(workdir, config, start_step)
  writer = metrics_lib.create_writer(workdir)

  train_iter = data_lib.train_iterator(
      source, split=config.train_split, pp=config.pp_train, batch_size=batch_size,
      seed=int(config.seed), start_step=start_step, mixup=float(config.mixup),
      cutmix=float(config.cutmix), repeats=int(config.get("repeated_aug", 1)))
  first_batch = next(train_iter)

  # ----- Model and optimizer.
  image_shape = first_batch["image"].shape[1:]
  teacher = workdirs.teacher(config, source.num_classes, image_shape)
  trainer = build_trainer(config, source.num_classes, image_shape, total_steps=total_steps,
                          warmup_steps=warmup, teacher=teacher)
  tx, runner, shardings = trainer.tx, trainer.runner, trainer.shardings
  if source.detection:
    config_checks.detection_queries(trainer.model, source.max_objects)
  ema = bool(config.get("ema_decay", 0.0))

  # ----- State: resumed, pretrained, or fresh; created directly with its sharding.
  if start_step:
    logging.info("Resuming from the checkpoint of step %d in %s", start_step, workdir)
    state = workdirs.restore_state(ckpt, trainer, start_step)
  else:
    rng = jax.random.PRNGKey(int(config.seed))
    state = jax.jit(trainer.init_state, out_shardings=shardings)(rng)
    if config.pretrained.path:
      params = pretrained.load_into(  # any source: .npz, Hugging Face directory, zoo name
          config.pretrained.path, parallel.to_host(state["params"]), model=config.model_name,
          strict=bool(config.pretrained.strict))
      params = parallel.from_host(params, shardings["params"])
      rebuild = lambda st, p: new_state(model_variables(st, p), tx, ema=ema,
                                        teacher=st.get("teacher"))
      state = jax.jit(rebuild, out_shardings=shardings, donate_argnums=(0,))(state, params)
  runner.compile(shardings)
  run_state = runner.to_run_state(state)
  del state
  finite = jax.jit(_finite_leaves)

  # ----- Stop cleanly on SIGTERM / SIGINT: save, then return.
  multiprocess = jax.process_count() > 1
  stop = StopSignals(install=_main_thread() and not multiprocess)

  def save(step, rs, last_metrics):
    """Saves (asynchronously) after checking that the loss, the gradient norm, the parameters
    and the optimizer state are all finite: no saved checkpoint is ever NaN/inf."""
    if last_metrics is not None:
      _check_finite(last_metrics, step, ckpt)
    global_state = runner.to_global_state(rs, shardings)
    bad = [name for name, ok in zip(optim.param_names(global_state),
                                    jax.device_get(finite(global_state))) if not ok]
    if bad:
      _raise_nonfinite(f"non-finite values in {', '.join(bad[:5])}"
                       f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}", step, ckpt)
    ckpt.save(step, global_state, force=True)

  def stopped(step, rs, last_metrics):
    save(step, rs, last_metrics)
    ckpt.wait()
    logging.warning("Signal %d: saved the checkpoint of step %d in %s; run the same command "
                    "again to resume.", stop.signal, step, workdir)
    return {"stopped_at_step": step}

  # ----- The loop.
  progress = metrics_lib.Progress(first_step=start_step, total_steps=total_steps,
                                  batch_size=batch_size)
  # The console line: at the first and last step and every `progress_every_secs` (the metrics
  # rows of metrics.jsonl and TensorBoard follow log_every).
  console = periodic_actions.PeriodicCallback(
      every_secs=progress_every_secs, on_steps=[start_step + 1, total_steps],
      callback_fn=lambda step, t, metrics: logging.info(metrics_lib.format_progress(
          step, total_steps, {**runner.fetch(metrics), **progress.overall(step)})))
  eval_split = config.eval_split
  step, pending, result = start_step, None, {}
  step_metrics = None
  dispatch = DispatchBound()
  batch = runner.train_batch(first_batch) if step < total_steps else None
  logging.info("Training %s for %d steps (%d per epoch) from step %d; batch %d, %s mode on %d "
               "devices.", config.model_name, total_steps, steps_per_epoch, start_step,
               batch_size, runner.mode, jax.device_count())
  try:
    while step < total_steps:
      run_state, step_metrics = runner.update(run_state, batch)
      dispatch.push(step_metrics)
      step += 1
      if step < total_steps:
        batch = runner.train_batch(next(train_iter))  # overlaps with the step in flight
      last = step == total_steps

      if step % log_every == 0 or last:
        m = runner.fetch(step_metrics)
        _check_finite(m, step, ckpt)
        m.update(progress.measure(step))
        writer.write_scalars(step, m)
        pending = None
      else:
        pending = step_metrics
      console(step, metrics=step_metrics)

      if eval_every and step % eval_every == 0 and not last:
        with progress.excluded():
          try:
            writer.write_scalars(step, evaluate_all(
                runner, runner.params_for_eval(run_state), source, config, stop,
                ema=runner.params_for_eval(run_state, ema=True) if ema else None))
          except evaluators.Stopped:
            return stopped(step, run_state, runner.fetch(step_metrics))

      if (ckpt_every and step % ckpt_every == 0) or last:
        with progress.excluded():
          save(step, run_state, runner.fetch(pending) if pending is not None else None)

      if multiprocess and parallel.reached_preemption_sync_point(step):
        stop.signal = signal.SIGTERM
      if stop():
        return stopped(step, run_state, runner.fetch(step_metrics))

    # ----- Final evaluation and export.
    ckpt.wait()
    train_seconds = progress.train_seconds()
    params = runner.params_for_eval(run_state)
    try:
      final = evaluate_all(runner, params, source, config, stop,
                           ema=runner.params_for_eval(run_state, ema=True) if ema else None)
      # The test split, once: choices are made on eval_split (validation), this is the report.
      if config.test_split and config.test_split != eval_split:
        test = evaluate(runner, params, source, config, config.test_split, stop)
        final.update({f"{TEST_PREFIX}_{k}": v for k, v in test.items()})
    except evaluators.Stopped:
      return stopped(step, run_state, None)
    writer.write_scalars(step, final)
    if eval_split:
      prefix = eval_prefix(config) + "_"
      result = {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)}
      result["split"] = eval_prefix(config)
    if config.test_split and config.test_split != eval_split:
      result["test_split"] = config.test_split
      result.update({f"test_{k}": final[f"{TEST_PREFIX}_{k}"] for k in runner.task.result_names
                     if f"{TEST_PREFIX}_{k}" in final})
    result["metrics"] = final
    result.update(steps=step - start_step, examples=(step - start_step) * batch_size,
                  train_seconds=train_seconds)
    if config.export_npz:
      global_state = runner.to_global_state(run_state, shardings)
      for key, name in workdirs.EXPORTS:
        if key in global_state:
          export(global_state[key], os.path.join(workdir, name))
    if jax.process_index() == 0:
      _write_json(complete_path, dict(
          {k: v for k, v in result.items() if k not in ("steps", "examples", "train_seconds")},
          step=step))
    return result
  finally:
    writer.flush()
    ckpt.close()
    stop.restore()


def export(params, path: str):
  """Writes params in the published `.npz` layout (process 0; every process gathers the arrays
  sharded across processes first, so every process must call it)."""
  params = parallel.to_host(params)
  if jax.process_index() == 0:
    npz.save_npz(params, path)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluation only: the run in `workdir` (workdirs.load: its latest checkpoint, or its exported
  weights), or `config.pretrained.path` when the workdir has neither, on the devices here (a mesh
  that does not fit them falls back to data parallelism). The EMA weights, when the run kept
  them, are evaluated beside (metrics prefixed `ema_`)."""
  config = for_these_devices(config)
  source = data_lib.get_source(config.dataset)
  eval_iter = data_lib.eval_iterator(source, split=config.eval_split, pp=config.pp_eval,
                                     batch_size=int(config.get("eval_batch_size",
                                                               config.batch_size)))
  shape = next(iter(eval_iter))["image"].shape[1:]
  trainer = build_trainer(config, source.num_classes, shape, total_steps=1, warmup_steps=0)
  runner = trainer.runner
  ema = None
  if workdirs.is_workdir(workdir):
    run = workdirs.load(workdir, config=config, num_classes=source.num_classes,
                        image_shape=shape)
    params, ema = run.variables, run.ema_variables
  elif config.get("pretrained") and config.pretrained.get("path"):
    variables = jax.device_get(trainer.init_variables(jax.random.PRNGKey(0)))
    variables["params"] = pretrained.load_into(
        config.pretrained.path, variables["params"], model=config.model_name,
        strict=bool(config.pretrained.get("strict", True)))
    params = variables
  else:
    raise errors.MissingFileError(f"No checkpoint in {workdir} and no config.pretrained.path to "
                                  "evaluate; train first or point pretrained.path at an .npz file.")
  place = parallel.replicate if runner.mode == "pmap" else lambda v: v
  result = evaluate(runner, place(params), source, config, config.eval_split)
  if ema is not None:
    result.update({f"ema_{k}": v for k, v in
                   evaluate(runner, place(ema), source, config, config.eval_split).items()})
  result["split"] = eval_prefix(config)
  return result


def _finite_leaves(tree):
  """A bool per leaf of `tree` (jit it): True where every value is finite (non-float: True)."""
  return [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
          for x in jax.tree_util.tree_leaves(tree)]


def _raise_nonfinite(what: str, step: int, ckpt) -> None:
  kept = ckpt.latest_step()
  raise NonFiniteLossError(
      f"{what} at step {step}: training stopped. The last good checkpoint "
      f"({'step ' + str(kept) if kept is not None else 'none yet'}) is kept; lower lr.base, "
      "add warm-up or gradient clipping, then rerun to resume from it.")


def _check_finite(m: Dict[str, float], step: int, ckpt) -> None:
  bad = {k: v for k, v in m.items() if k in ("train_loss", "grad_norm") and not np.isfinite(v)}
  if bad:
    _raise_nonfinite(str(bad), step, ckpt)


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
