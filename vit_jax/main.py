"""Command line: `python -m vit_jax.main --config=configs/FILE.py[:ARG] --workdir=DIR`.

`--config.key=value` overrides any config key; a key the config does not have is an error.
Rerunning the same command resumes from the workdir's latest checkpoint.
Modes: `train` (default; ends with a final evaluation and `params.npz` export) and `eval`
(the latest checkpoint in the workdir, or `config.pretrained.path`).
"""
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fashion_mnist.py:vit", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host), from "
    "config.distributed.* or the cluster's environment (SLURM, TPU, ...).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  t_start = time.monotonic()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # Import after flags are parsed: jax reads XLA_FLAGS at import.
  import jax
  from vit_jax import parallel
  from vit_jax import train

  config = _CONFIG.value
  if _DISTRIBUTED.value:
    parallel.initialize_distributed(config.get("distributed"))
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    if _MODE.value == "train":
      result = train.train_and_evaluate(config, _WORKDIR.value)
    else:
      result = train.evaluate_checkpoint(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteLossError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    if "train_seconds" in result:
      print(f"trained {result['steps']} steps ({result['examples']} images) in "
            f"{result['train_seconds']:.0f} s, not counting evaluation and checkpoint saves "
            f"({result['examples'] / max(result['train_seconds'], 1e-9):.0f} img/s); "
            f"{time.monotonic() - t_start:.0f} s in all", flush=True)
    if "accuracy" in result:
      print(f"{result['split']} accuracy: {result['accuracy']:.4f} "
            f"on {result['num_examples']} images", flush=True)
    elif "stopped_at_step" in result:
      print(f"stopped at step {result['stopped_at_step']}; rerun to resume", flush=True)


if __name__ == "__main__":
  app.run(main)
