"""The trainer's parts, built from a config: the model, the update and evaluation steps and
their losses, the train state, and the Runner that places batches and state on the devices (jit
over a mesh, or pmap). The training loop (vit_jax.train), evaluation-only mode, the workdir loader
(vit_jax.workdirs), the benchmarks and the planner (vit_jax.plan) build theirs here.
"""
import contextlib
from typing import Any, Callable, NamedTuple, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import config_checks
from vit_jax import errors
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import tasks

# ------------------------------------------------------------------------------ building blocks.
def build_model(config, num_classes: int):
  model_cfg = config.get("model")
  overrides = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
  for key in ("dtype", "param_dtype"):
    if isinstance(overrides.get(key), str):
      overrides[key] = jnp.dtype(overrides[key])
  num_classes = tasks.get(config).num_classes(num_classes)
  return models.get_model(config.model_name, num_classes=num_classes, **overrides)


def make_update_fn(model, tx, schedule, config, *, axis_name: Optional[str] = None,
                   teacher=None, mesh=None) -> Callable:
  """The pure update: (state, batch) -> (state, metrics). With `axis_name` (pmap) the gradients,
  metrics and BatchNorm statistics are averaged over that axis; under jit the batch is global and
  nothing is needed.

  Random layers (dropout, stochastic depth) draw from a key per example,
  fold_in(fold_in(PRNGKey(seed), step), row), where `row` (batch["row"]) is the example's row in
  the logical global batch (host p's rows come after host p-1's). So the masks depend on
  (seed, step, example) only: jit, pmap and any number of devices or hosts draw the same ones.
  Models with BatchNorm (state["batch_stats"]) run the batch in one call instead (a per-example
  call would normalise every example by itself), with the key of the batch's first row; their
  statistics are those of the global batch under jit and the per-device ones averaged under pmap,
  so only for them jit and pmap differ. A task whose outputs are not per example (`one_call`,
  DETR's) runs the batch in one call as well, its dropout keyed by the first row.

  Gradient accumulation splits the batch strided: micro-batch i holds rows i, i + accum,
  i + 2 * accum, ... With each device holding a contiguous block of rows whose size is a
  multiple of accum, every micro-batch is spread over all devices and no example moves between
  devices (contiguous micro-batches would sit on 1/accum of the devices, and XLA would gather
  the images to compute each of them there).

  What is learnt is the task's (vit_jax/tasks, picked by config.loss): the batch keys the update
  reads, the model's inputs, the loss and its metrics. `teacher` (a Module; its variables are
  state["teacher"]) gives the task the teacher's outputs on the same inputs (distillation).
  With config.ema_decay > 0, state["ema_params"] follows the parameters after every update, and
  state["ema_batch_stats"] the BatchNorm statistics, with the same decay (as timm's ModelEmaV3
  averages a model's buffers with its weights): the EMA weights are evaluated with statistics of
  the same average, not with the live ones, which belong to the live weights.
  """
  task = tasks.get(config)
  accum = int(config.grad_accum_steps)
  seed = int(config.seed)
  ema_decay = float(config.get("ema_decay", 0.0))

  def forward(params, extra, inputs, rows, rng):
    """Training outputs, and the updated BatchNorm statistics (or {}); `inputs`: the model's
    positional inputs, (images,) or (images, image_mask), batched."""
    images = inputs[0]
    if extra:
      key = jax.random.fold_in(rng, rows[0])
      return model.apply({"params": params, **extra}, *inputs, train=True,
                         rngs={"dropout": key}, mutable=list(extra))
    if task.one_call:  # its outputs are not per example (DETR's decoder layers come first)
      key = jax.random.fold_in(rng, rows[0])
      return model.apply({"params": params}, *inputs, train=True, rngs={"dropout": key}), {}
    if _draws_random(model, params, images):
      def one(example, row):  # one example, its own key
        key = jax.random.fold_in(rng, row)
        with sharded(per_example=True):
          out = model.apply({"params": params}, *[x[None] for x in example], train=True,
                            rngs={"dropout": key})
        return jax.tree_util.tree_map(lambda o: o[0], out)
      # Under jit over a mesh the vmapped (example) axis is split as the batch is.
      spmd = parallel.BATCH_AXES if mesh is not None else None
      return jax.vmap(one, spmd_axis_name=spmd)(inputs, rows), {}
    # Nothing random: the batch in one call (the vmap above costs 6-16% on CPU).
    with sharded():
      return model.apply({"params": params}, *inputs, train=True), {}

  def sharded(per_example: bool = False):
    """Under jit over `mesh`: the mesh and the logical axis rules that keep the models'
    annotated activations (layers.TOKENS) split over the batch axes; otherwise nothing."""
    if mesh is None:
      return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
    stack.enter_context(nn.logical_axis_rules(parallel.activation_rules(per_example)))
    return stack

  def loss_fn(params, extra, teacher_vars, batch, rows, rng):
    """(loss, (metrics, new BatchNorm statistics)) of a (micro-)batch: the task's batch keys."""
    inputs = task.inputs(batch)
    out, new_extra = forward(params, extra, inputs, rows, rng)
    teacher_out = None
    if teacher is not None:
      teacher_out = jax.lax.stop_gradient(teacher.apply(teacher_vars, *inputs, train=False))
    loss, aux = task.loss(out, batch, teacher_out)
    return loss, (aux, new_extra)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  batch_keys, aux_names = task.batch_keys, task.metric_names

  def update(state, batch):
    step, params = state["step"], state["params"]
    extra = {k: state[k] for k in MODEL_STATE if k in state}
    teacher_vars = state.get("teacher")
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    inputs = {k: batch[k] for k in batch_keys if k in batch}
    rows = batch["row"]
    if accum == 1:
      (loss, (aux, new_extra)), grads = grad_fn(params, extra, teacher_vars, inputs, rows, rng)
    else:
      if rows.shape[0] % accum:
        raise errors.ConfigError(f"batch {rows.shape[0]} per device is not divisible by "
                                 f"grad_accum_steps={accum}")
      # (B, ...) -> (accum, B / accum, ...), micro-batch i = rows i::accum (see the docstring).
      split = lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)

      def micro(carry, xs):
        (l, a, g), ex = carry
        inp, rw = xs
        (l2, (a2, ex2)), g2 = grad_fn(params, ex, teacher_vars, inp, rw, rng)
        return (jax.tree_util.tree_map(jnp.add, (l, a, g), (l2, a2, g2)), ex2), None

      zeros = (jnp.zeros(()), {k: jnp.zeros(()) for k in aux_names},
               jax.tree_util.tree_map(jnp.zeros_like, params))
      ((loss, aux, grads), new_extra), _ = jax.lax.scan(
          micro, (zeros, extra), (jax.tree_util.tree_map(split, inputs), split(rows)))
      loss, aux, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, aux, grads))
    if axis_name:
      loss, aux, grads, new_extra = jax.lax.pmean((loss, aux, grads, new_extra), axis_name)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = dict(state, step=step + 1, params=new_params, opt_state=opt_state, **new_extra)
    if ema_decay:
      average = lambda old, new: jax.tree_util.tree_map(
          lambda e, p: e + (1.0 - ema_decay) * (p - e), old, new)
      new_state["ema_params"] = average(state["ema_params"], new_params)
      for k, v in new_extra.items():
        new_state[f"ema_{k}"] = average(state[f"ema_{k}"], v)
    metrics = dict(train_loss=loss, **aux, grad_norm=optax.global_norm(grads),
                   lr=schedule(step))
    return new_state, metrics

  return update


MODEL_STATE = ("batch_stats",)  # variable collections besides params that training updates


def _draws_random(model, params, images) -> bool:
  """Whether the model's training forward takes a 'dropout' rng (dropout or stochastic depth
  with a rate > 0); checked on shapes only, when the update is traced."""
  try:
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=True), params, images[:1])
  except flax.errors.InvalidRngError:
    return True
  return False


def make_eval_fn(model, *, axis_name: Optional[str] = None, config=None) -> Callable:
  """The eval step of `config`'s task (default: classification's (variables, batch) -> sums of
  correct predictions, loss and real examples)."""
  task = tasks.get(config) if config is not None else tasks.task_class("classification")(
      ml_collections.ConfigDict())
  return task.eval_step(model, axis_name=axis_name)


def new_state(variables, tx, *, ema: bool = False, teacher=None):
  """The train state the update function takes: step 0, the model's `variables` (params and
  BatchNorm statistics), fresh optimizer state, the EMAs of the params and of the statistics
  (copies: `ema_params`, `ema_batch_stats`) when `ema`, and the frozen teacher's variables when
  distilling."""
  params = variables["params"]
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  state.update({k: variables[k] for k in MODEL_STATE if k in variables})
  if ema:
    state.update({f"ema_{k}": jax.tree_util.tree_map(jnp.copy, variables[k])
                  for k in ("params",) + MODEL_STATE if k in variables})
  if teacher is not None:
    state["teacher"] = teacher
  return state


def model_variables(state, params=None, *, ema: bool = False):
  """The variables `model.apply` takes, from a train state (`params` replaces its params); `ema`:
  the EMA weights with the EMA of the BatchNorm statistics (new_state)."""
  prefix = "ema_" if ema else ""
  return {"params": state[prefix + "params"] if params is None else params,
          **{k: state[prefix + k] for k in MODEL_STATE if prefix + k in state}}


class Trainer(NamedTuple):
  """What `build_trainer` makes from a config; shapes only, nothing initialised yet."""
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  runner: "Runner"
  init_params: Callable  # rng -> params
  init_variables: Callable  # rng -> params and BatchNorm statistics
  init_state: Callable  # rng -> fresh train state
  abstract_state: Any  # jax.ShapeDtypeStruct leaves
  shardings: Any  # the state's global (checkpoint-layout) shardings


def build_trainer(config, num_classes: int, image_shape, *, total_steps: int,
                  warmup_steps: int, teacher=None, devices=None) -> Trainer:
  """Model, optimizer, step functions and the state's shardings for images of `image_shape`
  (H, W, C): the set-up the training loop, evaluation-only mode, the benchmarks and the planner
  share. `teacher`: (module, variables) of the distillation teacher (`load_teacher`), or None.
  `devices`: the mesh's devices (default: all of them; vit_jax.plan passes a TPU topology's)."""
  model = build_model(config, num_classes)
  config_checks.model_shapes(model, image_shape)
  init_images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  init_variables = lambda rng: dict(model.init(rng, init_images, train=False))
  init_params = lambda rng: init_variables(rng)["params"]
  abstract_params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
  tx, schedule = optim.make_optimizer(config, abstract_params, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  teacher_module, teacher_vars = teacher if teacher is not None else (None, None)
  runner = Runner(config, model, tx, schedule, teacher=teacher_module, devices=devices)
  ema = bool(config.get("ema_decay", 0.0))
  init_state = lambda rng: new_state(init_variables(rng), tx, ema=ema, teacher=teacher_vars)
  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  return Trainer(model, tx, schedule, runner, init_params, init_variables, init_state,
                 abstract_state, runner.shardings(abstract_state))


class Runner:
  """Puts batches and state where the chosen parallel mode wants them and runs the steps."""

  def __init__(self, config, model, tx, schedule, teacher=None, devices=None):
    self.mode = config.get("parallel", "jit")
    if self.mode not in ("jit", "pmap"):
      raise errors.ConfigError(f"Unknown parallel mode {self.mode!r}: use 'jit' or 'pmap'.")
    # `devices` passed only when given, so that a make_mesh with its own default devices (the
    # drills' functools.partial) keeps them.
    self.mesh = (parallel.make_mesh(config.get("mesh")) if devices is None else
                 parallel.make_mesh(config.get("mesh"), devices=devices))
    self.config, self.model = config, model
    self.task = tasks.get(config)
    self._features = None
    self._predict = None
    if self.mode == "pmap":
      ax = parallel.PMAP_AXIS
      # devices=None: this process's devices (what pmap does by default); the planner passes a
      # TPU topology's devices.
      self.update = jax.pmap(make_update_fn(model, tx, schedule, config, axis_name=ax,
                                            teacher=teacher),
                             axis_name=ax, donate_argnums=(0,), devices=devices)
      eval_step = self.task.eval_step(model, axis_name=ax)
      self.eval_step = eval_step and jax.pmap(eval_step, axis_name=ax, devices=devices)
    else:
      self.update = make_update_fn(model, tx, schedule, config, teacher=teacher, mesh=self.mesh)
      eval_step = self.task.eval_step(model)
      self.eval_step = eval_step and jax.jit(eval_step)

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
    """This host's numpy rows -> what the (eval/feature) step takes."""
    if self.mode == "pmap":
      return parallel.pmap_shard(local_batch)
    return parallel.global_batch(local_batch, self.mesh)

  def train_batch(self, local_batch):
    """A training batch from `data.train_iterator` -> what the update takes: what the loss
    reads (the task's batch_keys: e.g. images and labels) and
    `row`, each example's row in the logical global batch (host p's rows follow host p-1's),
    which keys its dropout and stochastic-depth draws (make_update_fn)."""
    b = len(local_batch["image"])
    rows = jax.process_index() * b + np.arange(b, dtype=np.int32)
    keys = self.task.batch_keys
    return self.to_device_batch(dict({k: local_batch[k] for k in keys if k in local_batch},
                                     row=rows))

  def predict(self):
    """(variables, host batch) -> the model's evaluation outputs `logits` and `boxes` (a DETR
    model; the batch's `image_mask` is its mask), compiled once per runner."""
    if self._predict is None:
      def fn(v, images, mask):
        out = self.model.apply(v, images, mask, train=False)
        return {"logits": out["logits"], "boxes": out["boxes"]}
      fn = jax.pmap(fn, axis_name=parallel.PMAP_AXIS) if self.mode == "pmap" else jax.jit(fn)

      def run(variables, batch):
        d = self.to_device_batch({k: batch[k] for k in ("image", "image_mask")})
        return fn(variables, d["image"], d["image_mask"])
      self._predict = run
    return self._predict

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

  def params_for_eval(self, state, ema: bool = False):
    """The variables evaluators apply the model with (`ema`: the EMA of the params and of the
    BatchNorm statistics)."""
    return model_variables(state, ema=ema)

  def features(self):
    """(variables, host batch) -> the model's pooled (pre-head) features; compiled once per
    runner, so evaluations during training reuse it."""
    if self._features is None:
      pooled = self.model.clone(num_classes=0)
      fn = lambda v, images: pooled.apply(v, images, train=False)
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


def for_these_devices(config):
  """A copy of `config` whose mesh fits this process's view of the devices (parallel.
  mesh_for_devices): for evaluating or predicting with a run trained on another mesh."""
  config = ml_collections.ConfigDict(config.to_dict())
  mesh = parallel.mesh_for_devices(config.get("mesh"), jax.device_count())
  if mesh is not config.get("mesh"):
    config.mesh = ml_collections.ConfigDict(mesh)
  return config
