"""What every benchmark script measures the same way: time, matmul peak, memory, the machine.

On a shared machine absolute figures drift with the load, so the scripts compare things inside one
process: `interleave` runs the contenders in turns (A, B, A, B, ..., A) and each takes the median
of its own turns, and the matmul peak is timed in the same turns.
"""
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import metrics


def cpu_threads() -> int:
  """Cores this process may run on: the size of XLA:CPU's intra-op pool, and torch's threads."""
  return metrics.usable_cores()


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo with its widest vector extension, e.g. 'AMD EPYC
  (AVX-512)' ('unknown' where there is none): figures are compared only within one machine."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "unknown"
  name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
               if line.startswith("model name")), "unknown")
  flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
  return f"{name} ({'AVX-512' if ' avx512f' in flags else 'AVX2' if ' avx2' in flags else 'no AVX2'})"


def load_average() -> List[float]:
  return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
  """The machine and versions, for the JSON records."""
  dev = jax.devices()[0]
  return dict(backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
              num_devices=jax.device_count(), cpu=platform.processor() or platform.machine(),
              cpu_threads=cpu_threads(), jax=jax.__version__, python=platform.python_version(),
              xla_flags=os.environ.get("XLA_FLAGS", ""), load_average=load_average())


def disable_compilation_cache():
  """Compile times must be real compiles, not hits of a persistent cache set up elsewhere."""
  jax.config.update("jax_enable_compilation_cache", False)


# ------------------------------------------------------------------------------------ timing.
def time_call(fn: Callable[[], object]) -> float:
  """Seconds one call of `fn` takes; `fn` must block until its work is done."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def interleave(fns: Dict[str, Callable[[], object]], rounds: int, *,
               close_with: Optional[str] = None) -> Dict[str, List[float]]:
  """Times each of `fns` once per round, in turns; then `close_with` once more (A, B, A, B, A), so
  that a drift of the load during the run biases neither side."""
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}.")
  times = {k: [] for k in fns}
  for _ in range(rounds):
    for k, fn in fns.items():
      times[k].append(time_call(fn))
  if close_with is not None:
    times[close_with].append(time_call(fns[close_with]))
  return times


def median(xs) -> float:
  return float(statistics.median(xs))


class MatmulPeak:
  """Large `jnp.dot`s (n x n by n x n, 2 n^3 FLOPs each) of `dtype` operands with a
  `preferred_element_type` result (float32 x float32 -> float32 by default; bfloat16 x bfloat16 ->
  float32 is the peak of the mixed-precision policy): the achievable matmul FLOP/s of this device
  right now. Call it once per round of `interleave`: each call runs, per size, enough
  back-to-back products to take about `seconds` (a single short product is at the mercy of one
  descheduled thread on a loaded machine). The peak is the best size's median rate."""

  def __init__(self, sizes=(1024, 2048), dtype=jnp.float32, seconds: float = 1.0,
               out_dtype=jnp.float32):
    self.dtype, self.out_dtype = jnp.dtype(dtype), jnp.dtype(out_dtype)
    self._fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=self.out_dtype))
    self._args, self._reps, self.seconds = {}, {}, {}
    for i, n in enumerate(sizes):
      a = jax.random.normal(jax.random.PRNGKey(2 * i), (n, n), self.dtype)
      b = jax.random.normal(jax.random.PRNGKey(2 * i + 1), (n, n), self.dtype)
      self._fn(a, b).block_until_ready()  # compile
      once = min(time_call(lambda: self._fn(a, b).block_until_ready()) for _ in range(2))
      self._args[n], self._reps[n], self.seconds[n] = (a, b), max(1, round(seconds / once)), []

  def __call__(self):
    for n, (a, b) in self._args.items():
      def run(a=a, b=b, k=self._reps[n]):
        outs = [self._fn(a, b) for _ in range(k)]
        jax.block_until_ready(outs)
      self.seconds[n].append(time_call(run) / self._reps[n])

  def gflops(self, n: int) -> List[float]:
    return [2 * n ** 3 / s / 1e9 for s in self.seconds[n]]

  def peak_gflops(self) -> float:
    return max(median(self.gflops(n)) for n in self._args)

  def summary(self) -> dict:
    return dict(dtype=self.dtype.name, out_dtype=self.out_dtype.name,
                peak_gflops=round(self.peak_gflops(), 2),
                median_gflops_by_size={n: round(median(self.gflops(n)), 2) for n in self._args},
                products_per_call=dict(self._reps),
                calls=len(next(iter(self.seconds.values()))))


# ------------------------------------------------------------------------------------ memory.
def rss_mb() -> float:
  """Resident memory of this process now (MiB); 0 where /proc is missing."""
  return _status_mb("VmRSS")


def peak_rss_mb() -> float:
  """Peak resident memory since the last `reset_peak_rss` (or the start), MiB."""
  return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
  """Restarts the peak-RSS counter (Linux: `5` into /proc/self/clear_refs). False if unsupported,
  in which case `peak_rss_mb` is the peak of the whole process."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _status_mb(key: str) -> float:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


class PeakMemory:
  """Peak host RSS (and device bytes in use, where the device reports them) over a `with` block.

  `peak_rss_mb` is the process's peak inside the block, `delta_rss_mb` that minus the RSS when the
  block began (what the block itself added at its worst)."""

  def __enter__(self):
    self.reset_ok = reset_peak_rss()
    self.start_rss = rss_mb()
    return self

  def __exit__(self, *exc):
    self.peak = peak_rss_mb()
    stats = _device_memory_stats()
    self.device_peak = stats.get("peak_bytes_in_use") if stats else None
    return False

  def summary(self) -> dict:
    out = dict(peak_rss_mb=round(self.peak, 1), delta_rss_mb=round(self.peak - self.start_rss, 1),
               peak_is_whole_process=not self.reset_ok)
    if self.device_peak is not None:
      out["device_peak_mb"] = round(self.device_peak / 2 ** 20, 1)
    return out


def _device_memory_stats() -> Optional[dict]:
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (CPU devices may not implement it)
    return None


def xla_memory(compiled) -> dict:
  """Buffer sizes XLA planned for a compiled executable (MiB), where the backend says."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes")
  return {k.replace("_size_in_bytes", "_mb"): round(getattr(m, k) / 2 ** 20, 1)
          for k in keys if hasattr(m, k)}


def cost_flops(lowered_or_compiled) -> Optional[float]:
  """XLA's FLOP count of a lowered or compiled computation (None where unavailable).

  A scanned loop body is counted once, not once per iteration: count an unrolled model."""
  ca = lowered_or_compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and "flops" in ca else None


# ------------------------------------------------------------------------------------ output.
def emit(record: dict, stream=None):
  """One JSON object per line on stdout (numpy scalars converted)."""
  stream = stream or sys.stdout
  stream.write(json.dumps(record, default=_to_json) + "\n")
  stream.flush()


def _to_json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def parse_ints(text: str, what: str, minimum: int = 1) -> List[int]:
  """'8,16' -> [8, 16], each at least `minimum`, with an error naming the flag."""
  try:
    out = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"{what} must be comma-separated integers such as '8,16', got {text!r}.")
  if not out or any(v < minimum for v in out):
    kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    raise ValueError(f"{what} must be {kind}, got {text!r}.")
  return out
