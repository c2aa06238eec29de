"""What an experiment is: a `Sweep` of `Point`s, each a config file plus overrides, and how a point
becomes the exact `python -m vit_jax.main` command (or, in-process, the exact same config).

An experiment file (`experiments/*.py`) defines `get_sweep(arg: Optional[str]) -> Sweep`; `arg` is
what follows the colon in `experiments/FILE.py:ARG`, usually `key=value,key=value` read with
`parse_arg`. Config paths are relative to the repository root, where commands run.

Overrides are dotted config keys. Each becomes `--config.KEY=VALUE` when KEY is a field of the
config; a key the config lacks under an existing ConfigDict (e.g. `model.hidden_size`, since
`config.model` only lists what the config changed), or a value of None, is folded with its
siblings into one `--config.PARENT={...}` dict literal, because ml_collections' flags can neither
add a field nor set a typed field to None. A top-level None is an error: set the duration or value
in the base config's own unit instead (`examples_budget` does that for durations).
"""
import ast
import dataclasses
import importlib.util
import math
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import flags
import ml_collections
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run. `name` is its workdir's name; `tags` become columns of the results table
  (the aggregation reads `family`, `model`, `train_size` and `seed`)."""
  name: str
  config: str  # "configs/fashion_mnist.py:vit", relative to the repository root
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tags: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not _NAME_RE.match(self.name):
      raise ValueError(f"Point name {self.name!r} must start with a letter or digit and contain "
                       "only letters, digits and _ . + = - (it names a directory).")


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  points: Tuple[Point, ...]
  description: str = ""

  def __post_init__(self):
    object.__setattr__(self, "points", tuple(self.points))
    seen = set()
    for p in self.points:
      if p.name in seen:
        raise ValueError(f"Sweep {self.name!r} has two points named {p.name!r}; names must be "
                         "unique (each is a workdir).")
      seen.add(p.name)

  def to_json(self) -> Dict[str, Any]:
    return {"name": self.name, "description": self.description,
            "points": [dataclasses.asdict(p) for p in self.points]}


# ---------------------------------------------------------------------------- experiment files.
def load_experiment(spec: str) -> Sweep:
  """`experiments/FILE.py[:ARG]` -> the Sweep its `get_sweep(ARG)` returns (ARG None if absent)."""
  path, _, arg = spec.partition(":")
  full = path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)
  if not os.path.isfile(full) and os.path.isfile(path):
    full = os.path.abspath(path)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"No experiment file {path!r} (looked in {REPO_ROOT} and the current "
                            "directory); give e.g. experiments/fmnist_data_scaling.py.")
  name = "_experiment_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
  module_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(arg) -> experiments.sweep.Sweep.")
  sweep = module.get_sweep(arg or None)
  if not isinstance(sweep, Sweep):
    raise TypeError(f"{path}:get_sweep returned {type(sweep).__name__}, not a Sweep.")
  return sweep


def parse_arg(arg: Optional[str], defaults: Mapping[str, Any]) -> Dict[str, Any]:
  """`"examples=40960,sizes=1000/3000"` -> defaults updated; each value takes its default's type
  (int, float, str; tuples split on "/"). Unknown keys are an error listing the known ones."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or key not in defaults:
      raise ValueError(f"Bad experiment arg {item!r}: expected key=value with key one of "
                       f"{', '.join(defaults)}.")
    default = defaults[key]
    if isinstance(default, tuple):
      kind = type(default[0]) if default else str
      out[key] = tuple(kind(v) for v in value.split("/") if v)
    else:
      out[key] = type(default)(value)
  return out


# ------------------------------------------------------------------------------------ configs.
def load_config(config: str) -> ml_collections.ConfigDict:
  """The config `FILE.py[:ARG]` gives before any override, as `vit_jax.main` loads it."""
  return _parse_flags([f"--config={_config_path(config)}"])


def build_config(point: Point) -> ml_collections.ConfigDict:
  """The config `vit_jax.main` builds from the point's command (same flags, same parser)."""
  return _parse_flags([f"--config={_config_path(point.config)}"] + override_flags(point))


def _config_path(config: str) -> str:
  path, colon, arg = config.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(REPO_ROOT, path)
  return path + colon + arg


def _parse_flags(argv: List[str]) -> ml_collections.ConfigDict:
  if REPO_ROOT not in sys.path:  # config files import `configs.common`
    sys.path.insert(0, REPO_ROOT)
  fv = flags.FlagValues()
  argv = ["vit_jax.main"] + argv
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  fv(argv)
  return holder.value


def override_flags(point: Point) -> List[str]:
  """The point's overrides as `--config.KEY=VALUE` flags (see the module docstring)."""
  if not point.overrides:
    return []
  base = load_config(point.config)
  leaves: Dict[str, Any] = {}
  folded: Dict[str, Dict[str, Any]] = {}  # parent key -> {path below it: value}
  for key, value in _flatten(point.overrides).items():
    parts = key.split(".")
    exists, node = _lookup(base, parts)
    if exists and isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"Override {key}={value!r} of point {point.name!r}: {key} is a ConfigDict; "
                       "give a dict or dotted keys below it.")
    if exists and value is not None:
      leaves[key] = value
      continue
    for i in range(len(parts) - 1, 0, -1):  # The closest existing ConfigDict below the root.
      ok, parent = _lookup(base, parts[:i])
      if ok and isinstance(parent, ml_collections.ConfigDict):
        folded.setdefault(".".join(parts[:i]), {})[".".join(parts[i:])] = value
        break
    else:
      why = "cannot be set to None from the command line in" if exists else "is not a key of"
      raise ValueError(f"Override {key!r} {why} {point.config} (point {point.name!r}); use an "
                       "existing key, or a duration in the config's own unit (examples_budget).")
  for parent in sorted(folded, key=len):  # Outer parents absorb inner ones and leaves below.
    if parent not in folded:
      continue
    for other in [k for k in folded if k.startswith(parent + ".")]:
      rel = other[len(parent) + 1:]
      folded[parent].update({f"{rel}.{k}": v for k, v in folded.pop(other).items()})
    for leaf in [k for k in leaves if k.startswith(parent + ".")]:
      folded[parent][leaf[len(parent) + 1:]] = leaves.pop(leaf)
  out = [f"--config.{k}={format_value(v)}" for k, v in leaves.items()]
  for parent, children in folded.items():
    merged = _lookup(base, parent.split("."))[1].to_dict()
    for path, value in children.items():
      node = merged
      *head, leaf = path.split(".")
      for h in head:
        node = node.setdefault(h, {})
      node[leaf] = value
    out.append(f"--config.{parent}={format_value(merged)}")
  return out


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"model": {"hidden_size": 16}} -> {"model.hidden_size": 16}."""
  out = {}
  for k, v in overrides.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _lookup(cfg, parts: Sequence[str]) -> Tuple[bool, Any]:
  node = cfg
  for p in parts:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      return False, None
    node = node[p]
  return True, node


def format_value(value: Any) -> str:
  """A Python value as ml_collections' flag parsers read it back."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    value = tuple(value)
  text = repr(value)
  try:
    ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"Override value {value!r} is not a Python literal; use str, int, float, "
                     "bool, None, tuples and dicts of those.") from None
  return text


def command(point: Point, workdir: str, *, python: str = sys.executable,
            main: Sequence[str] = ("-m", "vit_jax.main")) -> List[str]:
  """argv of the point's run, to be started in the repository root."""
  return [python, *main, f"--config={point.config}", f"--workdir={workdir}"] + \
      override_flags(point)


# ---------------------------------------------------------------------------------- durations.
def examples_budget(base: ml_collections.ConfigDict, prefix: str, examples: int,
                    train_size: int, batch_size: Optional[int] = None) -> Dict[str, Any]:
  """Override for `{prefix}_*` that makes the duration `examples` training examples (rounded to
  whole steps: round(examples / batch)), in whichever unit the base config uses, so no key has
  to be unset. Epochs are of the point's training set of `train_size` examples."""
  batch = int(batch_size or base.batch_size)
  node, leaf = base, prefix
  if "." in prefix:
    parent, leaf = prefix.rsplit(".", 1)
    node = _lookup(base, parent.split("."))[1]
  units = [u for u in ("steps", "epochs", "examples") if node.get(f"{leaf}_{u}") is not None]
  unit = units[0] if units else "examples"
  if unit == "steps":
    value = int(round(examples / batch))
  elif unit == "epochs":  # The trainer rounds epochs * ceil(train_size / batch) to steps.
    value = examples / (batch * math.ceil(train_size / batch))
  else:
    value = int(examples)
  return {f"{prefix}_{unit}": value}
