"""The TPU-plan table: rows from the planner's JSON, resumed from what is already there."""
import json
import os

from experiments import tpu_plans

PLAN = dict(topology="v5e:2x2", mode="jit", devices=4, mesh=dict(data=4, fsdp=1, model=1),
            batch_size=64, hbm_bytes=16 * 2 ** 30, fits=True,
            train=dict(total_bytes=3 * 2 ** 30, dot_flops=2.5e12,
                       collectives={"all-reduce": dict(count=13, bytes=2 ** 29, wire_bytes=1)}),
            roofline=dict(step_s=0.05, compute_s=0.04, hbm_s=0.05, ici_s=0.01,
                          images_per_s_per_chip=320.0, mfu_ceiling=0.8))


def test_tables_from_rows():
  fit = dict(name="ViT-B/16", command="python -m vit_jax.plan --topology=v5e:2x2", plan=PLAN)
  no = dict(name="ViT-H/14", command="python -m vit_jax.plan --topology=v5e:2x2",
            error="does not fit: ...")
  rows = tpu_plans.table([fit, no]).splitlines()
  assert rows[2] == ("| ViT-B/16 | v5e:2x2 | 4 | data 4 x fsdp 1 | 16 | 3.00 (16) | yes | 2.50 | "
                     "all-reduce x13 (0.50 GiB) | 50 | 320 | 80% | "
                     "`python -m vit_jax.plan --topology=v5e:2x2` |")
  assert rows[3].startswith("| ViT-H/14 | v5e:2x2 | | | | | no: does not fit: ... |")
  assert tpu_plans.mfu_table([fit, no]).splitlines()[2] == "| ViT-B/16 | v5e:2x2 | 50 | 320 | HBM | 80% |"


def test_a_planned_row_is_not_planned_again(tmp_path):
  row = dict(name="x", command="c", returncode=0, seconds=1.0, error=None, plan=PLAN)
  path = tmp_path / (tpu_plans.slug("x", "v5e:2x2", ()) + ".json")
  path.write_text(json.dumps(row))
  assert tpu_plans.run_row(str(tmp_path), "x", "no such config", "v5e:2x2", ()) == row
  assert os.listdir(tmp_path) == [path.name]
