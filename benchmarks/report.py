r"""Markdown tables from the JSON lines the benchmark scripts print (for benchmarks/README.md).

  python -m benchmarks.report benchmarks/results/cpu.jsonl

Lines that are not JSON records of a known benchmark are skipped, so whole logs can be passed.
"""
import json
import sys
from typing import Dict, Iterable, List


def read(paths: Iterable[str]) -> List[Dict]:
  records = []
  for path in paths:
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line.startswith("{"):
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError:
            continue
  return records


def _f(x, fmt="{:.1f}"):
  return "-" if x is None else fmt.format(x)


def table(header: List[str], rows: List[List[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def throughput_table(records: List[Dict]) -> str:
  rows = []
  for r in records:
    if not r.get("benchmark", "").endswith("_throughput"):
      continue
    j, t = r["jax"], r.get("torch") or {}
    rows.append([r["benchmark"].split("_")[0], r["model"], str(r["batch"]),
                 _f(j["img_per_s"], "{:.2f}"), _f(t.get("img_per_s"), "{:.2f}"),
                 _f(r.get("speedup_jax_over_torch"), "{:.2f}x"),
                 _f(j.get("mfu") and 100 * j["mfu"], "{:.0f}%"),
                 _f(r["matmul_peak"]["peak_gflops"], "{:.0f}"),
                 _f(j["compile_s"], "{:.1f}"),
                 _f(j["memory"].get("peak_rss_mb"), "{:.0f}"),
                 _f(t.get("memory", {}).get("peak_rss_mb"), "{:.0f}")])
  return table(["mode", "model", "batch", "ours img/s", "HF torch img/s", "ours / torch",
                "MFU", "matmul peak GFLOP/s", "compile s", "ours peak RSS MB",
                "torch peak RSS MB"], rows)


def compile_table(records: List[Dict]) -> str:
  by_model: Dict[str, Dict[str, Dict]] = {}
  for r in records:
    if r.get("benchmark") == "compile_time":
      by_model.setdefault(r["model"], {})[r["layout"]] = r
  rows = []
  for model, lay in by_model.items():
    s, u = lay.get("scan", {}), lay.get("unrolled", {})
    layers = (s or u).get("num_layers")
    rows.append([model, str(layers), _f(s.get("total_s"), "{:.2f}"),
                 _f(u.get("total_s"), "{:.2f}"),
                 _f(s.get("total_s") and u.get("total_s") and u["total_s"] / s["total_s"],
                    "{:.1f}x")])
  return table(["model", "layers", "scanned: lower + compile s", "unrolled s",
                "unrolled / scanned"], rows)


def pipeline_table(records: List[Dict]) -> str:
  rows = [[r["config"], str(r["batch"]), _f(1e3 * r["synthetic_step_s"]),
           _f(1e3 * r["real_step_s"]), _f(100 * r["overhead"], "{:+.1f}%")]
          for r in records if r.get("benchmark") == "input_pipeline"]
  return table(["config", "batch", "synthetic step ms", "real-data step ms", "overhead"], rows)


def ablation_table(records: List[Dict]) -> str:
  rows = []
  for r in records:
    if r.get("benchmark") != "ablation":
      continue
    rows.append([r["model"], str(r["batch"]), r["variant"], _f(1e3 * r["median_s"]),
                 _f(r.get("img_per_s"), "{:.2f}"), _f(r.get("speed_vs_first"), "{:.2f}x"),
                 _f(r.get("mfu") and 100 * r["mfu"], "{:.0f}%"),
                 _f(r.get("compile_s"), "{:.1f}"),
                 _f((r.get("memory") or {}).get("temp_mb"), "{:.0f}")])
  return table(["model", "batch", "variant", "median ms", "img/s", "speed vs first", "MFU",
                "compile s", "XLA temp MB"], rows)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit("usage: python -m benchmarks.report RESULTS.jsonl [...]")
  records = read(argv)
  for title, fn in (("Train and inference throughput", throughput_table),
                    ("Compile time", compile_table), ("Input pipeline", pipeline_table),
                    ("Ablations", ablation_table)):
    body = fn(records)
    if body.count("\n") > 1:
      print(f"### {title}\n\n{body}\n")


if __name__ == "__main__":
  main()
