r"""What a training checkpoint costs the training loop: a save of a ~1 GiB state with
TrainCheckpointer against plain orbax, in one process.

  python -m benchmarks.checkpoint_save                  # 1024 MiB, 2 rounds
  python -m benchmarks.checkpoint_save --mib=64 --rounds=1

The state is a dict of float32 arrays (64 MiB each, random values, on the default device)
totalling `--mib`. Each round saves it once per contender, in turns, every save into a fresh
directory under a temporary one that is deleted afterwards (at most one saved state is on disk at
a time), after an untimed save of a small state by each:
  orbax        `ocp.CheckpointManager` (the options TrainCheckpointer uses), synchronous
  orbax_async  the same, `enable_async_checkpointing=True`
  ours         `TrainCheckpointer(async_save=False)`: orbax's save, then the manifest
  ours_async   `TrainCheckpointer(async_save=True)`
For each: `save_s` (until `save()` returns: the training loop's stall), `done_s` (until `wait()`
returns: the checkpoint final, and ours with its manifest written) and, for ours, `hash_s` (the
background thread's `write_manifest`: listing, hashing and writing this process's part, which
before issue 34 ran on the training thread at the next save). Prints one JSON line per
contender (medians over the rounds, plus every round's figures), an `environment` line, and a
table with the CPU's model name from /proc/cpuinfo.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import harness
from vit_jax import checkpoint

ARRAY_MIB = 64


def make_state(mib: int) -> dict:
  """float32 arrays of ARRAY_MIB MiB (the last one smaller) totalling `mib` MiB, on the device."""
  rng = np.random.default_rng(0)
  floats, state = mib * (1 << 20) // 4, {}
  for i in range(0, floats, ARRAY_MIB * (1 << 18)):
    n = min(ARRAY_MIB * (1 << 18), floats - i)
    state[f"w{len(state):03d}"] = jax.device_put(rng.standard_normal(n, dtype=np.float32))
  jax.block_until_ready(state)
  return state


def _orbax(directory: str, state: dict, async_save: bool) -> dict:
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_save)
  manager = ocp.CheckpointManager(directory, options=options)
  t = time.perf_counter()
  manager.save(1, args=ocp.args.StandardSave(state))
  save = time.perf_counter() - t
  manager.wait_until_finished()
  done = time.perf_counter() - t
  manager.close()
  return dict(save_s=save, done_s=done)


def _ours(directory: str, state: dict, async_save: bool) -> dict:
  hashing = []
  original = checkpoint.write_manifest

  def timed(*args, **kwargs):  # runs on TrainCheckpointer's background thread
    t = time.perf_counter()
    original(*args, **kwargs)
    hashing.append(time.perf_counter() - t)
  checkpoint.write_manifest = timed
  try:
    ckpt = checkpoint.TrainCheckpointer(directory, async_save=async_save)
    t = time.perf_counter()
    ckpt.save(1, state)
    save = time.perf_counter() - t
    ckpt.wait()
    done = time.perf_counter() - t
    ckpt.close()
  finally:
    checkpoint.write_manifest = original
  step_dir = os.path.join(directory, "checkpoints", "1")
  assert checkpoint.verify_step(step_dir) is None, "the manifest does not match the files"
  return dict(save_s=save, done_s=done, hash_s=hashing[0])


CONTENDERS = {
    "orbax": lambda d, s: _orbax(d, s, False),
    "orbax_async": lambda d, s: _orbax(d, s, True),
    "ours": lambda d, s: _ours(d, s, False),
    "ours_async": lambda d, s: _ours(d, s, True),
}


def _bytes_on_disk(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)


def run(mib: int, rounds: int, root: str = None) -> dict:
  """{contender: {"save_s", "done_s"[, "hash_s"]: median, "rounds": [...], "bytes"}}."""
  state = make_state(mib)
  out = {k: {"rounds": []} for k in CONTENDERS}
  root = tempfile.mkdtemp(prefix="checkpoint_save_", dir=root)
  try:
    small = {"w": state[next(iter(state))][:1024]}
    for name, fn in CONTENDERS.items():  # untimed: the first save of each pays for set-up
      fn(os.path.join(root, f"{name}.warmup"), small)
      shutil.rmtree(os.path.join(root, f"{name}.warmup"))
    for r in range(rounds):
      for name, fn in CONTENDERS.items():
        directory = os.path.join(root, f"{name}.{r}")
        out[name]["rounds"].append(fn(directory, state))
        out[name]["bytes"] = _bytes_on_disk(directory)
        shutil.rmtree(directory)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  for rec in out.values():
    for key in rec["rounds"][0]:
      rec[key] = harness.median([x[key] for x in rec["rounds"]])
  return out


def table(results: dict, cpu: str, mib: int) -> str:
  lines = [f"CPU: {cpu}; state {mib} MiB of float32",
           "| save | bytes on disk | save() returns (s) | wait() done (s) | "
           "hashing, background (s) |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    hash_s = f"{r['hash_s']:.2f}" if "hash_s" in r else "-"
    lines.append(f"| {name} | {r['bytes'] / 2**20:.0f} MiB | {r['save_s']:.2f} | "
                 f"{r['done_s']:.2f} | {hash_s} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mib", type=int, default=1024, help="state size in MiB")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--dir", default=None,
                 help="where the temporary directory goes (default: $TMPDIR)")
  args = p.parse_args(argv)
  if args.mib < 1 or args.rounds < 1:
    raise ValueError("--mib and --rounds must be >= 1.")
  cpu = harness.cpu_model()
  load_start = harness.load_average()
  results = run(args.mib, args.rounds, args.dir)
  env = dict(harness.environment(), cpu_model=cpu, load_average_start=load_start)
  print(json.dumps({"environment": env}))
  for name, r in results.items():
    rounds = [{k: round(v, 4) for k, v in x.items()} for x in r["rounds"]]
    print(json.dumps({"contender": name, "mib": args.mib,
                      **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                      "rounds": rounds}))
  print(table(results, cpu, args.mib))
  sys.stdout.flush()
  return results


if __name__ == "__main__":
  main()
