"""One process of a two-process run killed: the other must exit with an error, within a bound,
rather than hang; then both restarted resume from the last checkpoint and finish.

  python -m tests.drills.processes

The two processes are `python -m vit_jax.main --distributed` on localhost (one CPU device each,
gloo collectives) on tests/drills/runs.py:procs, whose coordination-service heartbeat timeout is
10 s (config.distributed.heartbeat_timeout_seconds; JAX's default: 100 s). The survivor is stopped
by JAX's coordination service itself: a fatal error (SIGABRT, from C++, so not catchable in
Python) whose message names the task that stopped sending heartbeats ("Task 1 heartbeat
timeout"); the drill checks that message and the time it took.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.drills import runs

EXIT_BOUND_S = 60.0  # the survivor's exit after the kill: heartbeat timeout + shutdown, measured
TOTAL_STEPS = 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(workdir: str, tag: str):
  port = _free_port()
  procs = []
  for i in range(2):
    log = open(f"{workdir}.{tag}.process{i}.log", "w")
    args = runs.main_args(workdir, "procs", f"--config.total_steps={TOTAL_STEPS}",
                          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                          "--config.distributed.num_processes=2",
                          f"--config.distributed.process_id={i}")
    args.insert(3, "--distributed")
    procs.append(subprocess.Popen(args, cwd=runs.ROOT, env=runs.env(), stdout=log,
                                  stderr=subprocess.STDOUT))
    procs[-1].log_path = log.name
    log.close()
  return procs


def drill(workdir: str, log=print) -> dict:
  """{'exit_s': seconds from the kill to the survivor's exit, 'survivor_rc', 'names_process':
  whether its output names process 1, 'resumed_from', 'finished': bool, 'problems': [...]}."""
  out = dict(problems=[])
  procs = start_pair(workdir, "first")
  metrics = os.path.join(workdir, "metrics.jsonl")
  ckpts = os.path.join(workdir, "checkpoints")
  ok = runs.wait_until(lambda: os.path.isdir(ckpts) and any(n.isdigit() and int(n) >= 2
                                                             for n in os.listdir(ckpts)),
                       400, procs[0])
  if not ok:
    for p in procs:
      p.kill()
    out["problems"].append("no checkpoint of step >= 2: " + open(procs[0].log_path).read()[-2000:])
    return out
  os.kill(procs[1].pid, signal.SIGKILL)
  killed_at = time.monotonic()
  try:
    procs[0].wait(timeout=EXIT_BOUND_S * 3)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    out["problems"].append(f"process 0 still running {EXIT_BOUND_S * 3:.0f} s after the kill")
  procs[1].wait()
  out["exit_s"] = time.monotonic() - killed_at
  out["survivor_rc"] = procs[0].returncode
  text = open(procs[0].log_path).read()
  named = re.search(r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b", text)
  out["error"] = named.group(0) if named else text[-1500:]
  out["names_process"] = bool(named)
  log(f"  process 0 exited {out['survivor_rc']} {out['exit_s']:.1f} s after process 1 was "
      f"killed: {out['error'][:300]}")
  steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
  out["resumed_from"] = steps[-1] if steps else None
  procs = start_pair(workdir, "restart")
  for p in procs:
    try:
      p.wait(timeout=600)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  out["finished"] = all(p.returncode == 0 for p in procs) and os.path.exists(
      os.path.join(workdir, "complete.json"))
  if not out["finished"]:
    out["problems"].append("the restart failed: " + open(procs[0].log_path).read()[-2000:])
  else:
    text = open(procs[0].log_path).read()
    if f"from step {out['resumed_from']}" not in text:
      out["problems"].append(f"the restart did not resume from step {out['resumed_from']}")
  log(f"  restart of both: resumed from step {out['resumed_from']}, finished: {out['finished']}")
  return out


if __name__ == "__main__":
  root = tempfile.mkdtemp(prefix="processes_drill_")
  r = drill(os.path.join(root, "run"))
  print(f"process deaths reported: {int(r.get('names_process', False))}/1 (exit after "
        f"{r.get('exit_s', float('nan')):.1f} s, bound {EXIT_BOUND_S:.0f} s); restart resumed "
        f"and finished: {'yes' if r.get('finished') and not r['problems'] else 'no'}")
  for p in r["problems"]:
    print(p)
