r"""Compile time of the train step (lower + compile, nothing run), scanned against unrolled
layers, one JSON line per (model, layout) and a summary line.

  python -m benchmarks.compile_time                                  # B/16, L/16, H/14
  python -m benchmarks.compile_time --models=ViT-B/16 --layouts=scan --repeats=3

The step is the trainer's (`trainer.make_update_fn`, AdamW, clipping, donated state) at batch
`--batch`; only shapes are needed, so even ViT-H/14 compiles in little memory. The persistent
compilation cache is off and every compile starts from a fresh `jax.jit`, so nothing is reused.
With `--repeats` > 1 the (model, layout) pairs take turns and each reports its median. `cpu_s` is
the process CPU time the compile used (less sensitive to other jobs on a shared machine than wall
time).
"""
import argparse
import json
import resource
import sys

from benchmarks import harness
from benchmarks import jax_side


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def compile_once(name: str, scan: bool, batch: int, image_size: int, compiler_options: dict,
                 overrides: dict) -> dict:
  config = jax_side.make_config(name, batch, dict(overrides, scan=scan))
  step = jax_side.JaxStep(config, image_size=image_size, compiler_options=compiler_options)
  c0 = cpu_seconds()
  step.lower()
  c1 = cpu_seconds()
  step.compile()
  c2 = cpu_seconds()
  return dict(lower_s=step.lower_s, compile_s=step.compile_s,
              total_s=step.lower_s + step.compile_s, lower_cpu_s=c1 - c0, compile_cpu_s=c2 - c1,
              total_cpu_s=c2 - c0, num_layers=step.model.num_layers)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="ViT-B/16,ViT-L/16,ViT-H/14")
  p.add_argument("--layouts", default="scan,unrolled", help="scan and/or unrolled")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--model_overrides", default="{}", help="JSON of model fields")
  p.add_argument("--compiler_options", default="{}", help="JSON of XLA compile options")
  args = p.parse_args(argv)
  layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
  bad = sorted(set(layouts) - {"scan", "unrolled"})
  if bad:
    raise ValueError(f"--layouts takes 'scan' and/or 'unrolled', got {bad}.")
  harness.disable_compilation_cache()
  harness.emit(dict(benchmark="environment", **harness.environment()))
  options, overrides = json.loads(args.compiler_options), json.loads(args.model_overrides)
  names = [m.strip() for m in args.models.split(",") if m.strip()]
  pairs = [(n, lay) for n in names for lay in layouts]
  runs = {pair: [] for pair in pairs}
  for _ in range(args.repeats):
    for name, layout in pairs:
      runs[(name, layout)].append(compile_once(name, layout == "scan", args.batch,
                                               args.image_size, options, overrides))
  summary = {}
  for (name, layout), rs in runs.items():
    med = {k: round(harness.median([r[k] for r in rs]), 3) for k in rs[0] if k != "num_layers"}
    rec = dict(benchmark="compile_time", model=name, layout=layout, batch=args.batch,
               num_layers=rs[0]["num_layers"], repeats=len(rs), **med,
               all_total_s=[round(r["total_s"], 3) for r in rs], compiler_options=options,
               model_overrides=overrides, load_average=harness.load_average())
    harness.emit(rec)
    summary[f"{name} {layout}"] = med["total_s"]
  out = dict(benchmark="compile_time_summary", total_s=summary)
  for name in names:
    if f"{name} scan" in summary and f"{name} unrolled" in summary:
      out.setdefault("unrolled_over_scan", {})[name] = round(
          summary[f"{name} unrolled"] / summary[f"{name} scan"], 2)
  scanned = [n for n in names if f"{n} scan" in summary]
  if len(scanned) > 1:  # Growth with depth: each scanned model relative to the first one listed.
    first = summary[f"{scanned[0]} scan"]
    out["scan_relative_to_first"] = {n: round(summary[f"{n} scan"] / first, 2) for n in scanned}
  out["load_average"] = harness.load_average()
  harness.emit(out)


if __name__ == "__main__":
  main(sys.argv[1:])
