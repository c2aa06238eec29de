"""Runs every drill and prints what was tried and what survived (the README's "Reliability").

  python -m tests.drills.report [--kills=N] [--skip_processes]

Kill loops (SIGKILL and SIGTERM, N kills each), damaged checkpoints, bad config overrides (in
process, and the first few through `python -m vit_jax.main`), bad image-folder data, a full disk,
and a killed process of a two-process run.
"""
import argparse
import logging as std_logging
import os
import signal
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax: bad_configs

from tests.drills import bad_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import corrupt  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import disk_full  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import kill_loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import processes  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.drills import runs  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=8)
  parser.add_argument("--subprocess_configs", type=int, default=3,
                      help="bad configs also run through python -m vit_jax.main (0: none)")
  parser.add_argument("--skip_processes", action="store_true")
  args = parser.parse_args()
  std_logging.getLogger("absl").setLevel(std_logging.CRITICAL)  # orbax's own error logs
  root = tempfile.mkdtemp(prefix="drills_")
  lines, t0 = [], time.monotonic()

  def say(line):
    lines.append(line)
    print(line, flush=True)

  reference = os.path.join(root, "reference")
  rc, out = runs.run(reference, "", f"--config.total_steps={kill_loop.total_steps_for(args.kills)}")
  if rc != 0:
    raise SystemExit(f"the uninterrupted run failed:\n{out[-3000:]}")
  for sig in (signal.SIGKILL, signal.SIGTERM):
    r = kill_loop.kill_loop(os.path.join(root, signal.Signals(sig).name), args.kills, sig=sig,
                            reference=reference, log=lambda s: None)
    extra = (f" ({r['inside_save']} of the random ones landed inside a save)"
             if sig == signal.SIGKILL else "")
    say(f"{signal.Signals(sig).name}: {kill_loop.summary(r)}{extra}")
    for f in r["failures"]:
      print(f)

  c = corrupt.run_all(os.path.join(root, "corrupt"))
  cost = corrupt.manifest_cost()
  say(f"damaged checkpoints detected: {sum(not v for v in c.values())}/{len(c)} "
      f"({', '.join(c)}); manifest of a {cost['bytes'] / 1e6:.1f} MB checkpoint: written in "
      f"{cost['write_s'] * 1e3:.0f} ms, verified in {cost['verify_s'] * 1e3:.0f} ms")

  b = bad_configs.sweep(os.path.join(root, "configs"))
  say(f"{bad_configs.count(b)} (before any compilation)")
  if args.subprocess_configs:
    cases = bad_configs.CASES[:args.subprocess_configs]
    s = bad_configs.sweep(os.path.join(root, "configs_main"), bad_configs.try_subprocess, cases)
    say(f"  through python -m vit_jax.main (exit 2, one `error:` line): "
        f"{sum(v == 'named' for v, _ in s.values())}/{len(s)}")

  d = data.run_all(os.path.join(root, "data"))
  say(f"bad data named or converted: {sum(not v for v in d.values())}/{len(d)} ({', '.join(d)})")

  f = disk_full.run_all(os.path.join(root, "disk"))
  kinds = sorted({k for _, k in f.values()})
  say(f"full disk while saving, previous checkpoint intact: {sum(not v for v, _ in f.values())}"
      f"/{len(f)} ({', '.join(kinds)})")

  if not args.skip_processes:
    p = processes.drill(os.path.join(root, "processes"), log=lambda s: None)
    say(f"killed process of 2 reported by the other: {'yes' if p.get('names_process') else 'no'}"
        f" (exit {p.get('exit_s', float('nan')):.1f} s after the kill, bound "
        f"{processes.EXIT_BOUND_S:.0f} s); both restarted resumed from step "
        f"{p.get('resumed_from')} and finished: {'yes' if p.get('finished') else 'no'}")
    for problem in p["problems"]:
      print(problem)
  print(f"({time.monotonic() - t0:.0f} s; workdirs in {root})")


if __name__ == "__main__":
  main()
