"""Smoke tests of the benchmark scripts (tiny model, one round) and of the measuring helpers.

No timing is asserted: only that each script runs and prints the JSON it documents.
"""
import json
import os

import pytest

from benchmarks import ablations
from benchmarks import compile_time
from benchmarks import harness
from benchmarks import input_pipeline
from benchmarks import sasa_attention
from benchmarks import throughput
from vit_jax import checkpoint

TINY = ["--image_size=28"]


@pytest.fixture(autouse=True)
def keep_the_compilation_cache():
  """The scripts turn JAX's persistent compilation cache off for honest compile times; turn it
  back on for the tests that follow (the quick suite took 23 minutes without it)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_enable_compilation_cache
  yield
  jax.config.update("jax_enable_compilation_cache", before)
  compilation_cache.reset_cache()  # JAX remembers "cache off" until reset


def records(capsys):
  lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
  return [json.loads(l) for l in lines]


# ----------------------------------------------------------------------------------- harness.
def test_interleave_takes_turns_and_closes_with_the_first():
  calls = []
  times = harness.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             2, close_with="a")
  assert calls == ["a", "b", "a", "b", "a"]
  assert [len(times["a"]), len(times["b"])] == [3, 2]
  with pytest.raises(ValueError, match="rounds"):
    harness.interleave({"a": lambda: None}, 0)


def test_parse_ints_names_the_flag():
  assert harness.parse_ints("8, 16", "--batch_sizes") == [8, 16]
  with pytest.raises(ValueError, match="--batch_sizes"):
    harness.parse_ints("8,x", "--batch_sizes")
  with pytest.raises(ValueError, match="positive"):
    harness.parse_ints("0", "--batch_sizes")
  assert harness.parse_ints("0,4", "--blocks", minimum=0) == [0, 4]
  with pytest.raises(ValueError, match="--blocks must be integers >= 0"):
    harness.parse_ints("-1", "--blocks", minimum=0)


def test_matmul_peak_rates_follow_from_the_timings():
  peak = harness.MatmulPeak(sizes=(64, 128), seconds=0.0)
  peak()
  peak.seconds = {64: [2 * 64 ** 3 / 1e9], 128: [2 * 128 ** 3 / 2e9]}  # 1 and 2 GFLOP/s
  assert peak.gflops(64) == pytest.approx([1.0])
  assert peak.peak_gflops() == pytest.approx(2.0)
  assert peak.summary()["median_gflops_by_size"] == {64: 1.0, 128: 2.0}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_sees_an_allocation():
  import numpy as np
  with harness.PeakMemory() as mem:
    block = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, touched
    block[::512] += 1
  del block
  assert mem.summary()["delta_rss_mb"] >= 60


# ----------------------------------------------------------------------------------- scripts.
def test_throughput_train_prints_the_documented_fields(capsys):
  throughput.main(["--models=ViT-Mu/7", "--batch_sizes=2", "--rounds=1", "--no-torch",
                   "--matmul_seconds=0", "--matmul_sizes=128"] + TINY)
  env, rec = records(capsys)
  assert env["benchmark"] == "environment" and env["cpu_threads"] >= 1
  assert rec["benchmark"] == "train_throughput" and rec["model"] == "ViT-Mu/7"
  assert rec["model_overrides"] == {"scan": True, "remat_policy": "dots_saveable"}
  jax_rec = rec["jax"]
  assert len(jax_rec["step_s"]) == 2  # one round, then ours closes
  for key in ("img_per_s", "lower_s", "compile_s", "first_run_s", "flops_per_step", "mfu",
              "memory"):
    assert jax_rec[key] is not None, key
  assert jax_rec["img_per_s"] == pytest.approx(2 / jax_rec["step_s_median"], rel=1e-2)
  assert rec["matmul_peak"]["peak_gflops"] > 0
  assert "torch" not in rec


@pytest.mark.slow  # imports torch and transformers
def test_throughput_bfloat16_runs_both_sides_in_mixed_precision(capsys):
  """--dtype=bfloat16: our model with dtype=bfloat16, torch under autocast, a bf16 -> f32 peak."""
  pytest.importorskip("transformers")
  throughput.main(["--models=ViT-Mu/7", "--batch_sizes=2", "--rounds=1", "--dtype=bfloat16",
                   "--matmul_seconds=0", "--matmul_sizes=128"] + TINY)
  rec = records(capsys)[1]
  assert rec["dtype"] == "bfloat16" and rec["model_overrides"]["dtype"] == "bfloat16"
  assert rec["matmul_peak"]["dtype"] == "bfloat16"
  assert rec["matmul_peak"]["out_dtype"] == "float32"
  assert rec["jax"]["mfu"] > 0 and rec["torch"]["img_per_s"] > 0


@pytest.mark.slow  # compiles several steps: `make test-all` (the quick suite keeps one smoke test per script family)
def test_throughput_counts_unrolled_flops_for_a_scanned_model(capsys):
  """XLA counts a scanned body once; the script must report the unrolled model's FLOPs."""
  throughput.main(["--models=ViT-Mu/7", "--batch_sizes=2", "--rounds=1", "--no-torch",
                   "--mode=inference", "--matmul_seconds=0", "--matmul_sizes=128"] + TINY)
  scanned = records(capsys)[1]["jax"]["flops_per_step"]
  throughput.main(["--models=ViT-Mu/7", "--batch_sizes=2", "--rounds=1", "--no-torch",
                   "--mode=inference", "--no-fast", "--matmul_seconds=0", "--matmul_sizes=128"] + TINY)
  unrolled = records(capsys)[1]["jax"]["flops_per_step"]
  assert scanned == pytest.approx(unrolled, rel=1e-6)
  # ViT-Mu/7 at 28 px: 17 tokens, 6 blocks of width 128 (MLP 512); the matmuls alone are
  # 2 * (patches 16*49*128 + 6 * 17 * (4*128*128 + 2*128*512) + attention 6*2*17*17*128) per image.
  matmuls = 2 * (16 * 49 * 128 + 6 * 17 * (4 * 128 ** 2 + 2 * 128 * 512) + 6 * 2 * 17 ** 2 * 128)
  assert 2 * matmuls <= unrolled <= 2 * matmuls * 1.1


@pytest.mark.slow  # imports torch and transformers: ~15 s here
def test_throughput_with_torch_reports_a_ratio(capsys):
  """The torch side builds the same network: same parameter count as ours."""
  pytest.importorskip("transformers")
  import jax
  import jax.numpy as jnp
  from vit_jax import models
  throughput.main(["--models=ViT-Mu/7", "--batch_sizes=2", "--rounds=1",
                   "--matmul_seconds=0", "--matmul_sizes=128"] + TINY)
  rec = records(capsys)[1]
  model = models.get_model("ViT-Mu/7", num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3))))
  assert rec["torch"]["params"] == sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  assert rec["torch"]["threads"] == harness.cpu_threads()
  assert rec["speedup_jax_over_torch"] == pytest.approx(
      rec["torch"]["step_s_median"] / rec["jax"]["step_s_median"], rel=1e-2)


@pytest.mark.slow  # compiles several steps: `make test-all` (the quick suite keeps one smoke test per script family)
def test_compile_time_prints_each_layout_and_a_summary(capsys):
  compile_time.main(["--models=ViT-Mu/7", "--layouts=scan,unrolled", "--batch=2"] + TINY)
  recs = records(capsys)
  layouts = {r["layout"]: r for r in recs if r["benchmark"] == "compile_time"}
  assert set(layouts) == {"scan", "unrolled"}
  for r in layouts.values():
    assert r["total_s"] == pytest.approx(r["lower_s"] + r["compile_s"], abs=2e-3)
    assert r["num_layers"] == 6
  summary = recs[-1]
  assert summary["benchmark"] == "compile_time_summary"
  assert set(summary["unrolled_over_scan"]) == {"ViT-Mu/7"}
  with pytest.raises(ValueError, match="layouts"):
    compile_time.main(["--models=ViT-Mu/7", "--layouts=rolled"])


@pytest.mark.slow  # compiles two train steps and four kernels: ~15 s here
def test_ablations_step_and_kernel_variants(capsys):
  ablations.main(["--model=ViT-Mu/7", "--batch=2", "--rounds=1", "--matmul_seconds=0", "--matmul_sizes=128",
                  "--variants=scan,no_donation,attention,gelu"] + TINY)
  recs = {r.get("variant"): r for r in records(capsys) if r["benchmark"] == "ablation"}
  assert set(recs) == {"scan", "no_donation", "attention:fused", "attention:explicit",
                       "gelu:tanh", "gelu:erf"}
  assert recs["scan"]["speed_vs_first"] == 1.0
  assert recs["no_donation"]["donate"] is False
  with pytest.raises(ValueError, match="Unknown variant"):
    ablations.step_variant("ViT-Mu/7", 2, "turbo")


def test_ablations_matmul_dtypes_times_the_four_precision_paths(capsys):
  ablations.main(["--model=ViT-Mu/7", "--batch=2", "--kernel_rounds=1",
                  "--variants=matmul_dtypes"] + TINY)
  recs = {r["variant"]: r for r in records(capsys) if r["benchmark"] == "ablation"}
  assert set(recs) == {f"matmul_dtypes:{k}" for k in (
      "f32", "bf16_out_bf16", "bf16_out_f32_autodiff", "bf16_out_f32_mixed_einsum")}
  assert all(r["median_s"] > 0 for r in recs.values())


@pytest.mark.slow  # compiles several steps: `make test-all` (the quick suite keeps one smoke test per script family)
def test_input_pipeline_compares_real_and_synthetic(capsys):
  if not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"):
    pytest.skip("needs Debian's dataset-fashion-mnist")
  input_pipeline.main(["--steps=1", "--rounds=1", "--batch_size=8"])
  rec = records(capsys)[-1]
  assert rec["benchmark"] == "input_pipeline" and rec["batch"] == 8
  assert rec["overhead"] == pytest.approx(rec["real_step_s"] / rec["synthetic_step_s"] - 1,
                                          abs=1e-3)


def test_input_pipeline_imagenet_like_compares_decode_and_crop(capsys):
  input_pipeline.main(["--mode=imagenet_like", "--images=6", "--batches=1", "--rounds=1",
                       "--batch_size=2", "--pp=decode|inception_crop(16)|value_range(-1, 1)"])
  rec = records(capsys)[-1]
  assert rec["benchmark"] == "input_pipeline_imagenet_like" and rec["batch"] == 2
  assert rec["files"]["images"] == 6 and set(rec["img_per_s"]) == {"decode_and_crop",
                                                                    "decode_then_crop"}
  assert rec["speedup"] == pytest.approx(
      rec["img_per_s"]["decode_and_crop"] / rec["img_per_s"]["decode_then_crop"], rel=0.01)


def test_report_tables_from_records(tmp_path, capsys):
  from benchmarks import report
  path = tmp_path / "r.jsonl"
  recs = [
      dict(benchmark="environment", backend="cpu"),
      dict(benchmark="train_throughput", model="ViT-B/16", batch=8,
           jax=dict(img_per_s=3.0, mfu=0.7, compile_s=1.25, memory=dict(peak_rss_mb=900.0)),
           torch=dict(img_per_s=2.0, memory=dict(peak_rss_mb=1200.0)),
           speedup_jax_over_torch=1.5, matmul_peak=dict(peak_gflops=150.0)),
      dict(benchmark="compile_time", model="ViT-H/14", layout="scan", num_layers=32, total_s=2.0),
      dict(benchmark="compile_time", model="ViT-H/14", layout="unrolled", num_layers=32,
           total_s=9.0),
      dict(benchmark="input_pipeline", config="fashion_mnist.py:hybrid", batch=128,
           synthetic_step_s=0.2, real_step_s=0.21, overhead=0.05),
  ]
  path.write_text("not json\n" + "\n".join(json.dumps(r) for r in recs) + "\n")
  report.main([str(path)])
  out = capsys.readouterr().out
  assert "| train | ViT-B/16 | 8 | 3.00 | 2.00 | 1.50x | 70% | 150 | 1.2 | 900 | 1200 |" in out
  assert "| ViT-H/14 | 32 | 2.00 | 9.00 | 4.5x |" in out
  assert "| fashion_mnist.py:hybrid | 128 | 200.0 | 210.0 | +5.0% |" in out
  assert "Ablations" not in out  # no records, no table


def test_replicated_save_compares_sliced_and_whole_saves(capsys):
  from benchmarks import replicated_save  # pylint: disable=g-import-not-at-top
  replicated_save.main(["--rounds=1", "--arrays=3", "--floats=64"])
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  saves = {r["contender"]: r for r in rows if "contender" in r}
  assert set(saves) == {"sliced", "whole"}
  assert saves["whole"]["min_slice_bytes"] == checkpoint.MIN_REPLICA_SLICE_BYTES
  assert all(r["devices"] == 8 and len(r["rounds_s"]) == 1 and r["save_s"] > 0
             for r in saves.values())


def test_sasa_attention_compares_windowed_and_blocked_steps(capsys):
  sasa_attention.main(["--blocks=0,4", "--batch=2", "--rounds=1", "--num_layers=1",
                       "--image_size=8"])
  out = capsys.readouterr().out
  records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  assert [r["contender"] for r in records] == ["query_block=0", "query_block=4"]
  assert records[0]["ratio_to_first"] == 1.0 and len(records[0]["rounds"]) == 2  # A, B, A
  assert records[1]["seconds_per_step"] > 0 and "| query_block=4 |" in out
  assert records[1]["num_layers"] == [1] and records[1]["image_size"] == 8
  with pytest.raises(ValueError, match="--blocks"):
    sasa_attention.main(["--blocks=-1"])
