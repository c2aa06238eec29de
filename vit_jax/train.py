"""The one training loop, for every model family: config in, trained checkpoint and metrics out.

Reads top to bottom: set-up, data, model and optimizer, state (fresh, pretrained or resumed),
step functions (jit over a mesh, or pmap), the loop (log, evaluate, checkpoint, stop cleanly),
final evaluation and export.
"""
import os
import re
import signal
from typing import Any, Callable, Dict, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import data as data_lib
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax.evaluators import classification
from vit_jax.evaluators import fewshot


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last good checkpoint was kept."""


# ------------------------------------------------------------------------------ building blocks.
def build_model(config, num_classes: int):
  model_cfg = config.get("model")
  overrides = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
  for key in ("dtype", "param_dtype"):
    if isinstance(overrides.get(key), str):
      overrides[key] = jnp.dtype(overrides[key])
  return models.get_model(config.model_name, num_classes=num_classes, **overrides)


def make_update_fn(model, tx, schedule, config, *, axis_name: Optional[str] = None) -> Callable:
  """The pure update: (state, batch) -> (state, metrics). With `axis_name` (pmap) the gradients
  and metrics are averaged over that axis; under jit the batch is global and nothing is needed."""
  smoothing = float(config.get("label_smoothing", 0.0))
  accum = int(config.get("grad_accum_steps", 1))
  seed = int(config.seed)

  def loss_fn(params, images, labels, rng):
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    if smoothing:
      labels = labels * (1.0 - smoothing) + smoothing / labels.shape[-1]
    loss = optax.softmax_cross_entropy(logits, labels).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
    return loss, acc

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state, batch):
    step, params = state["step"], state["params"]
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    if axis_name:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    images, labels = batch["image"], batch["label"]
    if accum == 1:
      (loss, acc), grads = grad_fn(params, images, labels, rng)
    else:
      if images.shape[0] % accum:
        raise ValueError(f"batch {images.shape[0]} per device is not divisible by "
                         f"grad_accum_steps={accum}")
      split = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

      def micro(carry, xs):
        i, im, lb = xs
        (l, a), g = grad_fn(params, im, lb, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (l, a, g)), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
      (loss, acc, grads), _ = jax.lax.scan(
          micro, zeros, (jnp.arange(accum), split(images), split(labels)))
      loss, acc, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, acc, grads))
    if axis_name:
      loss, acc, grads = jax.lax.pmean((loss, acc, grads), axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = dict(step=step + 1, params=optax.apply_updates(params, updates),
                     opt_state=opt_state)
    metrics = dict(train_loss=loss, train_accuracy=acc, grad_norm=optax.global_norm(grads),
                   lr=schedule(step))
    return new_state, metrics

  return update


def make_eval_fn(model, *, axis_name: Optional[str] = None) -> Callable:
  """(params, batch) -> sums of correct predictions, loss and real examples (mask)."""
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=False)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1)) * mask
    loss = optax.softmax_cross_entropy(logits, batch["label"]) * mask
    out = dict(correct=correct.sum(), loss=loss.sum(), count=mask.sum())
    return jax.lax.psum(out, axis_name) if axis_name else out
  return eval_step


def new_state(params, tx):
  """The train state the update function takes: step 0, `params`, fresh optimizer state."""
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


class Trainer(NamedTuple):
  """What `build_trainer` makes from a config; shapes only, nothing initialised yet."""
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  runner: "Runner"
  init_params: Callable  # rng -> params
  init_state: Callable  # rng -> fresh train state
  abstract_state: Any  # jax.ShapeDtypeStruct leaves
  shardings: Any  # the state's global (checkpoint-layout) shardings


def build_trainer(config, num_classes: int, image_shape, *, total_steps: int,
                  warmup_steps: int) -> Trainer:
  """Model, optimizer, step functions and the state's shardings for images of `image_shape`
  (H, W, C): the set-up the training loop, evaluation-only mode and the benchmarks share."""
  model = build_model(config, num_classes)
  init_images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init_params = lambda rng: model.init(rng, init_images, train=False)["params"]
  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, schedule = optim.make_optimizer(config, abstract_params, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  runner = Runner(config, model, tx, schedule)
  init_state = lambda rng: new_state(init_params(rng), tx)
  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  return Trainer(model, tx, schedule, runner, init_params, init_state, abstract_state,
                 runner.shardings(abstract_state))


class Runner:
  """Puts batches and state where the chosen parallel mode wants them and runs the steps."""

  def __init__(self, config, model, tx, schedule):
    self.mode = config.get("parallel", "jit")
    if self.mode not in ("jit", "pmap"):
      raise ValueError(f"Unknown parallel mode {self.mode!r}: use 'jit' or 'pmap'.")
    self.mesh = parallel.make_mesh(config.get("mesh"))
    self.config, self.model = config, model
    self._features = None
    if self.mode == "pmap":
      ax = parallel.PMAP_AXIS
      self.update = jax.pmap(make_update_fn(model, tx, schedule, config, axis_name=ax),
                             axis_name=ax, donate_argnums=(0,))
      self.eval_step = jax.pmap(make_eval_fn(model, axis_name=ax), axis_name=ax)
    else:
      self.update = make_update_fn(model, tx, schedule, config)
      self.eval_step = jax.jit(make_eval_fn(model))

  def shardings(self, abstract_state):
    """The checkpoint-side (global, jit-mode) sharding of every leaf of the state."""
    sh = self.config.get("sharding") or {}
    return parallel.state_shardings(
        abstract_state, self.mesh, min_fsdp_size=int(sh.get("min_fsdp_size", 2 ** 14)),
        rules=list(sh.get("rules", ())))

  def compile(self, state_shardings):
    if self.mode == "jit":
      self.update = jax.jit(self.update, donate_argnums=(0,),
                            in_shardings=(state_shardings, parallel.batch_sharding(self.mesh)),
                            out_shardings=(state_shardings, parallel.replicated(self.mesh)))

  def to_device_batch(self, local_batch):
    if self.mode == "pmap":
      return parallel.pmap_shard(local_batch)
    return parallel.global_batch(local_batch, self.mesh)

  def to_run_state(self, state):
    """Global (checkpoint-layout) state -> what the step takes."""
    if self.mode == "pmap":
      return parallel.replicate(state)
    return state

  def to_global_state(self, state, state_shardings):
    """What the step returns -> global (checkpoint-layout) state."""
    if self.mode == "pmap":
      return parallel.from_host(parallel.unreplicate(state), state_shardings)
    return state

  def params_for_eval(self, state):
    return state["params"]

  def features(self):
    """(params, host batch) -> the model's pooled (pre-head) features; compiled once per runner,
    so evaluations during training reuse it."""
    if self._features is None:
      pooled = self.model.clone(num_classes=0)
      fn = lambda p, images: pooled.apply({"params": p}, images, train=False)
      fn = jax.pmap(fn, axis_name=parallel.PMAP_AXIS) if self.mode == "pmap" else jax.jit(fn)
      self._features = lambda p, b: fn(p, self.to_device_batch(b)["image"])
    return self._features

  def gather_features(self, x):
    """Features from a step -> this host's numpy rows ((devices, b, D) -> (devices*b, D) in
    pmap mode; the process-local rows of a global array under jit)."""
    if self.mode == "pmap":
      x = np.asarray(x)
      return x.reshape((-1,) + x.shape[2:])
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
      start = s.index[0].start or 0
      if start not in seen:
        seen.add(start)
        rows.append(np.asarray(s.data))
    return np.concatenate(rows)

  def fetch(self, tree):
    """Device metrics -> Python floats (the first replica in pmap mode)."""
    tree = parallel.unreplicate(tree) if self.mode == "pmap" else jax.device_get(tree)
    return jax.tree_util.tree_map(float, tree)


def evaluate(runner: Runner, params, source, config, split: str) -> Dict[str, float]:
  """Top-1 accuracy and loss over every example of `split` (the last batch padded and masked)."""
  ev = classification.ClassificationEvaluator(
      lambda p, b: runner.eval_step(p, runner.to_device_batch(b)), source, split=split,
      pp=config.pp_eval, batch_size=config.get("eval_batch_size", config.batch_size),
      fetch=runner.fetch)
  return ev.run(params)


def split_name(split: str) -> str:
  """A metric prefix for a split string: 'test[:50]' -> 'test', 'train@seeded(...)' -> 'train'."""
  return re.split(r"[\[@+]", split, maxsplit=1)[0]


def evaluate_all(runner: Runner, params, source, config) -> Dict[str, float]:
  """Every evaluator the config declares: top-1 on `eval_split`, few-shot when `fewshot.shots`."""
  out = {}
  if config.get("eval_split"):
    ev = evaluate(runner, params, source, config, config.eval_split)
    out.update({f"{split_name(config.eval_split)}_{k}": v for k, v in ev.items()})
  fs = config.get("fewshot")
  if fs and fs.get("shots"):
    out.update(fewshot_evaluator(runner, source, config).run(params))
  return out


def fewshot_evaluator(runner: Runner, source, config):
  """Few-shot linear probes on the model's pooled representation (the head is ignored)."""
  run_fn = runner.features()
  fs = config.fewshot
  return fewshot.FewShotEvaluator(
      run_fn, source, train_split=fs.train_split, test_split=fs.test_split, pp=config.pp_eval,
      shots=tuple(fs.shots), l2_reg=float(fs.l2_reg), num_trials=int(fs.num_trials),
      seed=int(config.seed), batch_size=int(config.get("eval_batch_size", config.batch_size)),
      gather=runner.gather_features)


# ----------------------------------------------------------------------------------- training.
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir` and returns the final evaluation metrics."""
  # ----- Set-up.
  os.makedirs(workdir, exist_ok=True)
  writer = metrics_lib.create_writer(workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # ----- Data.
  source = data_lib.get_source(config.dataset)
  batch_size = int(config.batch_size)
  steps_per_epoch = data_lib.steps_per_epoch(source, config.train_split, batch_size)
  total_steps = optim.durations(config, "total", steps_per_epoch=steps_per_epoch,
                                batch_size=batch_size, required=True)
  every = lambda name, default: optim.durations(
      config, name, steps_per_epoch=steps_per_epoch, batch_size=batch_size, default=default)
  log_every = every("log_every", max(1, min(100, total_steps // 20)))
  eval_every = every("eval_every", 0)
  ckpt_every = every("checkpoint_every", 0)

  ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=int(config.get("keep_checkpoints", 2)))
  start_step = ckpt.latest_step() or 0
  train_iter = data_lib.train_iterator(
      source, split=config.train_split, pp=config.pp_train, batch_size=batch_size,
      seed=int(config.seed), start_step=start_step, mixup=float(config.get("mixup", 0.0)))
  first_batch = next(train_iter)

  # ----- Model and optimizer.
  warmup = optim.durations(config, "lr.warmup", steps_per_epoch=steps_per_epoch,
                           batch_size=batch_size)
  trainer = build_trainer(config, source.num_classes, first_batch["image"].shape[1:],
                          total_steps=total_steps, warmup_steps=warmup)
  tx, runner, shardings = trainer.tx, trainer.runner, trainer.shardings

  # ----- State: resumed, pretrained, or fresh; created directly with its sharding.
  if start_step:
    logging.info("Resuming from the checkpoint of step %d in %s", start_step, workdir)
    state = ckpt.restore(trainer.abstract_state, shardings=shardings)
  else:
    rng = jax.random.PRNGKey(int(config.seed))
    state = jax.jit(trainer.init_state, out_shardings=shardings)(rng)
    if config.get("pretrained") and config.pretrained.get("path"):
      params = checkpoint.load_pretrained(
          config.pretrained.path, parallel.to_host(state["params"]),
          strict=bool(config.pretrained.get("strict", True)))
      params = parallel.from_host(params, shardings["params"])
      state = jax.jit(lambda p: new_state(p, tx), out_shardings=shardings)(params)
  runner.compile(shardings)
  run_state = runner.to_run_state(state)
  del state

  # ----- Stop cleanly on SIGTERM (preemption): save, then return. With several processes, JAX's
  # preemption service (started by jax.distributed) catches it and picks a step all stop at.
  stop = {"signal": None}
  def on_signal(signum, _):
    stop["signal"] = signum
  multiprocess = jax.process_count() > 1
  previous_handler = (signal.signal(signal.SIGTERM, on_signal)
                      if _main_thread() and not multiprocess else None)

  def save(step, rs, last_metrics):
    if last_metrics is not None:
      _check_finite(last_metrics, step, ckpt)
    ckpt.save(step, runner.to_global_state(rs, shardings), force=True)

  # ----- The loop.
  progress = metrics_lib.Progress(first_step=start_step, total_steps=total_steps,
                                  batch_size=batch_size)
  eval_split = config.get("eval_split")
  step, pending, result = start_step, None, {}
  batch = runner.to_device_batch(first_batch)
  logging.info("Training %s for %d steps (%d per epoch) from step %d; batch %d, %s mode on %d "
               "devices.", config.model_name, total_steps, steps_per_epoch, start_step,
               batch_size, runner.mode, jax.device_count())
  try:
    while step < total_steps:
      run_state, step_metrics = runner.update(run_state, batch)
      step += 1
      if step < total_steps:
        batch = runner.to_device_batch(next(train_iter))  # overlaps with the step in flight
      last = step == total_steps

      if step % log_every == 0 or last:
        m = runner.fetch(step_metrics)
        _check_finite(m, step, ckpt)
        m.update(progress.measure(step))
        writer.write_scalars(step, m)
        logging.info(metrics_lib.format_progress(step, total_steps, m))
        pending = None
      else:
        pending = step_metrics

      if eval_every and step % eval_every == 0 and not last:
        with progress.excluded():
          writer.write_scalars(step, evaluate_all(
              runner, runner.params_for_eval(run_state), source, config))

      if (ckpt_every and step % ckpt_every == 0) or last:
        with progress.excluded():
          save(step, run_state, runner.fetch(pending) if pending is not None else None)

      if multiprocess and parallel.reached_preemption_sync_point(step):
        stop["signal"] = signal.SIGTERM
      if stop["signal"] is not None:
        save(step, run_state, runner.fetch(step_metrics))
        ckpt.wait()
        logging.warning("Signal %d: saved the checkpoint of step %d in %s; run the same "
                        "command again to resume.", stop["signal"], step, workdir)
        return {"stopped_at_step": step}

    # ----- Final evaluation and export.
    ckpt.wait()
    train_seconds = progress.train_seconds()
    params = runner.params_for_eval(run_state)
    final = evaluate_all(runner, params, source, config)
    writer.write_scalars(step, final)
    if eval_split:
      prefix = split_name(eval_split) + "_"
      result = {k[len(prefix):]: v for k, v in final.items() if k.startswith(prefix)}
      result["split"] = split_name(eval_split)
    result["metrics"] = final
    result.update(steps=step - start_step, examples=(step - start_step) * batch_size,
                  train_seconds=train_seconds)
    if config.get("export_npz", True):
      export(runner.to_global_state(run_state, shardings)["params"],
             os.path.join(workdir, "params.npz"))
    return result
  finally:
    writer.flush()
    ckpt.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)


def export(params, path: str):
  """Writes params in the published `.npz` layout (process 0; gathers sharded arrays first)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    checkpoint.save_npz(jax.device_get(params), path)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluation only: the latest checkpoint in `workdir`, or `config.pretrained.path` (.npz)."""
  source = data_lib.get_source(config.dataset)
  eval_iter = data_lib.eval_iterator(source, split=config.eval_split, pp=config.pp_eval,
                                     batch_size=int(config.get("eval_batch_size",
                                                               config.batch_size)))
  shape = next(iter(eval_iter))["image"].shape[1:]
  trainer = build_trainer(config, source.num_classes, shape, total_steps=1, warmup_steps=0)
  runner = trainer.runner
  ckpt = checkpoint.TrainCheckpointer(workdir)
  step = ckpt.latest_step()
  if step is not None:
    params = ckpt.restore(trainer.abstract_state, shardings=trainer.shardings)["params"]
  elif config.get("pretrained") and config.pretrained.get("path"):
    params = checkpoint.load_pretrained(config.pretrained.path,
                                        jax.device_get(trainer.init_params(jax.random.PRNGKey(0))),
                                        strict=bool(config.pretrained.get("strict", True)))
  else:
    raise FileNotFoundError(f"No checkpoint in {workdir} and no config.pretrained.path to "
                            "evaluate; train first or point pretrained.path at an .npz file.")
  ckpt.close()
  if runner.mode == "pmap":
    params = parallel.replicate(params)
  result = evaluate(runner, params, source, config, config.eval_split)
  result["split"] = split_name(config.eval_split)
  return result


def _check_finite(m: Dict[str, float], step: int, ckpt) -> None:
  bad = {k: v for k, v in m.items() if k in ("train_loss", "grad_norm") and not np.isfinite(v)}
  if bad:
    kept = ckpt.latest_step()
    raise NonFiniteLossError(
        f"{bad} at step {step}: training stopped. The last good checkpoint "
        f"({'step ' + str(kept) if kept is not None else 'none yet'}) is kept; lower lr.base, "
        "add warm-up or gradient clipping, then rerun to resume from it.")


def _main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
