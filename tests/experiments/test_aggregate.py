"""Tests for experiments/aggregate.py on hand-written metrics files: completion, core-hours over
restarts, parameter counts, the table and the plots; and that it never destroys results (a folder
that is not a runner's --out, a missing path, a table that would lose rows), in Python and on the
command line."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import aggregate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FMNIST_RESULTS = os.path.join(REPO_ROOT, "experiments", "results", "fmnist_data_scaling_v1")


def _write(workdir, rows, config=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config or {"eval_split": "test", "model_name": "ViT-Mu/7"}, f)


def _train(step, hours, eta):
  return {"step": step, "train_loss": 1.0 / step, "core_hours": hours, "eta_sec": eta,
          "examples_seen": 16 * step}


# A run of 6 steps, killed after step 4 (logged every 2 steps, evaluated at 2), then resumed
# from step 4: the resumed run's core-hours restart from 0.
RESUMED = [_train(2, 0.1, 40.0), {"step": 2, "test_accuracy": 0.3}, _train(4, 0.2, 20.0),
           _train(6, 0.05, 0.0), {"step": 6, "test_accuracy": 0.5, "fewshot_5shot_accuracy": 0.4,
                                  "fewshot_10shot_accuracy": 0.45}]


def test_final_step_needs_the_last_step_and_its_evaluation():
  assert aggregate.final_step(RESUMED) == 6
  assert aggregate.final_step(RESUMED[:-1]) is None  # no final evaluation yet
  assert aggregate.final_step(RESUMED[:3]) is None  # stopped at step 4 (eta > 0)
  # Stopped (SIGTERM) right after a periodic evaluation: eta > 0, so not finished.
  assert aggregate.final_step(RESUMED[:2]) is None
  assert aggregate.final_step([]) is None


def test_core_hours_add_up_over_restarts():
  np.testing.assert_allclose(aggregate.core_hours(RESUMED), 0.2 + 0.05)
  np.testing.assert_allclose(aggregate.core_hours(RESUMED[:3]), 0.2)


def test_count_params_reads_headers(tmp_path):
  path = str(tmp_path / "params.npz")
  np.savez(path, **{"a/kernel": np.zeros((3, 4), np.float32), "a/bias": np.zeros(4),
                    "b": np.zeros((2, 2, 2), np.float16)})
  assert aggregate.count_params(path) == 12 + 4 + 8
  assert aggregate.count_params(str(tmp_path / "missing.npz")) is None


def test_result_row_and_table(tmp_path):
  out = str(tmp_path)
  _write(os.path.join(out, "points", "a"), RESUMED)
  _write(os.path.join(out, "points", "b"), RESUMED[:3])  # unfinished: no row
  point = {"name": "a", "config": "c.py:x", "overrides": {"seed": 1},
           "tags": {"family": "ViT", "model": "ViT-Mu/7", "train_size": 1000, "seed": 1}}
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump({"name": "s", "points": [point, dict(point, name="b")]}, f)
  rows = aggregate.aggregate(out, log=lambda _: None)
  assert [r["name"] for r in rows] == ["a"]
  result = aggregate.load_result(os.path.join(out, "points", "a"))  # written by collect
  assert result["tags"]["train_size"] == 1000 and result["steps"] == 6
  assert [e["step"] for e in result["evals"]] == [2]
  with open(os.path.join(out, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert list(table[0])[:8] == ["name", "family", "model", "train_size", "seed", "accuracy",
                                "fewshot_5shot_accuracy", "fewshot_10shot_accuracy"]
  r = table[0]
  assert (r["name"], r["family"], r["train_size"], r["accuracy"], r["steps"]) == (
      "a", "ViT", "1000", "0.5", "6")
  assert float(r["core_hours"]) == pytest.approx(0.25) and r["examples_seen"] == "96"
  assert json.load(open(os.path.join(out, "results.json")))[0]["fewshot_10shot_accuracy"] == 0.45
  for name in ("accuracy_vs_data.png", "accuracy_vs_compute.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,family", [("ViT-B/16", "ViT"), ("R50+ViT-B/16", "Hybrid"),
                                         ("BiT-R50x1", "ResNet"), ("Swin-T", "Swin")])
def test_family_of(name, family):
  assert aggregate.family_of(name) == family


# ---------------------------------------------------------------- results are never destroyed.
def _snapshot(folder):
  """{relative path: bytes} of every file under `folder`."""
  files = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, folder)] = f.read()
  return files


def _copy_fmnist_results(tmp_path):
  """A copy of the committed results folder: results.csv/json and plots, no sweep.json/points/."""
  out = str(tmp_path / "fmnist_data_scaling")
  shutil.copytree(FMNIST_RESULTS, out)
  assert not os.path.exists(os.path.join(out, "sweep.json"))
  assert not os.path.exists(os.path.join(out, "points"))
  return out


def _sweep_folder(out, names=("a", "b", "c")):
  """A runner --out folder with a finished point per name; returns the sweep.json points."""
  points = []
  for i, name in enumerate(names):
    _write(os.path.join(out, "points", name), RESUMED)
    points.append({"name": name, "config": "c.py:x", "overrides": {"seed": i},
                   "tags": {"family": "ViT", "model": "ViT-Mu/7", "train_size": 1000 * (i + 1),
                            "seed": 0}})
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump({"name": "s", "points": points}, f)
  return points


def _csv_rows(out):
  with open(os.path.join(out, "results.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _stderr_lines(text):
  return [line for line in text.splitlines() if line.strip()]


def test_results_folder_without_sweep_is_left_byte_identical(tmp_path, capsys):
  out = _copy_fmnist_results(tmp_path)
  before = _snapshot(out)
  assert len(_csv_rows(out)) == 15
  rc = aggregate.main([out])
  err = capsys.readouterr().err
  assert rc not in (0, None)
  assert _snapshot(out) == before  # results.csv, results.json and the plots: byte-identical.
  assert "no sweep.json or points/" in err and "python -m experiments.runner" in err
  assert 1 <= len(_stderr_lines(err)) <= 2
  with pytest.raises(aggregate.AggregateError, match="expected the --out folder"):
    aggregate.aggregate(out, log=lambda _: None)
  assert _snapshot(out) == before


def test_missing_path_is_an_error_and_is_not_created(tmp_path, capsys):
  out = str(tmp_path / "no" / "such" / "folder")
  rc = aggregate.main([out])
  err = capsys.readouterr().err
  assert rc not in (0, None)
  assert not os.path.exists(str(tmp_path / "no"))
  assert "does not exist" in err and "python -m experiments.runner" in err
  with pytest.raises(aggregate.AggregateError, match="does not exist"):
    aggregate.aggregate(out, log=lambda _: None)
  assert not os.path.exists(str(tmp_path / "no"))


def test_empty_folder_is_an_error_and_nothing_is_written(tmp_path, capsys):
  out = str(tmp_path / "empty")
  os.mkdir(out)
  assert aggregate.main([out]) not in (0, None)
  assert "no sweep.json or points/" in capsys.readouterr().err
  assert os.listdir(out) == []


@pytest.mark.parametrize("lose", ["workdir", "json_only"])
def test_fewer_rows_refused_without_the_flag(tmp_path, capsys, lose):
  out = str(tmp_path)
  _sweep_folder(out)
  assert len(aggregate.aggregate(out, log=lambda _: None)) == 3
  assert len(aggregate.aggregate(out, log=lambda _: None)) == 3  # Same rows: rewritten, fine.
  if lose == "workdir":  # A point's workdir deleted (e.g. to restart it): 2 rows now, not 3.
    shutil.rmtree(os.path.join(out, "points", "b"))
    expect = 2
  else:  # results.json alone holds more rows than the points (results.csv has as many).
    with open(os.path.join(out, "results.json")) as f:
      table = json.load(f)
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump(table + [dict(table[0], name="extra")], f)
    expect = 3
  before = _snapshot(out)
  tables = {k: v for k, v in before.items() if k in ("results.csv", "results.json")}

  rc = aggregate.main([out])
  err = capsys.readouterr().err
  assert rc not in (0, None)
  assert "--allow_fewer_rows" in err and "row" in err
  assert 1 <= len(_stderr_lines(err)) <= 2
  assert {k: v for k, v in _snapshot(out).items() if k in tables} == tables
  assert _snapshot(out) == before  # Plots and result.json files untouched too.
  with pytest.raises(aggregate.AggregateError, match="allow_fewer_rows"):
    aggregate.aggregate(out, log=lambda _: None)

  assert aggregate.main([out, "--allow_fewer_rows"]) == 0
  capsys.readouterr()
  assert len(_csv_rows(out)) == expect
  with open(os.path.join(out, "results.json")) as f:
    assert len(json.load(f)) == expect
  if lose == "workdir":
    assert [r["name"] for r in _csv_rows(out)] == ["a", "c"]


def test_unreadable_table_is_not_replaced_without_the_flag(tmp_path, capsys):
  out = str(tmp_path)
  _sweep_folder(out, names=("a",))
  with open(os.path.join(out, "results.json"), "w") as f:
    f.write("{not json")
  assert aggregate.main([out]) not in (0, None)
  assert "cannot be read" in capsys.readouterr().err
  with open(os.path.join(out, "results.json")) as f:
    assert f.read() == "{not json"
  assert aggregate.main([out, "--allow_fewer_rows"]) == 0
  with open(os.path.join(out, "results.json")) as f:
    assert len(json.load(f)) == 1


def test_bad_sweep_json_is_a_plain_error(tmp_path, capsys):
  out = str(tmp_path)
  with open(os.path.join(out, "sweep.json"), "w") as f:
    f.write("[]")
  assert aggregate.main([out]) not in (0, None)
  err = capsys.readouterr().err
  assert "sweep.json" in err and 1 <= len(_stderr_lines(err)) <= 2
  assert sorted(os.listdir(out)) == ["sweep.json"]


def _cli(*args):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  return subprocess.run([sys.executable, "-m", "experiments.aggregate", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=120)


def test_command_line_errors_are_one_or_two_lines_and_non_zero(tmp_path):
  results = _copy_fmnist_results(tmp_path)
  missing = str(tmp_path / "missing")
  fewer = str(tmp_path / "sweep")
  os.mkdir(fewer)
  _sweep_folder(fewer)
  assert _cli(fewer).returncode == 0
  shutil.rmtree(os.path.join(fewer, "points", "a"))
  cases = {results: "no sweep.json or points/", missing: "does not exist",
           fewer: "--allow_fewer_rows"}
  before = {out: _snapshot(out) for out in (results, fewer)}
  for out, message in cases.items():
    proc = _cli(out)
    lines = _stderr_lines(proc.stderr)
    assert proc.returncode != 0, (out, proc.stdout, proc.stderr)
    assert 1 <= len(lines) <= 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert lines[0].startswith("python -m experiments.aggregate: error: "), proc.stderr
  assert not os.path.exists(missing)
  assert {out: _snapshot(out) for out in (results, fewer)} == before

  proc = _cli(fewer, "--allow_fewer_rows")
  assert proc.returncode == 0, proc.stderr
  assert len(_csv_rows(fewer)) == 2
  help_text = _cli("--help")
  assert help_text.returncode == 0 and "--allow_fewer_rows" in help_text.stdout
  assert "--allow_fewer_rows" in aggregate.__doc__


def test_several_sweeps_go_into_one_results_folder(tmp_path, capsys):
  first, second, into = (str(tmp_path / n) for n in ("teachers", "students", "results/x"))
  _sweep_folder(first, names=("t1", "t2"))
  _sweep_folder(second, names=("s1", "s2", "s3"))
  assert aggregate.main([first, second, "--into", into]) == 0
  assert [r["name"] for r in _csv_rows(into)] == ["t1", "t2", "s1", "s2", "s3"]
  assert os.path.exists(os.path.join(into, "accuracy_vs_data.png"))
  assert not os.path.exists(os.path.join(first, "results.csv"))  # the sources are only read
  assert aggregate.main([first, second]) == 2  # where would the joint table go?
  assert "--into" in capsys.readouterr().err
  shutil.rmtree(os.path.join(second, "points", "s3"))  # never shrinks the joint table either
  assert aggregate.main([first, second, "--into", into]) == 2
  assert len(_csv_rows(into)) == 5


def test_points_added_to_a_committed_table_keep_its_rows(tmp_path, capsys):
  # A study's results folder holds only its table (workdirs gone); points run later join it.
  first, later, into = (str(tmp_path / n) for n in ("first", "later", "results/x"))
  _sweep_folder(first, names=("a", "b", "d"))
  assert aggregate.main([first, "--into", into]) == 0
  shutil.rmtree(first)
  _sweep_folder(later, names=("b", "c"))
  assert aggregate.main([later, "--into", into]) == 2  # without --add: 2 rows would replace 3
  _sweep_folder(later, names=("b", "c", "e"))
  assert aggregate.main([later, "--into", into]) == 2  # 3 for 3, but a and d would be lost
  assert "a, d, so it is not replaced" in capsys.readouterr().err
  shutil.rmtree(os.path.join(later, "points", "e"))
  _sweep_folder(later, names=("b", "c"))
  assert aggregate.main([later, "--into", into, "--add"]) == 0
  assert [r["name"] for r in _csv_rows(into)] == ["a", "d", "b", "c"]  # b replaced, not repeated
  with open(os.path.join(into, "results.json")) as f:
    assert [r["name"] for r in json.load(f)] == ["a", "d", "b", "c"]
  assert "| ViT-Mu/7 |" in open(os.path.join(into, "summary.md")).read()
  os.remove(os.path.join(into, "results.json"))  # a folder committed with its CSV only
  latest = str(tmp_path / "latest")
  _sweep_folder(latest, names=("f",))
  assert aggregate.main([latest, "--into", into, "--add"]) == 0
  with open(os.path.join(into, "results.json")) as f:
    table = json.load(f)
  assert [r["name"] for r in table] == ["a", "d", "b", "c", "f"]
  assert all(isinstance(r["accuracy"], float) and isinstance(r["steps"], int) for r in table)
  with open(os.path.join(into, "results.json"), "w") as f:
    f.write("{}")
  assert aggregate.main([later, "--into", into, "--add"]) == 2
  assert "not a results table" in capsys.readouterr().err


def test_summary_gives_mean_and_min_max_over_seeds():
  rows = [dict(family="ViT", model="ViT-Mu/7 (S)", train_size=1000, seed=s, accuracy=a,
               test_accuracy=t, fewshot_5shot_accuracy=f, core_hours=0.1)
          for s, a, t, f in ((0, 0.70, 0.69, 0.50), (1, 0.74, 0.71, 0.56), (2, 0.75, 0.74, 0.53))]
  rows.append(dict(family="ResNet", model="BiT-R26x1 (S)", train_size=54000, seed=0,
                   accuracy=0.9, core_hours=0.3))
  summary = aggregate.summarize(rows)
  assert [(s["family"], s["train_size"], s["seeds"]) for s in summary] == [
      ("ResNet", 54000, 1), ("ViT", 1000, 3)]
  mean, lo, hi = summary[1]["test_accuracy"]
  assert (round(mean, 6), lo, hi) == (0.713333, 0.69, 0.74)
  assert "test_accuracy" not in summary[0]
  text = aggregate.summary_markdown(rows)
  assert "| ViT | ViT-Mu/7 (S) | 1000 | 3 | 73.0 (70.0-75.0) | 71.3 (69.0-74.0) | 53.0 (50.0-56.0) | 0.100 |" in text
  assert "| ResNet | BiT-R26x1 (S) | 54000 | 1 | 90.0 |  |  | 0.300 |" in text


def test_summary_keeps_recipes_apart():
  rows = [dict(family="ViT", model="V", train_size=1000, seed=0, lr=lr, wd=wd, accuracy=a)
          for lr, wd, a in ((1e-3, 0.5, 0.7), (3e-3, 0.5, 0.8), (3e-3, 0.5, 0.9))]
  summary = aggregate.summarize(rows)
  assert [(s["lr"], s["wd"], s["seeds"]) for s in summary] == [(1e-3, 0.5, 1), (3e-3, 0.5, 2)]
  text = aggregate.summary_markdown(rows)
  assert text.splitlines()[0] == ("| family | model | train size | lr | wd | seeds | "
                                  "top-1 accuracy (eval split) | core-hours (mean) |")
  assert "| ViT | V | 1000 | 0.003 | 0.5 | 2 | 85.0 (80.0-90.0) |  |" in text
