"""Results of a sweep: one row per finished point, a CSV/JSON table and the paper's plots.

  python -m experiments.aggregate OUT [--allow_fewer_rows]
  python -m experiments.aggregate OUT1 OUT2 ... --into=experiments/results/NAME

OUT is the runner's `--out`: `OUT/sweep.json` (the sweep's points and tags) and the workdirs
`OUT/points/NAME/`. A folder with neither (a missing path, an empty folder, or a folder that only
holds a results table such as experiments/results/fmnist_data_scaling) is an error, and nothing is
written or created. A point is finished when its workdir has `result.json`; the runner writes it
when a run completes, and `collect` writes it here for points that completed elsewhere (a cluster
job running the printed command). Completion is read from `metrics.jsonl`: its last training row
is the final step (`eta_sec` 0) and a row of the same step follows it (the final evaluation).

Writes OUT/results.csv and OUT/results.json (a row per point: name, the point's tags (family,
model, train_size, seed, ...), accuracy (top-1 on the config's eval_split), test_accuracy (top-1 on
its test_split, evaluated once at the end, when it has one), fewshot_{k}shot_accuracy,
core_hours, num_params, examples_seen, steps), OUT/accuracy_vs_data.png (the ViT paper's figures 3
and 4: accuracy against training-set size, log x, a line per model coloured by family, mean and
min-max over seeds), OUT/summary.md (the same means and min-max as a Markdown table) and
OUT/accuracy_vs_compute.png (figure 5: accuracy against core-hours).

core_hours adds up the runs of a point: the trainer's count restarts when a run resumes, so each
run's last value is summed (time after a run's last log row is not counted).

The table is never silently shrunk: if OUT/results.csv or OUT/results.json already holds more rows
than there are finished points now (workdirs deleted or moved, a copied results folder), nothing is
written and the command fails; `--allow_fewer_rows` replaces the table (and plots) anyway. Files
are replaced atomically. Exit status: 0 on success, 2 on an error (one or two lines on stderr).

`--into=DIR` writes the same table and plots for the points of every OUT given (say a study's
teacher and student sweeps) into DIR, created if needed: how results are committed under
experiments/results/. With `--add` the table already in DIR keeps its rows and the new points
join it (a row of the same name is replaced): points run later, or on another machine, added
to a committed study whose workdirs are gone.
"""
import argparse
import csv
import json
import os
import re
import sys
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

RESULT = "result.json"
TABLES = ("results.csv", "results.json")
SUMMARY = "summary.md"  # mean and min-max over seeds per model and training-set size
EXPECTED = "expected the --out folder of `python -m experiments.runner EXPERIMENT --out=DIR`"
CORE_COLUMNS = ("name", "family", "model", "train_size", "seed", "accuracy")
TAIL_COLUMNS = ("core_hours", "num_params", "examples_seen", "steps", "eval_split", "config")


class AggregateError(ValueError):
  """A user error (wrong folder, a table that would lose rows): the message says what to do."""


# --------------------------------------------------------------------------- one point's result.
def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut off by a kill; the run rewrites what it needs.
          pass
  return rows


def final_step(rows: List[Dict[str, Any]]) -> Optional[int]:
  """The step of the final evaluation when the metrics show a completed run, else None."""
  last = max((i for i, r in enumerate(rows) if "train_loss" in r), default=None)
  if last is None or rows[last].get("eta_sec") != 0:
    return None
  step = rows[last]["step"]
  if any(r["step"] == step and "train_loss" not in r for r in rows[last + 1:]):
    return step
  return None


def core_hours(rows: List[Dict[str, Any]]) -> float:
  """Sum over runs (a drop of `core_hours` between training rows starts a new run) of the last
  value of each."""
  total, current = 0.0, None
  for r in rows:
    if "core_hours" not in r:
      continue
    h = float(r["core_hours"])
    if current is not None and h < current:
      total += current
    current = h
  return total + (current or 0.0)


def count_params(path: str) -> Optional[int]:
  """Parameters in an `.npz` file, from the array headers only (nothing is loaded)."""
  if not os.path.exists(path):
    return None
  total = 0
  with zipfile.ZipFile(path) as z:
    for name in z.namelist():
      with z.open(name) as f:
        major, minor = np.lib.format.read_magic(f)
        read_header = getattr(np.lib.format, f"read_array_header_{major}_{minor}", None)
        shape = read_header(f)[0] if read_header else np.load(f).shape
        total += int(np.prod(shape))
  return total


def point_result(workdir: str, point: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
  """The result of a completed run in `workdir` (None if it has not completed)."""
  rows = read_metrics(workdir)
  step = final_step(rows)
  if step is None:
    return None
  config = {}
  if os.path.exists(os.path.join(workdir, "config.json")):
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  eval_split = config.get("eval_split") or ""
  final: Dict[str, float] = {}
  for r in rows:
    if r["step"] == step and "train_loss" not in r:
      final.update({k: v for k, v in r.items() if k != "step"})
  last_train = [r for r in rows if "train_loss" in r][-1]
  evals = [r for r in rows if "train_loss" not in r and r["step"] != step]
  point = dict(point or {})
  return {
      "name": point.get("name", os.path.basename(os.path.normpath(workdir))),
      "config": point.get("config"), "overrides": point.get("overrides", {}),
      "tags": point.get("tags", {}), "model_name": config.get("model_name"),
      "train_split": config.get("train_split"), "eval_split": eval_split,
      "seed": config.get("seed"), "steps": step, "examples_seen": last_train.get("examples_seen"),
      "core_hours": core_hours(rows), "train_loss": last_train.get("train_loss"),
      "num_params": count_params(os.path.join(workdir, "params.npz")),
      "final": final, "evals": evals,
  }


def write_result(workdir: str, point: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
  """Writes `result.json` (atomically) for a completed run; None if it has not completed."""
  result = point_result(workdir, point)
  if result is not None:
    tmp = os.path.join(workdir, RESULT + ".tmp")
    with open(tmp, "w") as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(workdir, RESULT))
  return result


def load_result(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, RESULT)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------- table.
def family_of(model_name: Optional[str]) -> str:
  """"R50+ViT-B/16" -> "Hybrid", "ViT-B/16" -> "ViT", "BiT-R50x1" -> "ResNet", "Swin-T" -> "Swin"."""
  name = model_name or ""
  if "+ViT" in name:
    return "Hybrid"
  for prefix, family in (("ViT", "ViT"), ("BiT", "ResNet"), ("Swin", "Swin")):
    if name.startswith(prefix):
      return family
  return name.split("-")[0] or "unknown"


def row_of(result: Dict[str, Any]) -> Dict[str, Any]:
  """A result.json -> one flat table row."""
  tags = dict(result.get("tags") or {})
  final = result.get("final") or {}
  split = result.get("eval_split") or ""
  row = {"name": result["name"]}
  row.update(tags)
  row.setdefault("model", result.get("model_name"))
  row.setdefault("family", family_of(result.get("model_name")))
  row.setdefault("seed", result.get("seed"))
  row["accuracy"] = _accuracy(final, split)
  if "final_test_accuracy" in final:  # config.test_split, evaluated once at the end
    row["test_accuracy"] = final["final_test_accuracy"]
  row.update({k: v for k, v in sorted(final.items(), key=lambda kv: _shot(kv[0]))
              if k.startswith("fewshot_")})
  for k in TAIL_COLUMNS:
    row[k] = result.get(k)
  return row


def _accuracy(final: Dict[str, float], split: str) -> Optional[float]:
  """Top-1 on `split`: the trainer names it after the split ('test[:50]' -> 'test_accuracy'), or
  'val' when it is carved from the training split (train.eval_prefix)."""
  if not split:
    return None
  for prefix in (split, re.split(r"[\[@+]", split, maxsplit=1)[0], "val"):
    if f"{prefix}_accuracy" in final:
      return final[f"{prefix}_accuracy"]
  return None


def _shot(key: str) -> int:
  m = re.match(r"fewshot_(\d+)shot", key)
  return int(m.group(1)) if m else 0


def collect(out: str) -> List[Dict[str, Any]]:
  """Rows of every finished point under `out` (points of OUT/sweep.json first, in order, then any
  other OUT/points/* with a result), writing result.json for runs completed elsewhere."""
  points_dir = os.path.join(out, "points")
  declared, names = [], []
  sweep_json = os.path.join(out, "sweep.json")
  if os.path.exists(sweep_json):
    try:
      with open(sweep_json) as f:
        declared = json.load(f)["points"]
      names = [p["name"] for p in declared]
    except (ValueError, KeyError, TypeError) as e:
      raise AggregateError(f"{sweep_json} is not a sweep the runner wrote (a JSON object with "
                           f"'points', each with a 'name'): {type(e).__name__}: {e}") from None
  if os.path.isdir(points_dir):
    names += sorted(n for n in os.listdir(points_dir) if n not in set(names))
  by_name = {p["name"]: p for p in declared}
  rows = []
  for name in names:
    workdir = os.path.join(points_dir, name)
    result = load_result(workdir)
    if result is None and os.path.isdir(workdir):
      result = write_result(workdir, by_name.get(name))
    if result is not None:
      rows.append(row_of(result))
  return rows


def read_selection(out: str) -> List[Dict[str, Any]]:
  """The rows of a selection phase's OUT/results.csv (what a final phase chooses its recipe
  from); no folder given, or a missing table, is an error that says which phase to run first."""
  if not out:
    raise ValueError("phase=final needs select_from=DIR, the --out folder of phase=select.")
  path = os.path.join(out, "results.csv")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No selection results at {path}: run phase=select with "
                            f"--out={out} first (the runner writes results.csv).")
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def check_out(out: str) -> None:
  """Raises AggregateError unless `out` is a runner's --out folder (sweep.json or points/)."""
  if not os.path.exists(out):
    raise AggregateError(f"{out} does not exist: {EXPECTED}.")
  if not os.path.isdir(out):
    raise AggregateError(f"{out} is not a directory: {EXPECTED}.")
  if not (os.path.isfile(os.path.join(out, "sweep.json"))
          or os.path.isdir(os.path.join(out, "points"))):
    raise AggregateError(f"{out} has no sweep.json or points/: {EXPECTED}. Nothing was written.")


def table_rows(path: str) -> Optional[int]:
  """Rows of an existing results.csv / results.json (0 if absent or empty; None if unreadable)."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return 0
  try:
    with open(path, newline="") as f:
      if path.endswith(".csv"):
        return max(sum(1 for r in csv.reader(f) if r) - 1, 0)  # Less the header.
      table = json.load(f)
  except (OSError, ValueError, csv.Error):
    return None
  return len(table) if isinstance(table, list) else None


def check_not_fewer(rows: List[Dict[str, Any]], out: str) -> None:
  """Raises AggregateError if writing `rows` would replace a table holding more rows."""
  for name in TABLES:
    path = os.path.join(out, name)
    before = table_rows(path)
    if before is None:
      raise AggregateError(f"{path} exists but cannot be read as a table, so it is not replaced."
                           "\nPass --allow_fewer_rows to replace it anyway.")
    if before > len(rows):
      raise AggregateError(f"{path} has {before} row(s) but {out} has only {len(rows)} finished "
                           "point(s), so it is not replaced.\nPass --allow_fewer_rows to replace "
                           "it anyway.")
  gone = sorted({r["name"] for r in read_table(out)} - {r.get("name") for r in rows})
  if gone:  # as many rows, other points: replacing the table would lose these
    raise AggregateError(f"{os.path.join(out, 'results.json')} has rows of points that are not "
                         f"among the finished ones: {', '.join(gone[:5])}"
                         f"{' ...' if len(gone) > 5 else ''}, so it is not replaced.\nPass --add "
                         "to keep them beside the new rows, or --allow_fewer_rows to drop them.")


def _replace(path: str, write, newline=None) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", newline=newline) as f:
    write(f)
  os.replace(tmp, path)


def write_table(rows: List[Dict[str, Any]], out: str) -> None:
  """OUT/results.csv and OUT/results.json (each replaced atomically); columns in a fixed order,
  then the rest."""
  columns = [c for c in CORE_COLUMNS]
  for r in rows:
    columns += [k for k in r if k not in columns and k not in TAIL_COLUMNS]
  columns += list(TAIL_COLUMNS)

  def write_csv(f):
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})

  _replace(os.path.join(out, "results.csv"), write_csv, newline="")
  _replace(os.path.join(out, "results.json"),
           lambda f: json.dump([{k: r.get(k) for k in columns} for r in rows], f, indent=1))


# ----------------------------------------------------------------------------------- summary.
HYPER_KEYS = ("lr", "wd")  # tags that set a recipe: rows that differ in them are not seeds


def summarize(rows) -> List[Dict[str, Any]]:
  """A row per (family, model, train_size, lr, wd): the number of seeds and, per metric, the mean
  and the min and max over the seeds (the plots' points and error bars, as numbers)."""
  groups: Dict[Tuple, List[Dict[str, Any]]] = {}
  for r in rows:
    key = (str(r.get("family")), str(r.get("model")), r.get("train_size")) + tuple(
        r.get(k) for k in HYPER_KEYS)
    groups.setdefault(key, []).append(r)
  # By family and model, then numerically by train_size, lr and wd (a missing value first).
  order = lambda key: key[:2] + tuple(v if isinstance(v, (int, float)) else -1 for v in key[2:])
  out = []
  for key in sorted(groups, key=order):
    rs = groups[key]
    s = {"family": key[0], "model": key[1], "train_size": key[2], "seeds": len(rs)}
    s.update({k: v for k, v in zip(HYPER_KEYS, key[3:]) if v is not None})
    for metric in _metrics(rs) + ["core_hours"]:
      vals = [r[metric] for r in rs if isinstance(r.get(metric), (int, float))]
      if vals:
        s[metric] = (float(np.mean(vals)), float(min(vals)), float(max(vals)))
    out.append(s)
  return out


def summary_markdown(rows) -> str:
  """summarize() as a Markdown table: accuracies in percent, 'mean (min-max)' over seeds."""
  summary = summarize(rows)
  metrics = [m for m in _metrics(rows) if any(m in s for s in summary)]
  hyper = [k for k in HYPER_KEYS if any(k in s for s in summary)]
  head = (["family", "model", "train size"] + hyper + ["seeds"] + [_title(m) for m in metrics] +
          ["core-hours (mean)"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [s["family"], s["model"], str(s["train_size"])]
    cells += [f"{s[k]:g}" if k in s else "" for k in hyper] + [str(s["seeds"])]
    for m in metrics:
      if m not in s:
        cells.append("")
        continue
      mean, lo, hi = (100 * v for v in s[m])
      cells.append(f"{mean:.1f}" if s["seeds"] == 1 else f"{mean:.1f} ({lo:.1f}-{hi:.1f})")
    cells.append(f"{s['core_hours'][0]:.3f}" if "core_hours" in s else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- plots.
def _metrics(rows) -> List[str]:
  keys = ["accuracy", "test_accuracy"] + sorted({k for r in rows for k in r if k.startswith("fewshot_")},
                               key=_shot)
  return [k for k in keys if any(r.get(k) is not None for r in rows)]


def _title(metric: str) -> str:
  if metric == "accuracy":
    return "top-1 accuracy (eval split)"
  if metric == "test_accuracy":
    return "top-1 accuracy (test, at the end)"
  return f"linear {_shot(metric)}-shot accuracy"


def _plot(rows, path: str, x_key: str, x_label: str, lines: bool) -> bool:
  """A panel per metric; x log; a series per (family, model). Returns False if nothing to plot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = [r for r in rows if isinstance(r.get(x_key), (int, float)) and r[x_key] > 0]
  metrics = _metrics(rows)
  if not rows or not metrics:
    return False
  families = sorted({str(r.get("family")) for r in rows})
  cmap = plt.get_cmap("tab10")
  colour = {f: cmap(i % 10) for i, f in enumerate(families)}
  markers = "osD^v<>ph*"
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    series = {}
    for r in rows:
      if r.get(metric) is not None:
        series.setdefault((str(r.get("family")), str(r.get("model"))), []).append(r)
    for j, ((family, model), rs) in enumerate(sorted(series.items())):
      xs = sorted({r[x_key] for r in rs}) if lines else None
      if lines:  # Mean and min-max over seeds at each x.
        ys = [[r[metric] for r in rs if r[x_key] == x] for x in xs]
        mean = np.array([np.mean(y) for y in ys])
        # Clipped at 0: the mean of equal accuracies can round past them (0.4 x 3 -> 0.4 + 6e-17).
        err = np.maximum(np.array([[m - min(y) for m, y in zip(mean, ys)],
                                   [max(y) - m for m, y in zip(mean, ys)]]), 0)
        ax.errorbar(xs, mean, yerr=err, color=colour[family], marker=markers[j % len(markers)],
                    capsize=2, label=f"{model} ({family})")
      else:
        ax.scatter([r[x_key] for r in rs], [r[metric] for r in rs], color=colour[family],
                   marker=markers[j % len(markers)], label=f"{model} ({family})")
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(_title(metric))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_accuracy_vs_data(rows, path: str) -> bool:
  return _plot(rows, path, "train_size", "training-set size (examples)", lines=True)


def plot_accuracy_vs_compute(rows, path: str) -> bool:
  return _plot(rows, path, "core_hours", "training compute (core-hours)", lines=False)


def _number(text: str) -> Any:
  """A CSV cell as write_table wrote it: '' -> None, numbers -> int or float, else the text."""
  if text == "":
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def read_table(out: str) -> List[Dict[str, Any]]:
  """The rows of an existing OUT/results.json, else OUT/results.csv (numbers parsed); [] when
  there is neither."""
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    csv_path = os.path.join(out, "results.csv")
    if not os.path.exists(csv_path):
      return []
    with open(csv_path, newline="") as f:
      return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
  try:
    with open(path) as f:
      rows = json.load(f)
  except ValueError as e:
    raise AggregateError(f"{path} is not a results table (JSON list of rows): {e}") from None
  if not isinstance(rows, list) or not all(isinstance(r, dict) and "name" in r for r in rows):
    raise AggregateError(f"{path} is not a results table (JSON list of rows with a 'name').")
  return rows


def aggregate(out: str, *, allow_fewer_rows: bool = False, log=print,
              sources: Optional[Sequence[str]] = None, add: bool = False) -> List[Dict[str, Any]]:
  """collect + write_table + both plots; returns the rows.

  `sources`: runner --out folders whose points are collected together into `out` (e.g. a study's
  teachers and students into experiments/results/NAME, created if needed); by default `out`
  itself. Raises AggregateError (and writes nothing) if a source is not a runner's --out folder,
  or if an existing results table has more rows than the finished points unless
  `allow_fewer_rows`. `add`: the rows of the table already in `out` are kept, those of the same
  name as a new one replaced by it.
  """
  sources = list(sources) if sources else [out]
  for src in sources:
    check_out(src)
  rows = [r for src in sources for r in collect(src)]
  if add:
    new = {r["name"] for r in rows}
    rows = [r for r in read_table(out) if r["name"] not in new] + rows
  os.makedirs(out, exist_ok=True)
  if not allow_fewer_rows:
    check_not_fewer(rows, out)
  write_table(rows, out)
  written = [os.path.join(out, n) for n in TABLES]
  text = summary_markdown(rows)
  _replace(os.path.join(out, SUMMARY), lambda f: f.write(text))
  written.append(os.path.join(out, SUMMARY))
  for fn, name in ((plot_accuracy_vs_data, "accuracy_vs_data.png"),
                   (plot_accuracy_vs_compute, "accuracy_vs_compute.png")):
    if fn(rows, os.path.join(out, name)):
      written.append(os.path.join(out, name))
  log(f"{len(rows)} finished point(s); wrote {', '.join(written)}")
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.aggregate", description=__doc__.split("\n\n")[0])
  parser.add_argument("out", nargs="+",
                      help="the runner's --out directory (with sweep.json and/or points/); "
                      "several with --into")
  parser.add_argument("--into", help="write the tables and plots of all OUT folders' points here "
                      "(e.g. experiments/results/NAME) instead of into the one OUT")
  parser.add_argument("--allow_fewer_rows", "--allow-fewer-rows", action="store_true",
                      help="replace an existing results.csv/results.json even if it has more rows "
                      "than there are finished points now (by default that is refused)")
  parser.add_argument("--add", action="store_true",
                      help="keep the rows of the table already in --into (or OUT) and add these "
                      "points' rows to it, replacing rows of the same name")
  args = parser.parse_args(argv)
  if len(args.out) > 1 and not args.into:
    print(f"{parser.prog}: error: {len(args.out)} folders given: say where their joint table "
          "goes with --into=DIR.", file=sys.stderr)
    return 2
  try:
    aggregate(args.into or args.out[0], allow_fewer_rows=args.allow_fewer_rows,
              sources=args.out, add=args.add)
  except AggregateError as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
