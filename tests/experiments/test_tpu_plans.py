"""The TPU-plan table: rows from the planner's JSON, resumed from what is already there."""
import json
import os

from experiments import tpu_plans

# 16 images per chip on a chip of 100 TFLOP/s, 100 GB/s HBM and 1 GB/s ICI: 2 TFLOPs take
# 20 ms, 4 GB of least traffic 40 ms, 10 MB of ring traffic 10 ms; the model does 3 x 40 G per
# image = 1.92 TFLOPs: 1.92 / (0.04 x 100) = 48% MFU at most.
CHIP = dict(name="test chip", hbm_bytes=16 * 2 ** 30, bf16_flops=100e12, hbm_bandwidth=100e9,
            ici_bandwidth=1e9, source="")
PLAN = dict(topology="v5e:2x2", mode="jit", devices=4, mesh=dict(data=4, fsdp=1, model=1),
            batch_size=64, hbm_bytes=16 * 2 ** 30, fits=True, chip=CHIP,
            forward_flops_per_image=40e9,
            train=dict(total_bytes=3 * 2 ** 30, dot_flops=2e12, argument_bytes=1e9,
                       output_bytes=1e9, temp_bytes=1e9,
                       collectives={"all-reduce": dict(count=13, bytes=2 ** 29, wire_bytes=1e7)}))


def test_tables_from_rows():
  fit = dict(name="ViT-B/16", command="python -m vit_jax.plan --topology=v5e:2x2", plan=PLAN)
  no = dict(name="ViT-H/14", command="python -m vit_jax.plan --topology=v5e:2x2",
            error="does not fit: ... HLO temporaries (19.19G) exceeds available HBM (15.75G). Try")
  rows = tpu_plans.table([fit, no]).splitlines()
  assert rows[2] == ("| ViT-B/16 | v5e:2x2 | 4 | data 4 x fsdp 1 | 16 | 3.00 (16) | yes | 2.00 | "
                     "all-reduce x13 (0.50 GiB) | 40 | 400 | 48% | "
                     "`python -m vit_jax.plan --topology=v5e:2x2` |")
  assert rows[3].startswith("| ViT-H/14 | v5e:2x2 | | | | | no: 19.19G of temporaries, 15.75G "
                            "available (the compiler) |")
  assert tpu_plans.mfu_table([fit, no]).splitlines()[2] == ("| ViT-B/16 | v5e:2x2 | 40 | 400 | "
                                                            "HBM | 48% |")


def test_a_planned_row_is_not_planned_again(tmp_path):
  row = dict(name="x", command="c", returncode=0, seconds=1.0, error=None, plan=PLAN)
  path = tmp_path / (tpu_plans.slug("x", "v5e:2x2", ()) + ".json")
  path.write_text(json.dumps(row))
  assert tpu_plans.run_row(str(tmp_path), "x", "no such config", "v5e:2x2", ()) == row
  assert os.listdir(tmp_path) == [path.name]
