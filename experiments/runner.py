r"""Runs a sweep, point by point or several at once, each in its own workdir; or prints the commands.

  python -m experiments.runner experiments/fmnist_data_scaling.py[:ARG] --out=DIR \
      [--parallel=N [--pin]] [--only=REGEX] [--print-commands] [--in-process] [--no-aggregate] \
      [--plan | --no-plan]

Each point runs `python -m vit_jax.main --config=... --workdir=DIR/points/NAME --config.k=v ...`
as a subprocess in the repository root (a crash in one point does not stop the others), its output
appended to DIR/points/NAME/log.txt. A point whose workdir has `result.json` is finished and
skipped; any other point is (re)started, and resumes from its latest checkpoint because the
trainer does. The points share a JAX compilation cache in DIR/jax_cache.

`--parallel=N` keeps N points running at once. On a CPU each point uses every core, so two
unpinned points only share them; `--pin` gives each running point its own share of the cores.
Measured on a 2-core VM (the Fashion-MNIST study's size-S models; `--parallel=2 --pin` against
one point on both cores; step times from the points' logs and from the planner): the ResNet 1.0x,
the ViT 1.4x and the hybrid 1.8x the throughput.

Ctrl-C or SIGTERM to the runner asks the running points to save a checkpoint
and stop (they run in their own sessions, so only the runner gets the terminal's Ctrl-C).

`--in-process` runs the points one after another in this process through
`vit_jax.train.train_and_evaluate` on the very config the command would build (tests use it, under
`tfds.testing.mock_data`). `--print-commands` prints, for every point not finished yet, the exact
command for a cluster scheduler (run it from the repository root; add `--distributed` for
multi-host jobs), and writes DIR/sweep.json; `python -m experiments.aggregate DIR` then collects
whatever finished. `--only=REGEX` selects points whose name matches (re.search).

Before it starts, the runner measures each model set-up of the unfinished points with a short
timed run and prints the sweep's planned cost (experiments/cost.py; cached in DIR/plan.json);
`--plan` prints it and exits, `--no-plan` skips it. At the end the runner aggregates all finished points: DIR/results.csv, results.json and the plots
(see experiments/aggregate.py). Exit status: 0 when every selected point is finished, 1 if any
failed, 3 if any was stopped (rerun to resume).
"""
import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence

from experiments import aggregate
from experiments import cost
from experiments import sweep as sweep_lib

DONE, FINISHED, STOPPED, FAILED = "done", "finished", "stopped", "failed"
MAIN = ("-m", "vit_jax.main")


def point_workdir(out: str, point: sweep_lib.Point) -> str:
  return os.path.join(os.path.abspath(out), "points", point.name)


def select(sweep: sweep_lib.Sweep, only: Optional[str]) -> List[sweep_lib.Point]:
  if not only:
    return list(sweep.points)
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise ValueError(f"--only={only!r} is not a regular expression: {e}") from None
  chosen = [p for p in sweep.points if pattern.search(p.name)]
  if not chosen:
    raise ValueError(f"--only={only!r} matches none of the {len(sweep.points)} points of "
                     f"{sweep.name!r} (e.g. {', '.join(p.name for p in sweep.points[:3])}).")
  return chosen


def write_sweep(sweep: sweep_lib.Sweep, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump(sweep.to_json(), f, indent=1)


def _definition(point: sweep_lib.Point) -> Dict:
  return json.loads(json.dumps({"config": point.config, "overrides": dict(point.overrides)}))


def prepare(point: sweep_lib.Point, workdir: str) -> bool:
  """Creates the workdir and records the point's definition; True if the point is finished.

  A workdir made by a point with another config or overrides is an error (reusing its checkpoints
  would mix two runs): use another --out or delete it.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "point.json")
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != _definition(point):
      raise ValueError(f"{workdir} belongs to a point {point.name!r} with another definition:\n"
                       f"  before: {before}\n  now:    {_definition(point)}\n"
                       "Use another --out, or delete that workdir to start the point afresh.")
  else:
    with open(path, "w") as f:
      json.dump(_definition(point), f, indent=1)
  if aggregate.load_result(workdir) is not None:
    return True
  return aggregate.write_result(workdir, dataclasses.asdict(point)) is not None


def commands(sweep: sweep_lib.Sweep, out: str, *, only: Optional[str] = None,
             python: str = sys.executable, main: Sequence[str] = MAIN) -> List[str]:
  """One shell line per point not finished yet (finished ones as comments)."""
  lines = [f"# {sweep.name}: run from {sweep_lib.REPO_ROOT}; afterwards "
           f"`python -m experiments.aggregate {shlex.quote(os.path.abspath(out))}`"]
  write_sweep(sweep, out)
  for point in select(sweep, only):
    workdir = point_workdir(out, point)
    finished = aggregate.load_result(workdir) is not None
    argv = sweep_lib.command(point, workdir, python=python, main=main)
    lines.append(("# finished: " if finished else "") + shlex.join(argv))
  return lines


# --------------------------------------------------------------------------------- running.
def run_in_process(point: sweep_lib.Point, workdir: str) -> str:
  """Trains the point here (on the config its command would build); returns its status."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top  (jax only when needed)
  handler = logging.FileHandler(os.path.join(workdir, "log.txt"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    config = sweep_lib.build_config(point)
    result = train.train_and_evaluate(config, workdir)
  except Exception:  # pylint: disable=broad-except  (one point's failure must not stop the sweep)
    with open(os.path.join(workdir, "log.txt"), "a") as f:
      f.write(traceback.format_exc())
    return FAILED
  finally:
    root.removeHandler(handler)
    handler.close()
  if "stopped_at_step" in result:
    return STOPPED
  return _finish(point, workdir)


def _status_of_exit(point, workdir, rc: int, signalled: bool) -> str:
  """A child's exit: finished if its metrics show the final evaluation (even if a late signal
  killed it), stopped if it exited cleanly or on our SIGTERM before that, else failed."""
  if aggregate.write_result(workdir, dataclasses.asdict(point)) is not None:
    return FINISHED
  if rc == 0 or (signalled and rc == -signal.SIGTERM):
    return STOPPED
  return FAILED


def _finish(point, workdir) -> str:
  if aggregate.write_result(workdir, dataclasses.asdict(point)) is None:
    with open(os.path.join(workdir, "log.txt"), "a") as f:
      f.write("runner: the run ended without a final evaluation in metrics.jsonl; rerun to "
              "resume.\n")
    return STOPPED
  return FINISHED


class _Stop:
  """Ctrl-C / SIGTERM while the runner waits: stop launching, SIGTERM the running points."""

  def __init__(self):
    self.requested = False

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, h in previous.items():
        signal.signal(s, h)

  def _handle(self, signum, _):
    self.requested = True


def _child_env(out: str) -> Dict[str, str]:
  """The points' environment: the repository on PYTHONPATH, and a compilation cache shared by the
  sweep's points (OUT/jax_cache, unless JAX_COMPILATION_CACHE_DIR is set), so that the seeds and
  data sizes of one model set-up compile once: same executables, same results."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), "jax_cache"))
  paths = [sweep_lib.REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
  return env


def core_slots(parallel: int, cores: Sequence[int]) -> List[List[int]]:
  """Splits the usable cores into `parallel` disjoint, contiguous shares (the first shares get
  one more core when they do not divide evenly)."""
  cores = sorted(cores)
  if parallel > len(cores):
    raise ValueError(f"--pin with --parallel={parallel} needs at least {parallel} usable cores; "
                     f"this process may use {len(cores)} ({cores}). Lower --parallel or drop --pin.")
  size, extra = divmod(len(cores), parallel)
  slots, start = [], 0
  for i in range(parallel):
    end = start + size + (i < extra)
    slots.append(cores[start:end])
    start = end
  return slots


# Sets its CPU affinity, then becomes the command: every thread the point starts inherits it.
# (A preexec_fn would do the same from a fork of this possibly multithreaded process.)
_PIN = ("import os, sys; os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
        "os.execvp(sys.argv[2], sys.argv[2:])")


def pinned(argv: Sequence[str], cores: Sequence[int]) -> List[str]:
  """`argv` run on `cores` only."""
  return [sys.executable, "-c", _PIN, ",".join(map(str, cores)), *argv]


def check_options(parallel: int, pin: bool, in_process: bool) -> Optional[List[List[int]]]:
  """Raises ValueError on flags that cannot work together; returns the cores of each running
  point under --pin (None without it)."""
  if parallel < 1:
    raise ValueError(f"--parallel must be at least 1, got {parallel}.")
  if in_process and parallel > 1:
    raise ValueError("--in-process runs one point at a time; drop --parallel or --in-process.")
  return core_slots(parallel, os.sched_getaffinity(0)) if pin else None


def run_sweep(sweep: sweep_lib.Sweep, out: str, *, parallel: int = 1, only: Optional[str] = None,
              pin: bool = False, in_process: bool = False, python: str = sys.executable,
              main: Sequence[str] = MAIN, aggregate_results: bool = True,
              log: Callable[[str], None] = print) -> Dict[str, str]:
  """Runs the selected points that are not finished; returns {point name: status}."""
  slots = check_options(parallel, pin, in_process)
  points = select(sweep, only)
  write_sweep(sweep, out)
  status, todo = {}, collections.deque()
  for point in points:
    workdir = point_workdir(out, point)
    if prepare(point, workdir):
      status[point.name] = DONE
    else:
      todo.append(point)
  log(f"{sweep.name}: {len(points)} point(s) selected, {len(points) - len(todo)} already "
      f"finished, {len(todo)} to run{' in-process' if in_process else ''}.")
  stop = _Stop()
  with stop.installed():
    if in_process:
      for point in todo:
        t0 = time.time()
        log(f"start {point.name}")
        status[point.name] = run_in_process(point, point_workdir(out, point))
        log(_summary(point, status[point.name], time.time() - t0, out))
        if stop.requested:
          break
    else:
      _run_subprocesses(todo, out, parallel, python, main, status, stop, log, slots)
  for point in points:
    status.setdefault(point.name, STOPPED)  # Not started because the runner was stopped.
  if aggregate_results:
    try:
      aggregate.aggregate(out, log=log)
    except aggregate.AggregateError as e:  # e.g. a table that would lose rows: left as it was
      log(f"results table not updated: {e}")
  return status


def _run_subprocesses(todo, out, parallel, python, main, status, stop, log, slots=None):
  running = {}  # name -> (point, Popen, log file, start time, slot)
  free = list(range(parallel))
  signalled = False
  while (todo and not stop.requested) or running:
    while todo and len(running) < parallel and not stop.requested:
      point = todo.popleft()
      workdir = point_workdir(out, point)
      argv = sweep_lib.command(point, workdir, python=python, main=main)
      f = open(os.path.join(workdir, "log.txt"), "a")
      f.write(f"\n=== runner {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(argv)}\n")
      f.flush()
      slot = free.pop(0)
      if slots is not None:
        argv = pinned(argv, slots[slot])
      proc = subprocess.Popen(argv, cwd=sweep_lib.REPO_ROOT, env=_child_env(out), stdout=f,
                              stderr=subprocess.STDOUT, start_new_session=True)
      running[point.name] = (point, proc, f, time.time(), slot)
      where = f" on cores {slots[slot]}" if slots is not None else ""
      log(f"start {point.name} (pid {proc.pid}){where}")
    if stop.requested and not signalled:
      signalled = True
      log(f"stopping: asking {len(running)} running point(s) to save and exit")
      for _, proc, _, _, _ in running.values():
        with contextlib.suppress(ProcessLookupError):
          os.killpg(proc.pid, signal.SIGTERM)
    for name in list(running):
      point, proc, f, t0, slot = running[name]
      rc = proc.poll()
      if rc is None:
        continue
      f.close()
      del running[name]
      free.append(slot)
      status[name] = _status_of_exit(point, point_workdir(out, point), rc, signalled)
      log(_summary(point, status[name], time.time() - t0, out, rc))
    time.sleep(0.2)


def _summary(point, status, seconds, out, rc=None) -> str:
  text = f"{status} {point.name} after {seconds:.0f} s"
  workdir = point_workdir(out, point)
  if status == FINISHED:
    row = aggregate.row_of(aggregate.load_result(workdir))
    acc = row.get("accuracy")
    text += f": accuracy {acc:.4f}" if isinstance(acc, float) else ""
  elif status == FAILED:
    text += (f" (exit code {rc})" if rc is not None else "") + \
        f"; last lines of {os.path.join(workdir, 'log.txt')}:\n" + _tail(workdir)
  return text


def _tail(workdir, n=8) -> str:
  path = os.path.join(workdir, "log.txt")
  if not os.path.exists(path):
    return ""
  with open(path, errors="replace") as f:
    return "".join("    " + line for line in f.readlines()[-n:])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description="Run a sweep (experiments/*.py) point by point, or print its commands.")
  parser.add_argument("experiment", help="experiments/FILE.py[:ARG]")
  parser.add_argument("--out", help="output folder (default workdirs/experiments/<sweep name>)")
  parser.add_argument("--parallel", type=int, default=1, help="points running at once")
  parser.add_argument("--pin", action="store_true",
                      help="give each of the --parallel running points its own share of the "
                           "cores (CPU affinity)")
  parser.add_argument("--only", help="run only points whose name matches this regex")
  parser.add_argument("--print-commands", action="store_true",
                      help="print the command of every unfinished point and exit")
  parser.add_argument("--in-process", action="store_true",
                      help="train in this process, one point after another")
  parser.add_argument("--no-aggregate", dest="aggregate", action="store_false",
                      help="skip the results table and plots at the end")
  parser.add_argument("--plan", action="store_true",
                      help="measure each model set-up's speed, print the sweep's cost and exit")
  parser.add_argument("--no-plan", dest="plan_first", action="store_false",
                      help="start without measuring and printing the cost first")
  parser.add_argument("--python", default=sys.executable,
                      help="Python interpreter of the point commands")
  args = parser.parse_args(argv)
  try:  # Bad input: one line naming it (argparse's "error:" and exit status 2), before any work.
    sweep = sweep_lib.load_experiment(args.experiment)
    select(sweep, args.only)
    check_options(args.parallel, args.pin, args.in_process)
  except (ValueError, TypeError, FileNotFoundError) as e:
    parser.error(str(e))
  out = args.out or os.path.join("workdirs", "experiments", sweep.name)
  if args.print_commands:
    print("\n".join(commands(sweep, out, only=args.only, python=args.python)))
    return 0
  if args.plan or (args.plan_first and not args.in_process):
    points = select(sweep, args.only)
    done = lambda name: os.path.exists(os.path.join(out, "points", name, aggregate.RESULT))
    p = cost.plan(points, out, finished=done)
    print(cost.describe(p, parallel=args.parallel), flush=True)
    if args.plan:
      return 0
  status = run_sweep(sweep, out, parallel=args.parallel, only=args.only, pin=args.pin,
                     in_process=args.in_process, python=args.python,
                     aggregate_results=args.aggregate)
  counts = collections.Counter(status.values())
  print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
  if counts[FAILED]:
    return 1
  return 3 if counts[STOPPED] else 0


if __name__ == "__main__":
  sys.exit(main())
