"""Metric writers (clu: TensorBoard + logging) plus a JSON-lines file, and the console progress line.

Only process 0 writes files; other processes log to their own console.
"""
import contextlib
import json
import os
import time
from typing import Any, Mapping, Optional

import jax
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per `write_scalars` call to `path`: {"step": s, name: value, ...}."""

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


def read_jsonl(path: str) -> list:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + logging + `metrics.jsonl` on process 0; logging only elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def usable_cores() -> int:
  """The cores this process may run on: its CPU affinity (`taskset`, a cgroup's cpuset) where the
  OS reports one, else every core of the machine."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


class Progress:
  """Throughput, examples seen, training time, core-hours and ETA since the (re)start of a run.

  Time spent in `excluded()` blocks (evaluation, checkpoint saves) counts toward the wall clock
  and core-hours but not toward the training time, img/s and ETA. core-hours = wall-clock hours x
  cores in use: accelerator devices, or the CPU cores of this process's machine on the CPU
  platform (fake CPU devices share those cores), summed over hosts.
  """

  def __init__(self, *, first_step: int, total_steps: int, batch_size: int):
    self.first_step, self.total_steps, self.batch_size = first_step, total_steps, batch_size
    self.t0 = time.monotonic()
    self.excluded_s = 0.0
    self._last = (first_step, self.t0, 0.0)
    if jax.devices()[0].platform == "cpu":
      self.cores = usable_cores() * jax.process_count()
    else:
      self.cores = jax.device_count()

  @contextlib.contextmanager
  def excluded(self):
    """A block whose time is not training time (evaluation, saving)."""
    t = time.monotonic()
    try:
      yield
    finally:
      self.excluded_s += time.monotonic() - t

  def train_seconds(self, now: Optional[float] = None) -> float:
    """Wall-clock seconds since the (re)start (or until `now`), less the excluded blocks."""
    return (time.monotonic() if now is None else now) - self.t0 - self.excluded_s

  def overall(self, step: int) -> dict:
    """img/s and ETA over the training time since the (re)start."""
    rate = (step - self.first_step) / max(self.train_seconds(), 1e-9)
    return {"img_per_sec": rate * self.batch_size,
            "eta_sec": (self.total_steps - step) / max(rate, 1e-9)}

  def measure(self, step: int) -> dict:
    now = time.monotonic()
    last_step, last_t, last_excluded = self._last
    self._last = (step, now, self.excluded_s)
    busy = now - last_t - (self.excluded_s - last_excluded)
    rate = (step - last_step) / max(busy, 1e-9)  # steps/s of training since the last call
    train_s = self.train_seconds(now)
    overall = (step - self.first_step) / max(train_s, 1e-9)
    return {
        "img_per_sec": rate * self.batch_size,
        "examples_seen": step * self.batch_size,
        "train_sec": train_s,
        "core_hours": (now - self.t0) / 3600 * self.cores,
        "eta_sec": (self.total_steps - step) / max(overall, 1e-9),
    }


def format_progress(step: int, total: int, m: Mapping[str, float]) -> str:
  eta = int(m.get("eta_sec", 0))
  acc = f"acc {m['train_accuracy']:.4f} " if "train_accuracy" in m else ""  # DETR has none
  return (f"step {step}/{total} ({100 * step / max(total, 1):.0f}%) "
          f"loss {m.get('train_loss', float('nan')):.4f} {acc}"
          f"lr {m.get('lr', float('nan')):.2e} {m.get('img_per_sec', 0):.0f} img/s "
          f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
