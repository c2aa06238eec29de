"""Trains or evaluates a vision model from a config file.

  python -m vit_jax.main --config=configs/FILE.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]

`--config.KEY=VALUE` overrides any key of configs/common.py (where every key is documented) and any
field of the chosen model (`--config.model.dropout_rate=0.1`); a misspelt key is an error naming
the closest ones. Durations are `*_steps`, `*_epochs` or `*_examples`: giving one on the command
line replaces the config's unit (`--config.total_steps=100` on a config that sets total_epochs).
Rerunning the same command resumes from the workdir's latest checkpoint; a finished run is left as
it is. Modes: `train` (default; ends with a final evaluation and `params.npz` export) and `eval`
(the latest checkpoint in the workdir, or `config.pretrained.path`).
"""
import ast
import glob
import logging as std_logging
import os
import sys
import textwrap
import time
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def define_config_flag(flag_values=flags.FLAGS):
  """--config=FILE[:ARG] and its --config.KEY=VALUE overrides. New keys are accepted by the flag
  parser and checked by `checked_config` instead: that is what lets any field of the chosen
  model be set, and names a misspelt key with the closest ones."""
  return config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/fashion_mnist.py:vit (listed above).",
      flag_values=flag_values, lock_config=False, accept_new_attributes=True)


define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host), from "
    "config.distributed.* or the cluster's environment (SLURM, TPU, ...).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir although keys that alter the data order, "
    "the schedule or the model differ from its config.json (the old one is kept as "
    "config.stepN.json).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Tracebacks for errors, and the INFO logs of every library (orbax, TFDS, "
    "...), which are otherwise hidden. absl's -v / --verbosity=1 shows the INFO logs too.")
_PROGRESS_SECS = flags.DEFINE_float("progress_every_secs", 10.0,
                                    "Seconds between progress lines on the console.")


def describe_configs(root: str = ROOT) -> str:
  """The config files and the lines of their docstrings that say how to run them and their args
  (read with `ast`, without importing them)."""
  lines = ["Config files (--config=FILE[:ARG]):"]
  for path in sorted(glob.glob(os.path.join(root, "configs", "*.py"))):
    name = os.path.basename(path)
    if name in ("__init__.py", "common.py"):
      continue
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraphs = [" ".join(p.split()) for p in doc.split("\n\n")]
    args = [p for p in paragraphs if p.startswith(("Arg:", "Args"))]
    lines.append(f"  configs/{name}: {paragraphs[0] if paragraphs else ''}")
    if args:
      wrapped = textwrap.wrap(args[0], 94)
      lines.extend("      " + l for l in wrapped[:3])
      if len(wrapped) > 3:
        lines.append(f"      ... (the docstring of configs/{name})")
  lines.append("Every key, with its meaning: configs/common.py. Models: README.md, 'Models'.")
  return "\n".join(lines)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO (and lower) records that do not come from this project's code."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(
        (os.path.join(ROOT, "vit_jax"), os.path.join(ROOT, "experiments")))


def checked_config(flag_values=flags.FLAGS):
  """The parsed --config with its command-line overrides checked (config_checks.command_line:
  unknown keys, model fields, duration units)."""
  from vit_jax import config_checks  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  config = flag_values["config"].value
  overrides = config_flags.get_override_values(flag_values["config"])
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
    schema = config_checks.flatten(common.base_config())
  except ImportError:  # run outside the repository: the config's own keys are the schema
    schema = {k: v for k, v in config_checks.flatten(config).items() if k not in overrides}
  config_checks.command_line(config, overrides, schema=schema,
                             model_fields=models.fields(config.model_name))
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t_start = time.monotonic()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if not _VERBOSE.value and flags.FLAGS.verbosity <= 0:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    # Import after flags are parsed: jax reads XLA_FLAGS at import.
    import jax  # pylint: disable=g-import-not-at-top
    from vit_jax import parallel  # pylint: disable=g-import-not-at-top
    from vit_jax import train  # pylint: disable=g-import-not-at-top
    config = checked_config()
    if _DISTRIBUTED.value:
      parallel.initialize_distributed(config.distributed)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    if _MODE.value == "train":
      result = train.train_and_evaluate(config, _WORKDIR.value,
                                        allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                                        progress_every_secs=_PROGRESS_SECS.value)
    else:
      result = train.evaluate_checkpoint(config, _WORKDIR.value)
  except errors.UserError as e:
    # What the user can fix (config, data, files, checkpoints): the message alone.
    if _VERBOSE.value:
      raise
    print(f"error: {e}\n(--verbose shows the traceback)", file=sys.stderr)
    _exit(2, str(e))
  except Exception as e:  # pylint: disable=broad-except
    # A bug of ours (or of a library): its traceback, always.
    traceback.print_exc()
    _exit(1, f"{type(e).__name__}: {e}")
  if jax.process_index() != 0:
    return
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top
  task = tasks.get(config)
  has = lambda prefix: prefix + task.result_names[0] in result
  if result.get("already_complete"):
    headline = f"; {result['split']} {task.headline(result)}" if has("") else ""
    print(f"The run in {_WORKDIR.value} is already complete at step {result['step']}"
          f"{headline}. Nothing was changed; raise total_* to train on, or use another "
          "--workdir.", flush=True)
    return
  if "train_seconds" in result:
    print(f"trained {result['steps']} steps ({result['examples']} images) in "
          f"{result['train_seconds']:.0f} s, not counting evaluation and checkpoint saves "
          f"({result['examples'] / max(result['train_seconds'], 1e-9):.0f} img/s); "
          f"{time.monotonic() - t_start:.0f} s in all", flush=True)
  if has(""):
    print(f"{result['split']} {task.headline(result)}", flush=True)
  if has("test_"):
    print("test " + task.headline(
        result, "test_", f" ({result['test_split']}, evaluated once at the end)"), flush=True)
  elif "stopped_at_step" in result:
    print(f"stopped at step {result['stopped_at_step']}; rerun to resume", flush=True)


def _exit(status: int, message: str) -> None:
  """Exits with `status` after an error (`message`). With several processes: first tells the
  others (parallel.report_failure: they exit at once with an `error:` line naming this process,
  instead of waiting in their next collective for the coordination service's 100-s heartbeat
  timeout), then exits at once (os._exit): a normal exit would run jax.distributed's shutdown, a
  barrier that waits for every process."""
  sys.stdout.flush()
  sys.stderr.flush()
  if "jax" in sys.modules and sys.modules["jax"].process_count() > 1:
    from vit_jax import parallel  # pylint: disable=g-import-not-at-top
    parallel.report_failure(message.splitlines()[0][:500] if message else "an error")
    logging.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parsing, with a bad value (`--config.batch_size=abc`) reported as the other user
  errors are: one `error:` line and exit status 2 (absl's own report exits with 1)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\n(--helpfull lists the flags)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  # Required here, not at import: vit_jax.plan reuses this module's --config flag without them.
  flags.mark_flags_as_required(["config", "workdir"])
  # absl's --help prints the main module's docstring: add the config files to it.
  sys.modules[__name__].__doc__ = __doc__ + "\n" + describe_configs()
  app.run(main, flags_parser=parse_flags)
