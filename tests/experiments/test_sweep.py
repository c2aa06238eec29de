"""Tests for experiments/sweep.py: overrides become flags that vit_jax.main parses into the same
config; durations in the base config's units; experiment files and their args; the shipped sweeps."""
import math
import os
import shlex

import pytest

from configs import common
from experiments import sweep
from vit_jax import optim
from vit_jax.data import splits

FMNIST = "configs/fashion_mnist.py:vit"


def _main_config(argv):
  """The config vit_jax.main builds from a command line (its own flag definition)."""
  return sweep._parse_flags([a for a in argv if a.startswith("--config")])


def test_leaf_overrides_are_plain_flags():
  p = sweep.Point("a", FMNIST, {"seed": 3, "train_split": "train@seeded(1000, seed=3)",
                                "fewshot.shots": (1, 5), "mixup": 0.2, "lr.base": 1e-4})
  assert sweep.override_flags(p) == [
      "--config.seed=3", "--config.train_split=train@seeded(1000, seed=3)",
      "--config.fewshot.shots=(1, 5)", "--config.mixup=0.2", "--config.lr.base=0.0001"]
  c = sweep.build_config(p)
  assert (c.seed, c.train_split, c.fewshot.shots, c.mixup, c.lr.base) == (
      3, "train@seeded(1000, seed=3)", (1, 5), 0.2, 1e-4)


def test_new_keys_and_none_fold_into_their_configdict():
  # config.model only holds what the config changed; ml_collections' flags cannot add a field
  # or set a float to None, so these become one dict flag per ConfigDict.
  p = sweep.Point("a", FMNIST, {"model.hidden_size": 16, "model": {"num_layers": 1},
                                "lr.warmup_epochs": None, "lr.warmup_steps": 3, "lr.base": 0.01})
  flags = sweep.override_flags(p)
  assert len(flags) == 2 and flags[0].startswith("--config.model={")
  c = sweep.build_config(p)
  base = sweep.load_config(FMNIST)
  assert dict(c.model) == dict(base.model, hidden_size=16, num_layers=1)
  assert (c.lr.warmup_epochs, c.lr.warmup_steps, c.lr.base, c.lr.decay) == (
      None, 3, 0.01, base.lr.decay)


def test_bad_overrides_name_the_key():
  with pytest.raises(ValueError, match="'modle.x' is not a key"):
    sweep.override_flags(sweep.Point("a", FMNIST, {"modle.x": 1}))
  with pytest.raises(ValueError, match="'total_epochs' cannot be set to None"):
    sweep.override_flags(sweep.Point("a", FMNIST, {"total_epochs": None}))
  with pytest.raises(ValueError, match="must start with a letter"):
    sweep.Point("../x", FMNIST)
  with pytest.raises(ValueError, match="two points named"):
    sweep.Sweep("s", [sweep.Point("a", FMNIST), sweep.Point("a", FMNIST)])


def test_command_is_what_main_parses():
  p = sweep.Point("a", FMNIST, {"model.hidden_size": 16, "total_epochs": 0.5,
                                "fewshot.train_split": "train[:100]"})
  argv = sweep.command(p, "/tmp/w", python="python")
  assert argv[:5] == ["python", "-m", "vit_jax.main", f"--config={FMNIST}", "--workdir=/tmp/w"]
  # Through a shell and back, then main's parser: the same config as build_config.
  again = _main_config(shlex.split(shlex.join(argv)))
  assert again.to_dict() == sweep.build_config(p).to_dict()


@pytest.mark.parametrize("unit", ["steps", "epochs", "examples"])
@pytest.mark.parametrize("n", [1000, 3000, 60000])
def test_examples_budget_gives_the_same_steps_in_every_unit(unit, n):
  c = common.base_config()
  c.batch_size = 256
  c.total_steps = c.total_epochs = c.total_examples = None
  c[f"total_{unit}"] = {"steps": 7, "epochs": 2.5, "examples": 999}[unit]
  over = sweep.examples_budget(c, "total", 20480, n)
  assert list(over) == [f"total_{unit}"]
  c[f"total_{unit}"] = over[f"total_{unit}"]
  steps = optim.durations(c, "total", steps_per_epoch=math.ceil(n / 256), batch_size=256)
  assert steps == 80  # 20480 / 256


def test_parse_arg_types_and_errors():
  d = dict(examples=10, sizes=(1, 2), models=("a",), name="x")
  assert sweep.parse_arg("examples=40,sizes=3/4,models=b/c", d) == dict(
      examples=40, sizes=(3, 4), models=("b", "c"), name="x")
  assert sweep.parse_arg(None, d) == d
  with pytest.raises(ValueError, match="key one of examples, sizes"):
    sweep.parse_arg("budget=3", d)


STUDY = "experiments/fmnist_data_scaling.py"


def test_fmnist_data_scaling_budget_grows_with_the_data_above_a_floor():
  from experiments import fmnist_data_scaling as study
  assert [study.budget_examples(n) for n in (1000, 7000, 54000)] == [
      64000, 64000, 108000]  # 64, 9.1 and 2 epochs
  assert study.budget_examples(32001) == 64002


def test_fmnist_data_scaling_subsets_are_nested_and_never_validation():
  from experiments import fmnist_data_scaling as study
  sizes = {"train": 60000}
  (_, val), = splits.resolve(study.VAL, sizes)
  subsets = {n: splits.resolve(study.train_split(n, 1), sizes)[0][1] for n in (1000, 3000, 54000)}
  assert set(subsets[1000]) < set(subsets[3000]) < set(subsets[54000])
  assert len(subsets[54000]) == 54000 and not set(subsets[54000]) & set(val)
  assert len(val) == 6000 and val.min() == 54000
  other_seed = splits.resolve(study.train_split(1000, 2), sizes)[0][1]
  assert set(other_seed) != set(subsets[1000])


def test_fmnist_data_scaling_selection_sees_the_validation_split_only():
  s = sweep.load_experiment(f"{STUDY}:phase=select")
  assert len(s.points) == 3 * 2 * 2 * 2  # families x sizes x lrs x wds
  p = {q.name: q for q in s.points}["select_vit_n7000_lr0.003_wd0.5"]
  assert p.tags["lr"] == 0.003 and p.tags["wd"] == 0.5 and p.tags["model"] == "ViT-Mu/7 (S)"
  c = sweep.build_config(p)
  assert (c.model.hidden_size, c.model.mlp_dim) == (64, 256)  # selected at model size S
  assert (c.train_split, c.eval_split, c.test_split) == (
      "train[:54000]@seeded(7000, seed=0)", "train[54000:]", "")
  assert c.fewshot.shots == () and (c.lr.base, c.wd) == (0.003, 0.5)
  d = lambda k: optim.durations(c, k, steps_per_epoch=math.ceil(7000 / 128), batch_size=128)
  assert (d("total"), d("lr.warmup")) == (500, 50)  # the 64,000-example floor


def _selection_rows(best):
  from experiments import fmnist_data_scaling as study
  rows = []
  for family in ("ResNet", "ViT", "Hybrid"):
    for lr in study.LRS:
      for wd in study.WDS:
        for n in study.SELECT_SIZES:
          acc = 0.8 + (0.05 if (lr, wd) == best[family] else 0.0) + n * 1e-6
          rows.append({"name": f"{family}{lr}{wd}{n}", "family": family, "lr": str(lr),
                       "wd": str(wd), "train_size": str(n), "eval_split": study.VAL,
                       "accuracy": str(acc)})
  return rows


def test_fmnist_data_scaling_choice_is_the_best_mean_validation_accuracy():
  from experiments import fmnist_data_scaling as study
  best = {"ResNet": (0.003, 0.05), "ViT": (0.001, 0.5), "Hybrid": (0.003, 0.5)}
  assert study.choose(_selection_rows(best)) == best
  rows = _selection_rows(best)
  rows[0]["eval_split"] = "test"
  with pytest.raises(ValueError, match="not on the validation split"):
    study.choose(rows)
  with pytest.raises(ValueError, match="lacks lr=.*run phase=select to the end"):
    study.choose(_selection_rows(best)[1:])


def test_fmnist_data_scaling_grid_is_an_arg_and_the_choice_stays_on_it():
  from experiments import fmnist_data_scaling as study
  s = sweep.load_experiment(f"{STUDY}:phase=select,lrs=0.003/0.01,wds=0.5/2,models=vit")
  assert [p.name for p in s.points if "n1000" in p.name] == [
      "select_vit_n1000_lr0.003_wd0.5", "select_vit_n1000_lr0.003_wd2",
      "select_vit_n1000_lr0.01_wd0.5", "select_vit_n1000_lr0.01_wd2"]
  assert (sweep.build_config(s.points[-1]).lr.base, sweep.build_config(s.points[-1]).wd) == (
      0.01, 2.0)
  best = {"ResNet": (0.003, 0.05), "ViT": (0.001, 0.5), "Hybrid": (0.003, 0.5)}
  rows = _selection_rows(best)
  # On a sub-grid the best of that grid wins; the rows off it are ignored (the ViT's best,
  # lr 0.001, is off it: its two equal scores go to the smaller weight decay).
  sub = study.choose(rows, lrs=(0.003,), wds=(0.05, 0.5))
  assert sub == {"ResNet": (0.003, 0.05), "ViT": (0.003, 0.05), "Hybrid": (0.003, 0.5)}
  with pytest.raises(ValueError, match="lacks lr=0.01"):
    study.choose(rows, lrs=(0.003, 0.01))


def test_fmnist_data_scaling_chooses_on_the_union_of_the_grids_run(tmp_path):
  import csv
  from experiments import fmnist_data_scaling as study
  best = {"ResNet": (0.003, 0.05), "ViT": (0.001, 0.5), "Hybrid": (0.003, 0.5)}
  rows = _selection_rows(best)  # the default grid, 1e-3/3e-3 x 0.05/0.5
  # A wider grid run beside it for the ResNet only, without its (0.001, 2) and (0.01, 0.05)
  # corners: the union is no product grid, and its best pair is off the default grid.
  for lr, wd, acc in ((0.01, 0.5, 0.9), (0.01, 2.0, 0.7), (0.003, 2.0, 0.7)):
    for n in study.SELECT_SIZES:
      rows.append({"name": f"wide{lr}{wd}{n}", "family": "ResNet", "lr": str(lr),
                   "wd": str(wd), "train_size": str(n), "eval_split": study.VAL,
                   "accuracy": str(acc)})
  assert study.choose(rows) == dict(best, ResNet=(0.01, 0.5))
  assert study.choose(rows, lrs=study.LRS, wds=study.WDS) == best  # the first grid alone
  assert study.choose(rows, wds=(0.5,)) == dict(best, ResNet=(0.01, 0.5))
  resnet = [r for r in rows if r["family"] == "ResNet"]
  assert study.choose(resnet, lrs=(0.003, 0.01), wds=(0.5, 2.0)) == {"ResNet": (0.01, 0.5)}
  with pytest.raises(ValueError, match="ResNet lacks lr=0.001, wd=2"):
    study.choose(resnet, wds=(2.0,))
  with pytest.raises(ValueError, match="lacks lr=0.01, wd=0.5 at some of the sizes"):
    study.choose([r for r in rows if r["name"] != "wide0.010.51000"])
  with open(tmp_path / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  s = sweep.load_experiment(f"{STUDY}:phase=final,select_from={tmp_path},models=resnet")
  assert {(p.tags["lr"], p.tags["wd"]) for p in s.points} == {(0.01, 0.5)}
  s = sweep.load_experiment(f"{STUDY}:phase=final,select_from={tmp_path},models=resnet,"
                            "lrs=0.001/0.003,wds=0.05/0.5")
  assert {(p.tags["lr"], p.tags["wd"]) for p in s.points} == {(0.003, 0.05)}
  with pytest.raises(ValueError, match="numbers joined by '/'.*lrs=0.01/x"):
    sweep.load_experiment(f"{STUDY}:phase=select,lrs=0.01/x")


def test_fmnist_data_scaling_committed_results_ran_the_committed_choice():
  # The README's choice is what `choose` makes of the committed selection; the final results ran
  # it, and the narrow recipe's final phase ran the first grid's choice.
  import csv
  from experiments import fmnist_data_scaling as study
  results = os.path.join(sweep.REPO_ROOT, "experiments", "results", "fmnist_data_scaling")

  def read(*path):
    with open(os.path.join(results, *path)) as f:
      return list(csv.DictReader(f))
  selection, final, first = (read(*p) for p in (("selection", "results.csv"), ("results.csv",),
                                                 ("narrow_recipe", "results.csv")))
  assert len(selection) == 48 and {r["eval_split"] for r in selection} == {study.VAL}
  chosen = study.choose(selection)
  assert chosen == {"ResNet": (0.03, 0.5), "ViT": (0.003, 2.0), "Hybrid": (0.003, 0.5)}
  narrow = study.choose(selection, lrs=study.LRS, wds=study.WDS)
  assert set(narrow.values()) == {(0.003, 0.5)}
  for rows, choice in ((final, chosen), (first, narrow)):
    assert len(rows) == 54
    assert all((float(r["lr"]), float(r["wd"])) == choice[r["family"]] for r in rows)
    assert all(r["eval_split"] == study.VAL and r["test_accuracy"] for r in rows)
  # Seed 0 at size S on 1k and 7k is the selection's run of the chosen pair, run again (another
  # process, another core, the compilation cache warm): the same validation top-1 to every digit.
  final = {r["name"]: r for r in final}
  by_pair = {(r["family"], float(r["lr"]), float(r["wd"]), r["train_size"]): r["accuracy"]
             for r in selection}
  for model, family in study.FAMILIES.items():
    for n in study.SELECT_SIZES:
      assert final[f"{model}S_n{n}_s0"]["accuracy"] == by_pair[(family, *chosen[family], str(n))]


def test_fmnist_data_scaling_final_points_use_the_choice_and_test_once(tmp_path):
  import csv
  best = {"ResNet": (0.003, 0.05), "ViT": (0.001, 0.5), "Hybrid": (0.003, 0.5)}
  rows = _selection_rows(best)
  with open(tmp_path / "results.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with pytest.raises(ValueError, match="select_from"):
    sweep.load_experiment(f"{STUDY}:phase=final")
  s = sweep.load_experiment(f"{STUDY}:phase=final,select_from={tmp_path}")
  assert len(s.points) == 3 * 3 * 3 * 2  # families x sizes x seeds x model sizes
  assert [p.tags["seed"] for p in s.points[:18]] == [0] * 18  # seed-major
  assert {p.tags["model_size"] for p in s.points[:18]} == {"XS", "S"}
  p = {q.name: q for q in s.points}["hybridS_n54000_s2"]
  assert p.tags["model"] == "R+ViT-Mu/7 (S)" and p.tags["budget_examples"] == 108000
  c = sweep.build_config(p)
  assert (c.lr.base, c.wd, c.seed) == (0.003, 0.5, 2)
  assert (c.eval_split, c.test_split, c.fewshot.test_split) == (
      "train[54000:]", "test", "test")
  assert (c.model.hidden_size, c.model.resnet["base_width"]) == (64, 8)
  assert c.fewshot.shots == (1, 5, 10, 25) and c.fewshot.train_split == "train[:1000]"
  d = lambda k: optim.durations(c, k, steps_per_epoch=math.ceil(54000 / 128), batch_size=128)
  assert d("total") == 844  # 2 epochs
  r = sweep.build_config({q.name: q for q in s.points}["resnetXS_n1000_s0"])
  assert (r.model.base_width, r.model.gn_groups, r.model.num_layers) == (3, 3, (2, 2, 2))


def test_paper_scale_points_build():
  s = sweep.load_experiment("experiments/paper_scale.py")
  names = [p.name for p in s.points]
  assert "imagenet21k_n1281167_ViT-B_16_s0" in names and "imagenet1k_ViT-H_14_s0" in names
  for p in s.points:
    c = sweep.build_config(p)
    assert c.model_name == p.tags["model"]


def test_fmnist_distill_students_share_everything_but_the_teacher(tmp_path):
  t = sweep.load_experiment("experiments/fmnist_distill.py:phase=teacher")
  assert [p.name for p in t.points] == ["teacher_n6000_s0", "teacher_n20000_s0",
                                        "teacher_n54000_s0"]
  assert all(sweep.build_config(p).export_npz for p in t.points)  # the students load params.npz
  with pytest.raises(ValueError, match="teachers=DIR"):
    sweep.load_experiment("experiments/fmnist_distill.py:phase=student")
  s = sweep.load_experiment(f"experiments/fmnist_distill.py:phase=student,teachers={tmp_path}")
  by = {p.name: sweep.build_config(p) for p in s.points}
  assert len(by) == 3 * 3
  vit, token, dist = by["vit_n20000_s0"], by["dist_token_n20000_s0"], by["distilled_n20000_s0"]
  assert (vit.model_name, token.model_name, dist.model_name) == (
      "DeiT-Mu/7", "DeiT-Mu/7-distilled", "DeiT-Mu/7-distilled")
  assert (vit.distill.teacher, token.distill.teacher) == ("", "")
  assert dist.distill.teacher == str(tmp_path / "points" / "teacher_n20000_s0")
  for c in (vit, token, dist):  # equal budgets, data, widths and recipe
    assert (c.total_epochs, c.train_split, c.eval_split, c.test_split, c.lr.base, c.wd,
            c.model.hidden_size) == (
        dist.total_epochs, "train[:54000]@seeded(20000, seed=0)", "train[54000:]", "test",
        dist.lr.base, dist.wd, 64)
  d = optim.durations(dist, "total", steps_per_epoch=math.ceil(20000 / 128), batch_size=128)
  assert d == 500  # the study's 64,000-example floor
