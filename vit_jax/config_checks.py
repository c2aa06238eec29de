"""What can be checked about a config before any data is read or anything compiles.

  `command_line`  applies the rules for `--config.KEY=VALUE` overrides: a duration given in one
                  unit replaces the config's unit, an unknown key is named with the closest ones.
  `validate`      values that cannot work (batch sizes the devices do not divide, negative
                  durations, unknown model fields and model fields of the wrong type, pp strings,
                  splits, ...), each naming its key.
  `model_shapes`  what needs the image size too: a patch size that does not divide the images,
                  heads that do not divide the width, a Swin window larger than its feature map.
  `resume_changes` the keys of a resumed run whose change would alter its data order, schedule or
                  model (compared with the config.json its workdir was started with).

Every error is a `errors.ConfigError` (a ValueError) whose message names the key and says what to do.
"""
import difflib
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional

import ml_collections

from vit_jax import errors

DURATIONS = ("total", "lr.warmup", "log_every", "eval_every", "checkpoint_every")
UNITS = ("steps", "epochs", "examples")

# Keys that may change when a run resumes: where and how often it logs, evaluates and saves, how
# it is laid out on the devices. Any other key alters the data order, the schedule or the model.
# `total_*` may grow (checked separately) and `pretrained.*` is only read by a fresh start.
RESUME_FREE = ("log_every_", "eval_every_", "checkpoint_every_", "keep_checkpoints",
               "checkpoint_async", "eval_split", "test_split", "eval_batch_size", "pp_eval",
               "fewshot.", "evals", "parallel", "mesh.", "sharding.", "distributed.", "export_npz",
               "pretrained.", "total_", "dataset.prepare")


# Values that mean "off": a key missing from an older run's config.json with one of them is no
# change (keys are added with such defaults).
NEUTRAL = (None, 0, 0.0, "", False, [], {})
# Groups of keys that do nothing while their switch key is neutral (or has one of the values
# listed with it).
SWITCHES = {"distill.": ("distill.teacher", ()), "detr.": ("loss", ("classification", "generation"))}
# Keys added to the code with a default that is not in NEUTRAL but changes nothing.
ADDED_DEFAULTS = {"repeated_aug": 1, "loss": "classification"}


def flatten(cfg, prefix: str = "") -> Dict[str, Any]:
  """{'lr.base': 0.001, 'model.resnet': {...}, ...}: dotted keys of every leaf; the fields under
  `model` are leaves whatever their type (a dict-valued field is one value, as the model takes
  it)."""
  out = {}
  for k, v in cfg.items():
    key = prefix + k
    if key == "model":
      out.update({f"model.{mk}": _plain(mv) for mk, mv in v.items()})
    elif isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flatten(v, key + "."))
    else:
      out[key] = _plain(v)
  return out


def _plain(v):
  if isinstance(v, ml_collections.ConfigDict):
    v = v.to_dict()
  return json.loads(json.dumps(v, default=str))  # tuples -> lists, dtypes -> str


def _did_you_mean(key: str, known: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  return f" Did you mean {', '.join(close)}?" if close else ""


# ------------------------------------------------------------------------- command-line overrides.
def command_line(config: ml_collections.ConfigDict, overrides: Iterable[str], *,
                 schema: Mapping[str, Any], model_fields: Optional[Iterable[str]] = None) -> None:
  """Checks and completes the `--config.KEY=VALUE` overrides (dotted KEYs) applied to `config`.

  `schema` holds every key a config may have (the flattened base config). An override of a key
  outside it is an error naming the closest known keys; under `model.` any field of the model
  (`model_fields`) is allowed. A duration given in one unit on the command line
  (`--config.total_steps=3`) sets the config's other units of it to None; two units of the same
  duration on the command line are an error.
  """
  overrides = list(overrides)
  fields = set(model_fields or ())
  for key in overrides:
    if key == "model" or key.startswith("model."):
      names = list(config.model.keys()) if key == "model" else [key.split(".")[1]]
      for name in names:
        if model_fields is not None and name not in fields:
          raise errors.ConfigError(
              f"--config.{key}: {config.model_name} has no field {name!r}."
              f"{_did_you_mean(name, fields)} Its fields: {', '.join(sorted(fields))}.")
      continue
    if key not in schema and not any(k.startswith(key + ".") for k in schema):
      raise errors.ConfigError(f"--config.{key}: unknown config key.{_did_you_mean(key, schema)} "
                        "The keys are listed in configs/common.py.")
  for group in DURATIONS:
    given = [u for u in UNITS if f"{group}_{u}" in overrides]
    if len(given) > 1:
      raise errors.ConfigError(f"--config.{group}_{given[0]} and --config.{group}_{given[1]} both set "
                        f"one duration: give only one of them.")
    if given:
      node, leaf = _node(config, f"{group}_{given[0]}")
      for u in UNITS:
        if u != given[0]:
          node[leaf.rsplit("_", 1)[0] + "_" + u] = None


def _node(config, key: str):
  *path, leaf = key.split(".")
  node = config
  for p in path:
    node = node[p]
  return node, leaf


# ------------------------------------------------------------------------------------ validate.
def validate(config, *, device_count: int, process_count: int, model_fields=None) -> None:
  """Everything about `config` that can be wrong before data, models or compilation: raises a
  errors.ConfigError naming the key. `model_fields` (names the chosen model takes) checks `model.*`."""
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top  (jax only when validating)

  def need(ok: bool, msg: str):
    if not ok:
      raise errors.ConfigError(msg)

  for group in DURATIONS:
    set_units = []
    for u in UNITS:
      try:
        node, leaf = _node(config, f"{group}_{u}")
        v = node.get(leaf)
      except (KeyError, AttributeError):
        v = None
      if v is not None:
        set_units.append(u)
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
             f"{group}_{u}={v!r}: a duration must be a number >= 0.")
    need(len(set_units) <= 1, f"Set only one of {', '.join(f'{group}_{u}' for u in set_units)} "
         f"(on the command line, giving one replaces the config's).")
  need(any(_node(config, f"total_{u}")[0].get(f"total_{u}") is not None for u in UNITS),
       "Set one of total_steps, total_epochs or total_examples.")

  need(config.parallel in ("jit", "pmap"), f"parallel={config.parallel!r}: use 'jit' or 'pmap'.")
  try:
    data, fsdp, _ = parallel.mesh_shape(config.mesh, device_count)
  except ValueError as e:
    raise errors.ConfigError(f"mesh: {e}") from None
  shards = data * fsdp if config.parallel == "jit" else device_count
  what = "mesh.data x mesh.fsdp" if config.parallel == "jit" else "the device count"
  for key in ("batch_size", "eval_batch_size"):
    b = config[key]
    need(isinstance(b, int) and b > 0, f"{key}={b!r}: must be a positive integer.")
    need(b % process_count == 0, f"{key}={b} is not divisible by the {process_count} processes.")
    need(b % shards == 0, f"{key}={b} is not divisible by {what} = {shards}: make it a multiple "
         f"of {shards}.")
  accum = config.grad_accum_steps
  need(isinstance(accum, int) and accum >= 1, f"grad_accum_steps={accum!r}: must be an int >= 1.")
  need((config.batch_size // shards) % accum == 0,
       f"grad_accum_steps={accum}: the batch per device ({config.batch_size} / {shards} = "
       f"{config.batch_size // shards}) must be a multiple of it, so that every micro-batch is "
       "spread over all devices.")
  keep = config.keep_checkpoints
  need(isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1,
       f"keep_checkpoints={keep!r}: must be an int >= 1 (the newest checkpoints kept).")
  need(config.seed >= 0, f"seed={config.seed}: must be >= 0.")
  need(0 <= config.mixup, f"mixup={config.mixup}: must be >= 0 (0 disables it).")
  need(0 <= config.cutmix, f"cutmix={config.cutmix}: must be >= 0 (0 disables it).")
  need(0 <= config.label_smoothing < 1,
       f"label_smoothing={config.label_smoothing}: must be in [0, 1).")
  ema = config.get("ema_decay", 0.0)
  need(0 <= ema < 1, f"ema_decay={ema}: must be in [0, 1) (0 disables the EMA; 0.9999 is "
       "DeiT's, for short runs use 1 - 1/(a tenth of the steps)).")
  distill = config.get("distill")
  if distill is not None and distill.get("teacher"):
    need(distill.type in ("hard", "soft"),
         f"distill.type={distill.type!r}: use hard or soft.")
    need(0 <= distill.alpha <= 1, f"distill.alpha={distill.alpha}: must be in [0, 1].")
    need(distill.tau > 0, f"distill.tau={distill.tau}: must be > 0.")
  need(config.optax.name in ("sgd", "momentum", "adam", "adamw"),
       f"optax.name={config.optax.name!r}: use sgd, momentum, adam or adamw.")
  need(config.optax.name != "adam" or not config.get("wd"),
       f"optax.name='adam' has no weight decay (as optax.adam), but wd={config.get('wd')}: use "
       "optax.name='adamw' for Adam with decoupled weight decay, or wd=0.")
  need(config.lr.decay in ("cosine", "linear", "constant"),
       f"lr.decay={config.lr.decay!r}: use cosine, linear or constant.")

  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  from vit_jax.data import splits  # pylint: disable=g-import-not-at-top
  for key in ("pp_train", "pp_eval"):
    try:
      preprocess.parse(config[key])
    except ValueError as e:
      raise errors.ConfigError(f"{key}: {e}") from None
  split_keys = ["train_split", "eval_split", "test_split"]
  if config.fewshot.shots:
    split_keys += ["fewshot.train_split", "fewshot.test_split"]
  for key in split_keys:
    node, leaf = _node(config, key)
    if node[leaf]:
      try:
        splits.parse(node[leaf])
      except ValueError as e:
        raise errors.ConfigError(f"{key}: {e}") from None

  _check_loss(config, need)
  evals = list(config.get("evals", ()))
  known = ("task", "fewshot")  # vit_jax/train.py's EVALUATORS
  bad = [e for e in evals if e not in known]
  need(not bad, f"evals: unknown evaluator {bad[0] if bad else ''!r}; use some of "
       f"{', '.join(known)}.{_did_you_mean(bad[0], known) if bad else ''}")

  if model_fields is not None:
    unknown = sorted(set(config.model.keys()) - set(model_fields))
    need(not unknown, f"model.{unknown[0] if unknown else ''}: {config.model_name} has no such "
         f"field.{_did_you_mean(unknown[0], model_fields) if unknown else ''} Its fields: "
         f"{', '.join(sorted(model_fields))}.")
    _check_model_types(config)
  need(not (config.dataset.name == "image_folder" and not config.dataset.data_dir),
       "dataset.data_dir: an image folder data set needs it (DIR/<split>/<class>/*.jpg). "
       + config.dataset.prepare)
  need(not (config.pretrained.required and not config.pretrained.path),
       "This config fine-tunes pretrained weights and none were given: pass "
       "--config.pretrained.path=/path/to/weights.npz (e.g. ViT-B_16.npz of the ViT release).")


def _check_loss(config, need) -> None:
  """config.loss names a task (vit_jax/tasks), which says what else it refuses."""
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top
  loss = config.get("loss", "classification")
  need(loss in tasks.NAMES, f"loss={loss!r}: use {' or '.join(tasks.NAMES)}.")
  tasks.task_class(loss).check(config, need)


def _kind(value) -> Optional[str]:
  """The type a model field's default asks of an override, or None for any."""
  if isinstance(value, bool):
    return "a bool (True/False)"
  if isinstance(value, int):
    return "an int"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, (tuple, list)):
    return "a tuple, e.g. (16, 16)" if value and all(isinstance(v, int) for v in value) else \
        "a tuple"
  return None


def _fits(value, kind: str) -> bool:
  if kind.startswith("a bool"):
    return isinstance(value, bool)
  if kind == "an int":
    return isinstance(value, int) and not isinstance(value, bool)
  if kind == "a number":
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind == "a string":
    return isinstance(value, str)
  return isinstance(value, (tuple, list))


def _check_model_types(config) -> None:
  """Each `model.*` override has the type of the field's value for `config.model_name` (an int
  field given a tuple or a string, a tuple field given an int, ...): otherwise the mistake
  surfaces inside Flax or XLA. Fields whose default is None or a structure accept anything."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top  (jax only when validating)
  import dataclasses  # pylint: disable=g-import-not-at-top
  model = models.get_model(config.model_name, num_classes=1)
  # Fields annotated with a union (Swin's img_size: int or (H, W)) take more than one type.
  unions = {f.name for f in dataclasses.fields(model)
            if any(u in str(f.type) for u in ("Union", "|", "Optional", "Any"))}
  for key in sorted(config.model.keys()):
    value = config.model[key]
    if isinstance(value, ml_collections.ConfigDict) or value is None or key in unions:
      continue
    kind = _kind(getattr(model, key, None))
    if key in ("dtype", "param_dtype") or kind is None:
      continue
    if not _fits(value, kind):
      raise errors.ConfigError(f"model.{key}={value!r}: {config.model_name}'s {key} is {kind} "
                        f"(its value is {getattr(model, key)!r}).")


def model_shapes(model, image_shape) -> None:
  """What the model's fields and the images' (H, W, C) must agree on, checked on the module's
  fields before anything is traced: ViT's patch size divides the image (the patch convolution
  would silently drop the remainder), heads divide the width (ViT's hidden_size, each Swin stage's
  embed_dim * 2**stage), and a Swin window is no larger than the first stage's feature map (the
  published clamp to the map size is meant for the last stages; a window larger than the first map
  makes every stage one global window). Raises errors.ConfigError naming `model.KEY`."""
  h, w = int(image_shape[0]), int(image_shape[1])
  patch = getattr(model, "patch_size", None)
  if isinstance(patch, int):
    patch = (patch, patch)
  resnet = getattr(model, "resnet", None)
  if patch is not None and not resnet and (h % patch[0] or w % patch[1]):
    raise errors.ConfigError(
        f"model.patch_size={tuple(patch)} does not divide the {h}x{w} images: the last "
        f"{h % patch[0]} rows / {w % patch[1]} columns would be dropped. Use a patch size that "
        "divides the image size, or resize / crop to a multiple of it in pp_train and pp_eval.")
  heads = getattr(model, "num_heads", None)
  width = getattr(model, "hidden_size", None)
  if isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads:
    raise errors.ConfigError(f"model.num_heads={heads} does not divide model.hidden_size={width}: each "
                      "head takes hidden_size / num_heads features.")
  embed = getattr(model, "embed_dim", None)
  if isinstance(embed, int) and isinstance(heads, (tuple, list)):
    for i, n in enumerate(heads):
      if n <= 0 or (embed * 2 ** i) % n:
        raise errors.ConfigError(f"model.num_heads={tuple(heads)}: stage {i} has {n} heads for "
                          f"{embed * 2 ** i} features (embed_dim * 2**{i}); it must divide them.")
  window = getattr(model, "window_size", None)
  if isinstance(window, int) and patch is not None:
    grid = (h // patch[0], w // patch[1])
    if window > min(grid):
      raise errors.ConfigError(
          f"model.window_size={window} is larger than the first stage's {grid[0]}x{grid[1]} "
          f"feature map ({h}x{w} images, patch {patch[0]}): use a window of at most "
          f"{min(grid)}, or larger images.")


def detection_queries(model, max_objects: int) -> None:
  """A DETR model's `num_queries` against the most objects an image of the data set holds: the
  matching gives every object its own prediction, so fewer queries cannot work (and the error
  would come from inside the compiled step, where it aborts the process)."""
  queries = getattr(model, "num_queries", None)
  if isinstance(queries, int) and queries < max_objects:
    raise errors.ConfigError(f"model.num_queries={queries}: the data set has images with up to "
                      f"{max_objects} objects and each needs its own query; use at least "
                      f"{max_objects}.")


# ------------------------------------------------------------------------------------- resume.
def resume_changes(saved: Mapping[str, Any], config) -> List[str]:
  """`saved` (the workdir's config.json, as loaded) vs `config`: lines 'key: old -> new' for each
  key that a resumed run may not change (RESUME_FREE lists the ones it may)."""
  old, new = flatten(saved), flatten(config)
  lines = []
  for key in sorted(set(old) | set(new)):
    if key.startswith(RESUME_FREE):
      continue
    a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
    if a == "<unset>" and (b in NEUTRAL or (key in ADDED_DEFAULTS and b == ADDED_DEFAULTS[key])):
      continue  # a key added to the code since the run started, at its neutral default
    switch, off = next((v for g, v in SWITCHES.items() if key.startswith(g)), (None, ()))
    off = NEUTRAL + off
    if a == "<unset>" and switch and new.get(switch) in off and old.get(switch) in (
        "<unset>",) + off:
      continue  # ... or in a group that is switched off (distill.* without a teacher)
    if a != b:
      lines.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
  return lines
