"""The planner: the train step compiled by the real TPU compiler (libtpu) for pod slices that are
not attached, and what it reads off the executables."""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from tests.test_train import tiny_config
from vit_jax import plan

pytest.importorskip("libtpu", reason="the planner's TPU compiler: pip install -e '.[plan]'")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def mock_tfds():
  with tfds.testing.mock_data(num_examples=200):
    yield


@pytest.mark.parametrize("topology, kind", [("v5e:2x2", "TPU v5 lite"), ("v4:2x2x1", "TPU v4")])
def test_tiny_vit_compiles_for_tpu_slices(topology, kind):
  p = plan.plan(tiny_config(), topology)
  assert (p.num_devices, p.device_kind, p.mesh["data"]) == (4, kind, 4)
  assert p.image_shape == (28, 28, 1) and p.num_classes == 10  # from TFDS's mnist feature spec
  assert p.fits() is True and 0 < p.train.total_bytes < p.chip.hbm_bytes
  # The forward pass the eval step compiles is the analytic ViT count, to the FLOP.
  assert p.forward_flops_per_image == pytest.approx(p.analytic_forward_flops, rel=1e-9)
  # A train step is about 3 forwards (the patch embedding needs no input gradient: a bit less).
  assert 2.5 < p.train.dot_flops / p.per_chip_batch / p.forward_flops_per_image < 3.0
  assert set(p.train.collectives) == {"all-reduce"}  # data parallel: the gradients' mean
  r = p.roofline()
  assert r["step_s"] == max(r["compute_s"], r["hbm_s"], r["ici_s"] or 0) > 0
  assert "fits: yes" in plan.report(p)


def test_scanned_layers_count_every_trip():
  """XLA's cost_analysis counts a loop body once; the planner counts the scan's 3 layers."""
  scanned = plan.plan(tiny_config(model__scan=True, model__num_layers=3), "v5e:2x2")
  unrolled = plan.plan(tiny_config(model__num_layers=3), "v5e:2x2")
  assert scanned.train.dot_flops == pytest.approx(unrolled.train.dot_flops, rel=1e-9)
  assert scanned.forward_flops_per_image == pytest.approx(scanned.analytic_forward_flops,
                                                          rel=1e-9)
  assert scanned.train.xla_flops < 0.6 * unrolled.train.xla_flops  # what the planner corrects
  assert scanned.unknown_trip_counts == 0


def test_fsdp_over_four_chips_holds_a_third_of_the_arguments():
  # Wide enough that a quarter of a dimension still fills the TPU's 128-lane tiles (a smaller
  # shard is padded to them: width 64 held 78% of the replicated bytes).
  kw = dict(model__hidden_size=256, model__mlp_dim=1024, model__num_heads=2, model__num_layers=2)
  replicated = plan.plan(tiny_config(**kw), "v5e:2x2", compile_eval=False)
  fsdp = plan.plan(tiny_config(mesh__data=1, mesh__fsdp=-1, **kw), "v5e:2x2", compile_eval=False)
  assert fsdp.mesh["fsdp"] == 4
  assert fsdp.train.argument_bytes <= replicated.train.argument_bytes / 3



@pytest.mark.slow
def test_fsdp_gathers_weights_not_the_batch():
  """ViT-B/16 (the ImageNet recipe, batch 128) with FSDP over 16 v5e chips: each block's tokens
  are annotated (layers.TOKENS) and the trainer maps their batch axis to the devices, so XLA
  gathers the weights. Without that it gathered the whole batch onto every chip: 9.85 GiB of
  temporaries against 2.56 GiB now (data parallel: 2.85 GiB). One compile, ~30 s here."""
  from configs import imagenet_scratch
  c = imagenet_scratch.get_config("imagenet1k,ViT-B/16")
  c.batch_size = c.eval_batch_size = 128
  c.mesh.data, c.mesh.fsdp = 1, -1
  p = plan.plan(c, "v5e:4x4", compile_eval=False)
  assert p.train.temp_bytes < 4 * plan.GiB
  batch_gathers = [l for l in p.train.hlo.splitlines()
                   if re.search(r"all-gather(-start)?\(", l) and "128,197,768]" in l]
  assert not batch_gathers, batch_gathers[:2]


def test_grad_accumulation_gathers_no_images_on_tpu():
  """As on CPU devices (tests/test_train.py): strided micro-batches keep every example on its
  device, so the compiled TPU step's only collective is the gradients' all-reduce."""
  p = plan.plan(tiny_config(grad_accum_steps=2, batch_size=32, model__dropout_rate=0.1),
                "v5e:2x2", compile_eval=False)
  for op in ("all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert not re.search(op + r"(-start)?\(", p.train.hlo), op
  assert set(p.train.collectives) == {"all-reduce"}


def test_bf16_policy_compiles_to_bf16_dots_on_tpu():
  """model.dtype=bfloat16: every dot and convolution of the compiled TPU step multiplies bf16
  operands (accumulating in f32). The f32 model keeps f32 operands in many of them (at JAX's
  default precision the MXU rounds them to bf16 itself: 25 of 58 were f32 here)."""
  def operand_dtypes(p):
    comps, _ = plan.parse_hlo(p.train.hlo)
    dtypes = []
    for instrs in comps.values():
      shapes = {i.name: i.shape for i in instrs}
      dtypes += [shapes[o].split("[")[0] for i in instrs if i.op in ("convolution", "dot")
                 for o in i.operands]
    return dtypes
  f32 = operand_dtypes(plan.plan(tiny_config(), "v5e:2x2", compile_eval=False))
  bf16 = operand_dtypes(plan.plan(tiny_config(model__dtype="bfloat16"), "v5e:2x2",
                                  compile_eval=False))
  assert bf16 and set(bf16) == {"bf16"}
  assert f32.count("f32") >= len(f32) // 4


def test_pmap_compiles_for_a_topology():
  p = plan.plan(tiny_config(parallel="pmap"), "v5e:2x2")
  jit = plan.plan(tiny_config(), "v5e:2x2")
  assert p.mode == "pmap" and p.per_chip_batch == 4
  assert p.train.dot_flops == pytest.approx(jit.train.dot_flops, rel=1e-9)
  assert "all-reduce" in p.train.collectives


def test_a_config_that_cannot_fit_is_one_line_naming_what_to_try():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, "-m", "vit_jax.plan", "--config=configs/fashion_mnist.py:vit",
       "--topology=v5e:2x2", "--config.batch_size=1048576", "--noeval"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-2000:]
  errors = [l for l in run.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and run.stderr.strip().endswith(errors[0])
  assert re.search(r"error: does not fit: ViT-Mu/7, batch 1048576 on v5e:2x2: .*exceeds "
                   r"available HBM.* Try FSDP over more chips.*remat_policy=dots_saveable"
                   r".*grad_accum_steps.*smaller --config.batch_size", errors[0])


def test_bad_topology_and_detection_are_named():
  with pytest.raises(plan.PlanError, match="VERSION:SHAPE"):
    plan.plan(tiny_config(), "v5e-16")
  with pytest.raises(plan.PlanError, match="libtpu refused"):
    plan.plan(tiny_config(), "v5e:3x7")
  with pytest.raises(plan.PlanError, match="loss='detr' is not planned"):
    plan.plan(tiny_config(loss="detr"), "v5e:2x2")


# ------------------------------------------------------------------- the counters, on their own.
def test_jaxpr_flops_counts_scans_remat_and_convolutions():
  w = jnp.zeros((8, 16))

  def f(x):
    y, _ = jax.lax.scan(lambda c, _: (jax.checkpoint(jnp.tanh)(c @ w @ w.T), None), x, None,
                        length=5)
    k = jnp.zeros((3, 3, 1, 4))  # HWIO
    z = jax.lax.conv_general_dilated(y[None, :, :, None], k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return z.sum()
  jaxpr = jax.make_jaxpr(f)(jnp.zeros((2, 8)))
  matmuls = 5 * (2 * 2 * 8 * 16 + 2 * 2 * 16 * 8)
  conv = 2 * (1 * 2 * 8 * 4) * 9
  assert plan.jaxpr_flops(jaxpr) == matmuls + conv


HLO = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %r = f32[4]{0} all-reduce(%x), replica_groups={{0,1,2,3}}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4]{0}) tuple(%i, %r)
}

ENTRY %main (a: f32[4], b: bf16[2,8]) -> (s32[], f32[4]) {
  %a = f32[4]{0} parameter(0)
  %b = bf16[2,8]{1,0} parameter(1)
  %g = (f32[4]{0}, bf16[2,8]{1,0}) all-reduce(%a, %b), replica_groups=[2,2]<=[4], to_apply=%add
  %z = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%z, %a)
  ROOT %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
}
"""


def test_count_hlo_weights_loops_by_their_trip_count():
  counts = plan.count_hlo(HLO, num_devices=4)
  ar = counts.collectives["all-reduce"]
  assert ar["count"] == 1 + 7  # once in the entry, 7 times in the loop
  assert ar["bytes"] == (16 + 32) + 7 * 16  # a combined all-reduce is the sum of its tuple
  # Ring all-reduce: each device sends 2 (n - 1) / n of the buffer; groups of 2 and of 4.
  assert ar["wire_bytes"] == pytest.approx(48 * 2 * 1 / 2 + 7 * 16 * 2 * 3 / 4)
  assert counts.unknown_trip_counts == 0
