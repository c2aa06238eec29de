r"""Saving a small replicated state on 8 CPU devices: orbax's replica-parallel slicing of every
array against writing arrays under `checkpoint.MIN_REPLICA_SLICE_BYTES` per replica whole, in one
process.

  python -m benchmarks.replicated_save --rounds=5

The state is a dict of `--arrays` float32 arrays of `--floats` values each (default 100 arrays of
4,096: about the parameters and Adam moments of the tests' tiny ViT), replicated over 8 devices
(`--xla_force_host_platform_device_count=8`, set here before jax is imported). Each round saves
it with `TrainCheckpointer(async_save=False)` once per contender, in turns, each into a fresh
temporary workdir: `sliced` (orbax's default: every replicated array cut into 8 slices, one
dispatched device operation each) and `whole` (this repository's setting). Prints one JSON line
per contender (median save() seconds and every round's) and a table with the CPU's model name.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

CONTENDERS = {"sliced": 0, "whole": checkpoint.MIN_REPLICA_SLICE_BYTES}


def make_state(arrays: int, floats: int) -> dict:
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
  rng = np.random.default_rng(0)
  return {f"w{i:03d}": jax.device_put(rng.standard_normal(floats, dtype=np.float32), sharding)
          for i in range(arrays)}


def save_once(state: dict, min_bytes: int, step: int) -> float:
  workdir = tempfile.mkdtemp(prefix="replicated_save_")
  original = checkpoint.MIN_REPLICA_SLICE_BYTES
  checkpoint.MIN_REPLICA_SLICE_BYTES = min_bytes
  try:
    with checkpoint.TrainCheckpointer(workdir) as ckpt:
      start = time.perf_counter()
      ckpt.save(step, state)
      seconds = time.perf_counter() - start
  finally:
    checkpoint.MIN_REPLICA_SLICE_BYTES = original
    shutil.rmtree(workdir, ignore_errors=True)
  return seconds


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--arrays", type=int, default=100)
  parser.add_argument("--floats", type=int, default=4096)
  args = parser.parse_args(argv)
  state = make_state(args.arrays, args.floats)
  for name, min_bytes in CONTENDERS.items():  # untimed: compiles the slices once
    save_once(state, min_bytes, 1)
  times = {name: [] for name in CONTENDERS}
  for r in range(args.rounds):
    for name, min_bytes in CONTENDERS.items():
      times[name].append(save_once(state, min_bytes, r + 2))
  rows = []
  for name, ts in times.items():
    row = {"contender": name, "min_slice_bytes": CONTENDERS[name],
           "save_s": statistics.median(ts), "rounds_s": ts, "devices": jax.device_count()}
    print(json.dumps(row))
    rows.append(row)
  print(json.dumps({"environment": True, "cpu": harness.cpu_model(),
                    "cores": os.cpu_count(), "load_average": os.getloadavg(),
                    "jax": jax.__version__}))
  ref = rows[0]["save_s"]
  print(f"\nCPU {harness.cpu_model()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}\n\n| save | save() median (s) | ratio to sliced |\n|---|---|---|")
  for row in rows:
    print(f"| {row['contender']} | {row['save_s']:.3f} | {row['save_s'] / ref:.2f} |")


if __name__ == "__main__":
  main()
