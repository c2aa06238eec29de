"""Tests for experiments/aggregate.py on hand-written metrics files: completion, core-hours over
restarts, parameter counts, the table and the plots."""
import csv
import json
import os

import numpy as np
import pytest

from experiments import aggregate


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
