"""The one training loop, for every model family: config in, trained checkpoint and metrics out.

Reads top to bottom: set-up, data, model and optimizer, state (fresh, pretrained or resumed),
step functions (jit over a mesh, or pmap), the loop (log, evaluate, checkpoint, stop cleanly),
final evaluation and export.
"""
import collections
import contextlib
import json
import os
import re
import signal
from typing import Any, Callable, Dict, NamedTuple, Optional

from absl import logging
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import config_checks
from vit_jax import data as data_lib
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import pretrained
from vit_jax import evaluators
from vit_jax.detection import loss as detection_loss
from vit_jax.evaluators import classification
from vit_jax.evaluators import detection as detection_eval
from vit_jax.evaluators import fewshot


class NonFiniteLossError(FloatingPointError):
  """The loss, the gradient norm, a parameter or the optimizer state became NaN/inf; the last
  good checkpoint was kept."""


# ------------------------------------------------------------------------------ building blocks.
def build_model(config, num_classes: int):
  model_cfg = config.get("model")
  overrides = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
  for key in ("dtype", "param_dtype"):
    if isinstance(overrides.get(key), str):
      overrides[key] = jnp.dtype(overrides[key])
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
  so only for them jit and pmap differ. DETR (config.loss="detr") runs the batch in one call as
  well, its dropout keyed by the first row.

  Gradient accumulation splits the batch strided: micro-batch i holds rows i, i + accum,
  i + 2 * accum, ... With each device holding a contiguous block of rows whose size is a
  multiple of accum, every micro-batch is spread over all devices and no example moves between
  devices (contiguous micro-batches would sit on 1/accum of the devices, and XLA would gather
  the images to compute each of them there).

  `teacher` (a Module; its variables are state["teacher"]) turns on distillation (`loss_terms`).
  With config.ema_decay > 0, state["ema_params"] follows the parameters after every update.

  config.loss="detr": the model also takes batch["image_mask"] and the loss is DETR's set loss
  (vit_jax.detection.loss.detr_loss, weights from config.detr) over the whole (micro-)batch, with
  the targets batch["boxes"], ["labels"] and ["mask"] (real objects); the metrics hold its
  unweighted last-layer terms (train_loss_ce, train_loss_bbox, train_loss_giou) instead of the
  accuracy.
  """
  detr = config.get("loss", "classification") == "detr"
  detr_weights = dict(config.detr) if detr else {}
  smoothing = float(config.label_smoothing)
  accum = int(config.grad_accum_steps)
  seed = int(config.seed)
  ema_decay = float(config.get("ema_decay", 0.0))
  distill = config.get("distill") or {}

  def forward(params, extra, inputs, rows, rng):
    """Training outputs, and the updated BatchNorm statistics (or {}); `inputs`: the model's
    positional inputs, (images,) or (images, image_mask), batched."""
    images = inputs[0]
    if extra:
      key = jax.random.fold_in(rng, rows[0])
      return model.apply({"params": params, **extra}, *inputs, train=True,
                         rngs={"dropout": key}, mutable=list(extra))
    if detr:  # one call too: its outputs put the decoder layers first (`aux_*`), not the batch
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
    """(loss, (metrics, new BatchNorm statistics)) of a (micro-)batch: the `batch_keys`."""
    if detr:
      inputs = (batch["image"],) + ((batch["image_mask"],) if "image_mask" in batch else ())
      out, new_extra = forward(params, extra, inputs, rows, rng)
      loss, parts = detection_loss.detr_loss(out, batch, **detr_weights)
      return loss, ({f"train_{k}": parts[k] for k in DETR_METRICS}, new_extra)
    images, labels = batch["image"], batch["label"]
    out, new_extra = forward(params, extra, (images,), rows, rng)
    teacher_logits = None
    if teacher is not None:
      teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_vars, images, train=False))
    loss, logits = loss_terms(out, labels, teacher_logits, smoothing=smoothing, **distill)
    acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(labels, -1))
    return loss, ({"train_accuracy": acc}, new_extra)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  batch_keys = BATCH_KEYS["detr" if detr else "classification"]
  aux_names = [f"train_{k}" for k in DETR_METRICS] if detr else ["train_accuracy"]

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
        raise ValueError(f"batch {rows.shape[0]} per device is not divisible by "
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
      new_state["ema_params"] = jax.tree_util.tree_map(
          lambda e, p: e + (1.0 - ema_decay) * (p - e), state["ema_params"], new_params)
    metrics = dict(train_loss=loss, **aux, grad_norm=optax.global_norm(grads),
                   lr=schedule(step))
    return new_state, metrics

  return update


# What the update reads of a batch (besides `row`), per config.loss.
BATCH_KEYS = {"classification": ("image", "label"),
              "detr": ("image", "image_mask", "boxes", "labels", "mask")}
DETR_METRICS = ("loss_ce", "loss_bbox", "loss_giou")  # detr_loss's last-layer terms, logged


MODEL_STATE = ("batch_stats",)  # variable collections besides params that training updates


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
    raise ValueError(f"distill.type must be 'hard' or 'soft', not {type!r}")
  return (1.0 - alpha) * base + alpha * kd, logits


def _draws_random(model, params, images) -> bool:
  """Whether the model's training forward takes a 'dropout' rng (dropout or stochastic depth
  with a rate > 0); checked on shapes only, when the update is traced."""
  try:
    jax.eval_shape(lambda p, x: model.apply({"params": p}, x, train=True), params, images[:1])
  except flax.errors.InvalidRngError:
    return True
  return False


def make_eval_fn(model, *, axis_name: Optional[str] = None) -> Callable:
  """(variables, batch) -> sums of correct predictions, loss and real examples (mask)."""
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    correct = (jnp.argmax(logits, -1) == jnp.argmax(batch["label"], -1)) * mask
    loss = optax.softmax_cross_entropy(logits, batch["label"]) * mask
    out = dict(correct=correct.sum(), loss=loss.sum(), count=mask.sum())
    return jax.lax.psum(out, axis_name) if axis_name else out
  return eval_step


def new_state(variables, tx, *, ema: bool = False, teacher=None):
  """The train state the update function takes: step 0, the model's `variables` (params and
  BatchNorm statistics), fresh optimizer state, the EMA of the params (a copy) when `ema`, and
  the frozen teacher's variables when distilling."""
  params = variables["params"]
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  state.update({k: variables[k] for k in MODEL_STATE if k in variables})
  if ema:
    state["ema_params"] = jax.tree_util.tree_map(jnp.copy, params)
  if teacher is not None:
    state["teacher"] = teacher
  return state


def model_variables(state, params=None):
  """The variables `model.apply` takes, from a train state (`params` replaces its params)."""
  return {"params": state["params"] if params is None else params,
          **{k: state[k] for k in MODEL_STATE if k in state}}


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
      raise ValueError(f"Unknown parallel mode {self.mode!r}: use 'jit' or 'pmap'.")
    # `devices` passed only when given, so that a make_mesh with its own default devices (the
    # drills' functools.partial) keeps them.
    self.mesh = (parallel.make_mesh(config.get("mesh")) if devices is None else
                 parallel.make_mesh(config.get("mesh"), devices=devices))
    self.config, self.model = config, model
    self.loss = config.get("loss", "classification")
    self._features = None
    self._predict = None
    if self.mode == "pmap":
      ax = parallel.PMAP_AXIS
      # devices=None: this process's devices (what pmap does by default); the planner passes a
      # TPU topology's devices.
      self.update = jax.pmap(make_update_fn(model, tx, schedule, config, axis_name=ax,
                                            teacher=teacher),
                             axis_name=ax, donate_argnums=(0,), devices=devices)
      self.eval_step = jax.pmap(make_eval_fn(model, axis_name=ax), axis_name=ax,
                                devices=devices)
    else:
      self.update = make_update_fn(model, tx, schedule, config, teacher=teacher, mesh=self.mesh)
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
    """This host's numpy rows -> what the (eval/feature) step takes."""
    if self.mode == "pmap":
      return parallel.pmap_shard(local_batch)
    return parallel.global_batch(local_batch, self.mesh)

  def train_batch(self, local_batch):
    """A training batch from `data.train_iterator` -> what the update takes: what the loss
    reads (BATCH_KEYS: images and labels, or images, image mask and the detection targets) and
    `row`, each example's row in the logical global batch (host p's rows follow host p-1's),
    which keys its dropout and stochastic-depth draws (make_update_fn)."""
    b = len(local_batch["image"])
    rows = jax.process_index() * b + np.arange(b, dtype=np.int32)
    keys = BATCH_KEYS[self.loss]
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
    """The variables evaluators apply the model with (`ema`: the EMA of the params)."""
    return model_variables(state, state["ema_params"] if ema else None)

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


def evaluate(runner: Runner, params, source, config, split: str,
             should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
  """Top-1 accuracy and loss over every example of `split` (the last batch padded and masked);
  with config.loss="detr", COCO-style mAP (`map`, `map50`, `map75`, `num_images`; see
  vit_jax/evaluators/detection.py) instead. With several processes each one's mAP covers its own
  part of the split (the detections are not gathered across processes)."""
  if config.get("loss", "classification") == "detr":
    return detection_eval.DetectionEvaluator(
        runner.predict(), lambda: data_lib.eval_iterator(
            source, split=split, pp=config.pp_eval, batch_size=int(config.eval_batch_size)),
        fetch=runner.gather_features, should_stop=should_stop).run(params)
  ev = classification.ClassificationEvaluator(
      lambda p, b: runner.eval_step(p, runner.to_device_batch(b)), source, split=split,
      pp=config.pp_eval, batch_size=config.eval_batch_size, fetch=runner.fetch,
      should_stop=should_stop)
  return ev.run(params)


TEST_PREFIX = "final_test"  # metrics of config.test_split, evaluated at the end only


def eval_prefix(config) -> str:
  """The metric prefix of config.eval_split: 'val' when it is carved from the training split's
  data ('train[99%:]' next to 'train[:99%]'), else the split's name ('test[:50]' -> 'test')."""
  base = split_name(config.eval_split)
  return "val" if base == split_name(config.train_split) else base


def split_name(split: str) -> str:
  """A metric prefix for a split string: 'test[:50]' -> 'test', 'train@seeded(...)' -> 'train'."""
  return re.split(r"[\[@+]", split, maxsplit=1)[0]


def evaluate_all(runner: Runner, params, source, config,
                 should_stop: Optional[Callable[[], bool]] = None, *,
                 ema=None) -> Dict[str, float]:
  """Every evaluator the config declares: top-1 (loss="detr": mAP) on `eval_split`, few-shot
  when `fewshot.shots`,
  on the model's variables `params`; and the same on `ema` (the EMA weights' variables, metrics
  prefixed `ema_`) when given. Raises evaluators.Stopped when `should_stop()` turns true between
  two batches."""
  out = {}
  for prefix, variables in [("", params)] + ([("ema_", ema)] if ema is not None else []):
    if config.eval_split:
      ev = evaluate(runner, variables, source, config, config.eval_split, should_stop)
      out.update({f"{prefix}{eval_prefix(config)}_{k}": v for k, v in ev.items()})
    if config.fewshot.shots:
      fs = fewshot_evaluator(runner, source, config, should_stop).run(variables)
      out.update({prefix + k: v for k, v in fs.items()})
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
COMPLETE = "complete.json"  # written last: the run trained to its end, evaluated and exported


def _write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  _write_text(path, json.dumps(obj, indent=2, default=str))


def _resolve_durations(config, steps_per_epoch: int):
  """(total, warmup, log_every, eval_every, checkpoint_every) in steps."""
  batch_size = int(config.batch_size)
  every = lambda name, default=0, required=False: optim.durations(
      config, name, steps_per_epoch=steps_per_epoch, batch_size=batch_size, default=default,
      required=required)
  total = every("total", required=True)
  return (total, every("lr.warmup"), every("log_every", max(1, min(100, total // 20))),
          every("eval_every"), every("checkpoint_every"))


def check_resume(workdir: str, config, *, start_step: int, total_steps: int,
                 steps_per_epoch: int, allow_config_change: bool) -> None:
  """A resumed run's config against the workdir's config.json: a change that alters the data
  order, the schedule or the model is an error listing the keys (config_checks.RESUME_FREE lists
  what may change); a longer total duration is allowed. `allow_config_change` turns the error
  into a warning."""
  path = os.path.join(workdir, "config.json")
  if not start_step or not os.path.exists(path):
    return
  with open(path) as f:
    saved = ml_collections.ConfigDict(json.load(f))
  lines = config_checks.resume_changes(saved, config)
  try:
    old_total, old_warmup = _resolve_durations(saved, steps_per_epoch)[:2]
  except (ValueError, KeyError, AttributeError):
    old_total = None
  if old_total is not None and total_steps != old_total:
    # The decay follows the total: another total moves the learning rate at the resume step.
    new_warmup = _resolve_durations(config, steps_per_epoch)[1]
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
    raise config_checks.ConfigError(
        msg + ". Use another --workdir, or pass --allow_config_change to resume anyway.")
  logging.warning("%s. Resuming anyway (--allow_config_change).", msg)


def _check_data_order(workdir: str, source, start_step: int, allow_change: bool) -> None:
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
      raise config_checks.ConfigError(
          f"{workdir} was trained with {before} processes and {source.name} is streamed per "
          f"process, so with {count} the examples of every later step would change. Resume with "
          f"{before} processes, or pass --allow_config_change to accept the new order.")
  if jax.process_index() == 0 and (not start_step or not os.path.exists(path)):
    _write_json(path, {"process_count": count})


def _save_config(workdir: str, config, start_step: int) -> None:
  """config.json: the config the run was started with; a changed config that was allowed to
  resume is written too, and the previous one kept as config.step{N}.json."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    if start_step:
      os.replace(path, os.path.join(workdir, f"config.step{start_step}.json"))
  _write_text(path, text)


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
  complete_path = os.path.join(workdir, COMPLETE)
  ckpt = checkpoint.TrainCheckpointer(workdir, max_to_keep=int(config.keep_checkpoints),
                                      async_save=bool(config.checkpoint_async))
  start_step = ckpt.latest_step() or 0

  # ----- Data.
  source = data_lib.get_source(config.dataset)
  batch_size = int(config.batch_size)
  steps_per_epoch = data_lib.steps_per_epoch(source, config.train_split, batch_size)
  total_steps, warmup, log_every, eval_every, ckpt_every = _resolve_durations(config,
                                                                               steps_per_epoch)
  check_resume(workdir, config, start_step=start_step, total_steps=total_steps,
               steps_per_epoch=steps_per_epoch, allow_config_change=allow_config_change)
  _check_data_order(workdir, source, start_step, allow_config_change)
  if os.path.exists(complete_path) and start_step >= total_steps:
    ckpt.close()
    with open(complete_path) as f:
      done = json.load(f)
    return dict(done, already_complete=True, step=start_step)
  _save_config(workdir, config, start_step)
  writer = metrics_lib.create_writer(workdir)

  train_iter = data_lib.train_iterator(
      source, split=config.train_split, pp=config.pp_train, batch_size=batch_size,
      seed=int(config.seed), start_step=start_step, mixup=float(config.mixup),
      cutmix=float(config.cutmix), repeats=int(config.get("repeated_aug", 1)))
  first_batch = next(train_iter)

  # ----- Model and optimizer.
  image_shape = first_batch["image"].shape[1:]
  teacher = load_teacher(config, source.num_classes, image_shape)
  trainer = build_trainer(config, source.num_classes, image_shape, total_steps=total_steps,
                          warmup_steps=warmup, teacher=teacher)
  tx, runner, shardings = trainer.tx, trainer.runner, trainer.shardings
  if source.detection:
    config_checks.detection_queries(trainer.model, source.max_objects)
  ema = bool(config.get("ema_decay", 0.0))

  # ----- State: resumed, pretrained, or fresh; created directly with its sharding.
  if start_step:
    logging.info("Resuming from the checkpoint of step %d in %s", start_step, workdir)
    state = ckpt.restore(trainer.abstract_state, shardings=shardings)
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
      names = (("map", "map50", "map75", "num_images") if runner.loss == "detr"
               else ("accuracy", "num_examples"))
      result.update({f"test_{k}": final[f"{TEST_PREFIX}_{k}"] for k in names
                     if f"{TEST_PREFIX}_{k}" in final})
    result["metrics"] = final
    result.update(steps=step - start_step, examples=(step - start_step) * batch_size,
                  train_seconds=train_seconds)
    if config.export_npz:
      global_state = runner.to_global_state(run_state, shardings)
      export(global_state["params"], os.path.join(workdir, "params.npz"))
      for key, name in (("ema_params", "params_ema.npz"), ("batch_stats", "batch_stats.npz")):
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


def load_teacher(config, num_classes: int, image_shape):
  """(module, variables) of `config.distill.teacher`, or None when it is empty.

  The teacher is a workdir of ours (its config.json names the model, params.npz and, with
  BatchNorm, batch_stats.npz hold the weights: what a finished run exports) or any source of
  `vit_jax.pretrained.load` (an .npz with `distill.model` naming its model, a Hugging Face
  directory, a zoo name). Its classes must be the data set's."""
  distill = config.get("distill") or {}
  source = distill.get("teacher") or ""
  if not source:
    return None
  cfg_path = os.path.join(source, "config.json")
  if os.path.isdir(source) and os.path.exists(cfg_path):
    npz = os.path.join(source, "params.npz")
    if not os.path.exists(npz):
      raise FileNotFoundError(f"distill.teacher={source!r} is a workdir without params.npz: "
                              "train it to the end (it exports params.npz) first.")
    with open(cfg_path) as f:
      tcfg = ml_collections.ConfigDict(json.load(f))
    exported = checkpoint.load_npz(npz)
    # The teacher's own class count, from its exported head: load_pretrained would re-initialise
    # a head of another count, and distillation would then target class 0 throughout.
    head = exported.get("head", {}).get("kernel")
    if head is None or head.shape[-1] != num_classes:
      raise ValueError(
          f"distill.teacher={source!r} predicts "
          f"{'no classes (no head)' if head is None else f'{head.shape[-1]} classes'}, the data "
          f"set has {num_classes}: the teacher must be trained on the same classes.")
    module = build_model(tcfg, num_classes)
    init = jax.eval_shape(lambda: dict(module.init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_shape)), train=False)))
    variables = {"params": checkpoint.load_pretrained(
        exported, jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), init["params"]))}
    stats = os.path.join(source, "batch_stats.npz")
    if "batch_stats" in init:
      if not os.path.exists(stats):
        raise FileNotFoundError(f"distill.teacher={source!r}: its model has BatchNorm but the "
                                f"workdir has no batch_stats.npz.")
      variables["batch_stats"] = checkpoint.load_npz(stats)
  else:
    from vit_jax import pretrained  # pylint: disable=g-import-not-at-top
    # num_classes None keeps the source's own head (another count would be re-initialised).
    module, params = pretrained.load(source, model=distill.get("model") or None)
    variables = params if "params" in params else {"params": params}
    if module.num_classes != num_classes:
      raise ValueError(f"distill.teacher={source!r} predicts {module.num_classes} classes, the "
                       f"data set has {num_classes}: the teacher must be trained on the same "
                       "classes.")
  return module, jax.tree_util.tree_map(jnp.asarray, variables)


def export(params, path: str):
  """Writes params in the published `.npz` layout (process 0; gathers sharded arrays first)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    checkpoint.save_npz(jax.device_get(params), path)


def for_these_devices(config):
  """A copy of `config` whose mesh fits this process's view of the devices (parallel.
  mesh_for_devices): for evaluating or predicting with a run trained on another mesh."""
  config = ml_collections.ConfigDict(config.to_dict())
  mesh = parallel.mesh_for_devices(config.get("mesh"), jax.device_count())
  if mesh is not config.get("mesh"):
    config.mesh = ml_collections.ConfigDict(mesh)
  return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluation only: the latest checkpoint in `workdir`, or `config.pretrained.path` (.npz), on
  the devices here (a mesh that does not fit them falls back to data parallelism)."""
  config = for_these_devices(config)
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
    params = model_variables(ckpt.restore(trainer.abstract_state, shardings=trainer.shardings))
  elif config.get("pretrained") and config.pretrained.get("path"):
    variables = jax.device_get(trainer.init_variables(jax.random.PRNGKey(0)))
    variables["params"] = pretrained.load_into(
        config.pretrained.path, variables["params"], model=config.model_name,
        strict=bool(config.pretrained.get("strict", True)))
    params = variables
  else:
    raise FileNotFoundError(f"No checkpoint in {workdir} and no config.pretrained.path to "
                            "evaluate; train first or point pretrained.path at an .npz file.")
  ckpt.close()
  if runner.mode == "pmap":
    params = parallel.replicate(params)
  result = evaluate(runner, params, source, config, config.eval_split)
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
