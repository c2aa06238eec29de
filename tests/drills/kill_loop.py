"""Kill loop: a training run killed again and again, restarted each time, ends bitwise equal to an
uninterrupted one.

  python -m tests.drills.kill_loop --kills=N [--signal=kill|term|both] [--seed=S]

prints `kills survived: K/N, final params bitwise equal: yes|no`. Each run is `python -m
vit_jax.main` on tests/drills/runs.py (a checkpoint every step, asynchronous). SIGKILL lands either
at a chosen point of a checkpoint save (runs.die_at: array files written, between the files, before
the final rename, between the rename and the manifest), or at a random moment after the run made
progress (saves take most of a step here, so many land inside one). SIGTERM lands at a random
moment; the run must save and exit by itself, and the time from the signal to its exit is
measured against TERM_BOUND_S. A kill is survived when the next start of the same command resumes
and trains on (or finishes) without an error.
"""
import argparse
import glob
import os
import random
import shutil
import signal
import tempfile
import time

from tests.drills import runs

HOOKS = ("metadata", "commit", "rename", "manifest")
TERM_BOUND_S = 30.0  # SIGTERM to exit: finish the step, save, close (measured: a few seconds)
START_TIMEOUT_S = 300.0  # a start (imports, data, compilation from the cache) on a busy machine


def total_steps_for(kills: int) -> int:
  """Enough steps that every kill lands before the end (each run trains at least one step)."""
  return max(12, 2 * kills + 4)


def checkpoint_steps(workdir: str) -> list:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _lines(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return f.read().count("\n")


def _tail(path: str, n: int = 2000) -> str:
  with open(path) as f:
    return f.read()[-n:]


def kill_loop(workdir: str, kills: int, *, sig: int = signal.SIGKILL, seed: int = 0,
              reference: str = None, total_steps: int = None, log=print) -> dict:
  """Kills `kills` runs in `workdir` (see the module docstring), then runs to the end and compares
  the exported params with `reference`'s (a workdir with params.npz; None: run one in
  `workdir`.reference). Returns the counts and measurements."""
  rng = random.Random(seed)
  total = total_steps or total_steps_for(kills)
  steps_flag = f"--config.total_steps={total}"
  if reference is None:
    reference = workdir + ".reference"
    if not os.path.exists(os.path.join(reference, "params.npz")):
      rc, out = runs.run(reference, "", steps_flag)
      if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed ({rc}):\n{out[-3000:]}")
  metrics = os.path.join(workdir, "metrics.jsonl")
  result = dict(kills=kills, survived=0, applied=0, inside_save=0, term_exit_s=[], hooks={},
                failures=[])
  previous_killed = False
  for i in range(kills):
    hook = None
    if sig == signal.SIGKILL and i % 2 == 0:
      hook = HOOKS[(i // 2) % len(HOOKS)]
    before = checkpoint_steps(workdir)
    arg = ""
    if hook:
      at = min(total - 1, (before[-1] if before else 0) + rng.randint(1, 2))
      arg = f"die={hook}@{at}"
    start_lines = _lines(metrics)
    p = runs.start(workdir, arg, steps_flag)
    if hook:
      try:
        p.wait(timeout=START_TIMEOUT_S)
      except Exception:  # pylint: disable=broad-except
        p.kill()
        p.wait()
    else:
      progressed = runs.wait_until(lambda: _lines(metrics) > start_lines, START_TIMEOUT_S, p)
      if progressed and p.poll() is None:
        time.sleep(rng.uniform(0.0, 0.5))
        if p.poll() is None:
          sent = time.monotonic()
          os.kill(p.pid, sig)
          inside = bool(glob.glob(os.path.join(workdir, "checkpoints", "*orbax-checkpoint-tmp*")))
          try:
            p.wait(timeout=TERM_BOUND_S * 4)
          except Exception:  # pylint: disable=broad-except
            p.kill()
            p.wait()
          if sig == signal.SIGTERM:
            result["term_exit_s"].append(time.monotonic() - sent)
          result["inside_save"] += inside
      p.wait()
    rc = p.returncode
    killed = rc == -signal.SIGKILL if sig == signal.SIGKILL else (
        rc == 0 and "stopped at step" in _tail(p.log_path))
    # This start came after a kill: it survived that kill if it resumed without an error.
    ok = rc in (0, -signal.SIGKILL)
    if previous_killed:
      result["survived"] += ok
    if not ok:
      result["failures"].append(f"run {i} ({arg or 'random ' + signal.Signals(sig).name}) "
                                f"exited {rc}:\n{_tail(p.log_path)}")
    if killed:
      result["applied"] += 1
      if hook:
        result["hooks"][hook] = result["hooks"].get(hook, 0) + 1
    log(f"run {i}: {arg or 'random ' + signal.Signals(sig).name}, exit {rc}, checkpoints "
        f"{before} -> {checkpoint_steps(workdir)}")
    previous_killed = killed
    if rc == 0 and os.path.exists(os.path.join(workdir, "complete.json")):
      break  # finished before the kill: no more kills possible
  rc, out = runs.run(workdir, "", steps_flag)
  if previous_killed:
    result["survived"] += rc == 0
  if rc != 0:
    result["failures"].append(f"final run exited {rc}:\n{out[-3000:]}")
  result["bitwise_equal"] = rc == 0 and runs.bitwise_equal(runs.params(workdir),
                                                           runs.params(reference))
  return result


def summary(result: dict) -> str:
  line = (f"kills survived: {result['survived']}/{result['kills']}, final params bitwise equal: "
          f"{'yes' if result['bitwise_equal'] else 'no'}")
  if result["term_exit_s"]:
    line += (f"; SIGTERM to exit: max {max(result['term_exit_s']):.1f} s "
             f"(bound {TERM_BOUND_S:.0f} s)")
  return line


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=10)
  parser.add_argument("--signal", choices=("kill", "term", "both"), default="both")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default=None, help="default: a temporary directory")
  args = parser.parse_args(argv)
  root = args.workdir or tempfile.mkdtemp(prefix="kill_loop_")
  os.makedirs(root, exist_ok=True)
  sigs = {"kill": [signal.SIGKILL], "term": [signal.SIGTERM],
          "both": [signal.SIGKILL, signal.SIGTERM]}[args.signal]
  reference = os.path.join(root, "reference")
  rc, out = runs.run(reference, "", f"--config.total_steps={total_steps_for(args.kills)}")
  if rc != 0:
    raise SystemExit(f"the uninterrupted run failed:\n{out[-3000:]}")
  results = []
  for sig in sigs:
    name = signal.Signals(sig).name
    workdir = os.path.join(root, name.lower())
    shutil.rmtree(workdir, ignore_errors=True)
    r = kill_loop(workdir, args.kills, sig=sig, seed=args.seed, reference=reference,
                  log=lambda s: print("  " + s, flush=True))
    print(f"{name}: {summary(r)}", flush=True)
    for f in r["failures"]:
      print(f)
    results.append(r)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  return results


if __name__ == "__main__":
  main()
