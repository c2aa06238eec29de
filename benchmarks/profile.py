r"""Where a train step's time goes: XLA:CPU's own per-kernel timings, grouped into categories.

  python -m benchmarks.profile --models=ViT-Ti/16:16,Swin-T:8,R50+ViT-B/16:8,fmnist:128
  python -m benchmarks.profile --models=ViT-B/16:8 --dtype=bfloat16

Method. The trainer's step (as in `throughput.py`, our fast settings) is compiled and run
`--steps` times under `jax.profiler` (a profiler session in this process). XLA:CPU records one
trace event per executed kernel ("thunk"), named after its HLO instruction: a fusion, a dot
(`ynn_fusion` and friends are YNNPACK matmul fusions), a convolution, a copy, a while loop's
condition. Each instruction is put in one category from the compiled HLO: what its fused
computation contains (a dot -> matmul, a convolution -> convolution, only transposes/copies/
bitcasts -> layout) or else the `op_name` JAX wrote into its metadata (LayerNorm/GroupNorm ->
normalisation, softmax or the attention module's non-matmul ops -> attention, gelu/relu/tanh/erf
-> activation, anything outside the model's forward and backward -> optimizer update). Kernel time
is summed per category and divided by the steps. "runtime overhead" is the step's wall time minus
the time at least one kernel was running (kernels on the two cores overlap, so the busy time is
the union of their intervals): dispatch, thunk scheduling, waiting between kernels. Kernel times
are wall times on a shared machine: read the shares, and the load average printed with them.

`fmnist` is the Fashion-MNIST hybrid, built from `configs/fashion_mnist.py:hybrid` (28x28x1,
10 classes); `fmnist-ARG` the config's model ARG (`fmnist-resnet`, `fmnist-demo`). One JSON line per model; `--table` also prints a Markdown table, whose shares are of
the summed thread time (kernel times on both cores plus the overhead), so they add up to 100%.
"""
import argparse
import collections
import json
import re
import sys
import time

import jax

from benchmarks import harness
from benchmarks import jax_side
from benchmarks import throughput

CATEGORIES = ("matmul", "convolution", "attention (softmax, masks)", "normalisation",
              "activation", "optimizer update", "layout (copy, transpose)", "other elementwise",
              "runtime overhead")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_LAYOUT_OPS = {"transpose", "copy", "bitcast", "parameter", "reshape", "tuple",
               "get-tuple-element", "constant"}


def parse_hlo(text: str):
  """(instructions: name -> (opcode, op_name, called computation), computations: name -> set of
  opcodes) from compiled HLO text."""
  instrs, comps, current = {}, collections.defaultdict(set), None
  for line in text.splitlines():
    if line and not line.startswith(" ") and line.rstrip().endswith("{"):
      current = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
      current = current.lstrip("%")
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    comps[current].add(opcode)
    meta, calls = _OPNAME.search(line), _CALLS.search(line)
    instrs[name] = (opcode, meta.group(1) if meta else "", calls.group(1) if calls else None)
  return instrs, comps


def categorize(name: str, instrs, comps) -> str:
  opcode, op_name, calls = instrs.get(name, ("", "", None))
  ops = set(comps.get(calls, ())) if calls else {opcode}
  if "ynn" in name or "dot" in ops or "dot" in opcode:
    return "matmul"
  if "convolution" in ops:
    return "convolution"
  lowered = op_name.lower()
  if "jvp(" not in op_name:  # neither the model's forward nor its backward: the update
    return "optimizer update"
  if ops and ops <= _LAYOUT_OPS:
    return "layout (copy, transpose)"
  if "norm" in lowered:
    return "normalisation"
  if "softmax" in lowered or "attention" in lowered or "attn" in lowered:
    return "attention (softmax, masks)"
  if any(k in lowered for k in ("gelu", "relu", "tanh", "erf", "logistic")):
    return "activation"
  return "other elementwise"


def _union_ns(intervals):
  total, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def profile_step(step: jax_side.JaxStep, steps: int) -> dict:
  """Per-category milliseconds per step, from a profiler session around `steps` calls."""
  from jax._src.lib import _profiler  # pylint: disable=g-import-not-at-top
  from jax._src.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  instrs, comps = parse_hlo(step.compiled.as_text())
  session = _profiler.ProfilerSession()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  wall_ns = (time.perf_counter() - t0) * 1e9
  data = ProfileData.from_serialized_xspace(session.stop())
  per_cat, intervals, unknown = collections.Counter(), [], collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if ev.name not in instrs or ev.duration_ns <= 0:
          if ev.duration_ns > 0 and not ev.name.startswith(("Thread", "ThunkExecutor", "end:")):
            unknown[ev.name] += ev.duration_ns
          continue
        opcode = instrs[ev.name][0]
        if opcode in ("while", "call", "conditional"):  # containers: their bodies are events
          continue
        per_cat[categorize(ev.name, instrs, comps)] += ev.duration_ns
        intervals.append((ev.start_ns, ev.start_ns + ev.duration_ns))
  busy = _union_ns(intervals)
  per_cat["runtime overhead"] = max(wall_ns - busy, 0)
  ms = {c: round(per_cat[c] / steps / 1e6, 2) for c in CATEGORIES}
  return dict(step_ms=round(wall_ns / steps / 1e6, 2), kernel_ms_by_category=ms,
              unmatched_events_ms=round(sum(unknown.values()) / steps / 1e6, 2))


def build(spec: str, dtype: str) -> jax_side.JaxStep:
  name, batch = spec.rsplit(":", 1)
  batch = int(batch)
  if name.split("-")[0] == "fmnist":
    from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
    config = fashion_mnist.get_config(name.partition("-")[2] or "hybrid")
    config.batch_size = batch
    if dtype != "float32":
      config.model.dtype = dtype
    return jax_side.JaxStep(config, image_size=28, channels=1, num_classes=10)
  overrides = throughput.fast_settings(name)
  if dtype != "float32":
    overrides["dtype"] = dtype
  return jax_side.JaxStep(jax_side.make_config(name, batch, overrides))


def table(records) -> str:
  head = "| model | batch | dtype | step ms | " + " | ".join(CATEGORIES) + " | load |"
  rows = [head, "|" + "---|" * (len(CATEGORIES) + 5)]
  for r in records:
    ms = r["kernel_ms_by_category"]
    total = sum(ms.values())  # thread time: kernels on both cores, plus the idle overhead
    cells = [f"{ms[c]:.0f} ({100 * ms[c] / total:.0f}%)" for c in CATEGORIES]
    rows.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['step_ms']:.0f} | "
                + " | ".join(cells) + f" | {r['load_average_start'][0]:.1f} |")
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="ViT-Ti/16:16,Swin-T:8,R50+ViT-B/16:8,fmnist:128",
                 help="comma-separated name:batch; 'fmnist' is the Fashion-MNIST demo model")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up)")
  p.add_argument("--table", action="store_true", help="also print a Markdown table")
  args = p.parse_args(argv)
  records = []
  for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
    step = build(spec, args.dtype)
    step.compile()
    step.materialize()
    rec = dict(benchmark="profile", model=spec.rsplit(":", 1)[0], batch=int(spec.rsplit(":")[1]),
               dtype=args.dtype, load_average_start=harness.load_average())
    rec.update(profile_step(step, args.steps))
    rec["load_average_end"] = harness.load_average()
    harness.emit(rec)
    records.append(rec)
  if args.table:
    print(table(records))


if __name__ == "__main__":
  main(sys.argv[1:])
