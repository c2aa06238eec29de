r"""Train-step or inference throughput, ours against Hugging Face transformers (PyTorch), one JSON
line per (model, batch size).

  python -m benchmarks.throughput --mode=train --models=ViT-B/16 --batch_sizes=8
  python -m benchmarks.throughput --mode=inference --models=ViT-Ti/16,Swin-T --batch_sizes=8,32

Per (model, batch): our step is compiled (lower and compile timed separately, nothing cached), run
once, then ours, torch's and the matmul probe take turns for `--rounds` rounds and ours closes
(ours, torch, ..., ours); each reports the median of its own turns. MFU is our achieved FLOP/s
(XLA's FLOP count of the unrolled step over the median step time) over the median FLOP/s of a
float32 `jnp.dot` (1024 and 2048 square, the faster) timed in the same turns. Memory: peak RSS
while each side builds, compiles and runs its first step, and XLA's planned buffer sizes.

`--dtype=bfloat16`: ours with `config.model.dtype="bfloat16"` (the mixed-precision policy of
`vit_jax/models/layers.py`: bf16 x bf16 -> f32 matmuls, f32 parameters, norms and loss), torch under
`torch.autocast("cpu", dtype=torch.bfloat16)`, and MFU against a bf16 x bf16 -> f32 `jnp.dot`.

  python -m benchmarks.throughput --dtype=bfloat16 --models=ViT-B/16 --batch_sizes=8
"""
import jax.numpy as jnp
import argparse
import json
import sys

import jax

from benchmarks import harness
from benchmarks import jax_side

DEFAULT_MODELS = "ViT-Ti/16,ViT-B/16,R50+ViT-B/16,Swin-T"


def fast_settings(name: str) -> dict:
  """Our fast settings for a model: for the ViTs (and hybrids) scanned layers, which compile in a
  time independent of depth, with `remat_policy="dots_saveable"`, which keeps only matmul outputs
  for the backward pass (faster on CPU than keeping everything, and less memory; see
  `ablations.py`). Swin has neither option."""
  return dict(scan=True, remat_policy="dots_saveable") if "ViT" in name else {}


def run_one(name: str, batch: int, args) -> dict:
  overrides = fast_settings(name) if args.fast else {}
  if args.dtype != "float32":
    overrides["dtype"] = args.dtype
  overrides.update(json.loads(args.model_overrides))
  config = jax_side.make_config(name, batch, overrides)
  rec = dict(benchmark=f"{args.mode}_throughput", model=name, batch=batch, dtype=args.dtype,
             image_size=args.image_size, model_overrides=overrides,
             compiler_options=json.loads(args.compiler_options), rounds=args.rounds,
             load_average_start=harness.load_average())

  with harness.PeakMemory() as mem:
    ours = jax_side.JaxStep(config, mode=args.mode, image_size=args.image_size,
                            compiler_options=rec["compiler_options"])
    ours.compile()
    ours.materialize()
  flops = ours.flops()
  fns = {"jax": ours}
  peak = harness.MatmulPeak(harness.parse_ints(args.matmul_sizes, "--matmul_sizes"),
                            dtype=jnp.dtype(args.dtype), seconds=args.matmul_seconds)
  use_torch = args.torch and jax.default_backend() == "cpu"
  if args.torch and not use_torch:  # torch here is a CPU build: no fair comparison on a GPU.
    rec["torch_skipped"] = f"ours runs on {jax.default_backend()}; torch compares on CPU only"
  if use_torch:
    from benchmarks import hf_torch  # pylint: disable=g-import-not-at-top
    threads = hf_torch.set_threads(harness.cpu_threads())
    with harness.PeakMemory() as tmem:
      torch_step, torch_params = hf_torch.make_step(
          name, batch, mode=args.mode, image_size=args.image_size,
          autocast_bf16=args.dtype == "bfloat16")
      torch_first = harness.time_call(torch_step)
    fns["torch"] = torch_step
  fns["matmul"] = peak
  times = harness.interleave(fns, args.rounds, close_with="jax")

  step_s = harness.median(times["jax"])
  mm = peak.summary()
  achieved = flops / step_s / 1e9 if flops else None
  rec["jax"] = dict(
      img_per_s=round(batch / step_s, 3), step_s_median=round(step_s, 4),
      step_s=[round(t, 4) for t in times["jax"]], lower_s=round(ours.lower_s, 3),
      compile_s=round(ours.compile_s, 3), first_run_s=round(ours.first_run_s, 3),
      flops_per_step=flops, flops_source="XLA cost_analysis of the unrolled step (lowered HLO)",
      achieved_gflops=round(achieved, 2) if achieved else None,
      mfu=round(achieved / mm["peak_gflops"], 4) if achieved else None,
      memory=dict(mem.summary(), **harness.xla_memory(ours.compiled)))
  rec["matmul_peak"] = mm
  if use_torch:
    t_s = harness.median(times["torch"])
    rec["torch"] = dict(
        img_per_s=round(batch / t_s, 3), step_s_median=round(t_s, 4),
        step_s=[round(t, 4) for t in times["torch"]], first_run_s=round(torch_first, 3),
        params=torch_params, threads=threads,
        achieved_gflops=round(flops / t_s / 1e9, 2) if flops else None,
        memory=tmem.summary(), **{k: v for k, v in hf_torch.versions().items()
                                  if k != "torch_threads"})
    rec["speedup_jax_over_torch"] = round(t_s / step_s, 3)
  rec["load_average_end"] = harness.load_average()
  return rec


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mode", default="train", choices=("train", "inference"))
  p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
  p.add_argument("--batch_sizes", default="8", help="comma-separated, e.g. 8,16")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="bfloat16: our mixed-precision policy, torch autocast, a bf16 matmul peak")
  p.add_argument("--matmul_seconds", type=float, default=1.0,
                 help="how long each matmul-probe call runs per size")
  p.add_argument("--matmul_sizes", default="1024,2048", help="square sizes of the matmul probe")
  p.add_argument("--rounds", type=int, default=3, help="timed turns per side")
  p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                 help="also time Hugging Face transformers (PyTorch) side by side")
  p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                 help="our fast settings (scan + dots_saveable remat for ViTs); --no-fast: the "
                      "model's plain defaults (unrolled layers)")
  p.add_argument("--model_overrides", default="{}",
                 help='JSON of model fields, e.g. \'{"remat_policy": "dots_saveable"}\'')
  p.add_argument("--compiler_options", default="{}",
                 help='JSON of XLA options for our compile, e.g. \'{"xla_cpu_...": true}\'')
  args = p.parse_args(argv)
  harness.disable_compilation_cache()
  harness.emit(dict(benchmark="environment", **harness.environment()))
  for name in [m.strip() for m in args.models.split(",") if m.strip()]:
    for batch in harness.parse_ints(args.batch_sizes, "--batch_sizes"):
      harness.emit(run_one(name, batch, args))


if __name__ == "__main__":
  main(sys.argv[1:])
