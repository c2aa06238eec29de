"""The attention comparison's models are matched in FLOPs, its recipe is chosen on validation
rows only, and its final phase runs the chosen recipe per model and seed, with the test split."""
import csv

import pytest

from experiments import attention_comparison as ac
from experiments import sweep


def test_models_have_the_documented_forward_flops():
  flops = {m: round(ac.forward_mflops(m), 2) for m in ac.MODELS}
  assert flops == {"vit_learn": 9.93, "vit_relbias": 9.93, "vit_rope": 9.93, "resnet": 9.86,
                   "sasa": 9.27, "axial": 9.63}
  assert max(flops.values()) / min(flops.values()) < 1.08


def test_points_are_the_named_models_on_54k_with_validation():
  s = ac.get_sweep("phase=select")
  assert len(s.points) == 6 * 2  # six models x two recipes
  p = next(p for p in s.points if p.name == "axial_resnet_recipe")
  config = sweep.build_config(p)
  assert config.model_name == "Axial-ResNet-S" and config.model.base_width == 3
  assert config.eval_split == ac.VAL and config.test_split == ""
  assert (config.lr.base, config.wd) == ac.RECIPES["resnet"]
  assert config.train_split == "train[:54000]@seeded(54000, seed=0)"
  assert config.total_epochs * 54000 == pytest.approx(54000, abs=config.batch_size)
  vit = sweep.build_config(next(p for p in s.points if p.name == "vit_learn_vit_recipe"))
  assert vit.model.posemb == "learn" and vit.model.hidden_size == 64


def _rows(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_final_runs_the_recipe_with_the_best_validation_accuracy(tmp_path):
  rows = [dict(name=f"{m}_{r}_recipe", arch=m, lr=lr, wd=wd, eval_split=ac.VAL, accuracy=acc)
          for m in ac.MODELS if m != "axial"
          for (r, (lr, wd)), acc in zip(ac.RECIPES.items(), (0.8, 0.7) if "vit" in m
                                        else (0.6, 0.9))]
  _rows(tmp_path / "results.csv", rows)
  s = ac.get_sweep(f"phase=final,select_from={tmp_path},models=vit_learn/vit_relbias/vit_rope/"
                   "resnet/sasa")
  assert [p.name for p in s.points[:5]] == [f"{m}_seed0" for m in ac.MODELS if m != "axial"]
  assert len(s.points) == 15
  by_name = {p.name: sweep.build_config(p) for p in s.points}
  assert (by_name["vit_rope_seed2"].lr.base, by_name["vit_rope_seed2"].wd) == ac.RECIPES["vit"]
  assert (by_name["sasa_seed1"].lr.base, by_name["sasa_seed1"].wd) == ac.RECIPES["resnet"]
  assert by_name["sasa_seed1"].seed == 1 and by_name["sasa_seed1"].test_split == "test"
  with pytest.raises(ValueError, match="phase=final needs select_from=DIR"):
    ac.get_sweep("phase=final")
  with pytest.raises(ValueError, match="has no finished run of \\['axial'\\]"):
    ac.get_sweep(f"phase=final,select_from={tmp_path}")  # every model by default
  rows[0]["eval_split"] = "test"
  _rows(tmp_path / "results.csv", rows)
  with pytest.raises(ValueError, match="not on the validation split"):
    ac.get_sweep(f"phase=final,select_from={tmp_path},models=sasa")
