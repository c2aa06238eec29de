r"""What each speed choice is worth, measured side by side in one process; one JSON line per
variant.

  python -m benchmarks.ablations --model=ViT-B/16 --batch=8 --variants=scan,unrolled,bf16
  python -m benchmarks.ablations --variants=attention,gelu        # kernels alone, ViT-B/16 shapes

Train-step variants (the trainer's step, as in `throughput.py`; compiled one after the other,
then timed in turns with the matmul probe; `speed_vs_first` compares each with the first listed).
A variant is '+'-joined tokens, e.g. `scan+remat:dots_saveable+fast_compile`:
  scan            scanned layers (also implied when `unrolled` is absent)
  unrolled        one module per layer (the published layout)
  remat:<policy>  `remat_policy` (nothing_saveable, dots_saveable,
                  dots_with_no_batch_dims_saveable, everything_saveable)
  bf16            `dtype=bfloat16` (parameters and optimizer state stay float32)
  no_donation     the state is not donated
  fast_compile    compiled with `xla_cpu_use_fusion_emitters=False` (XLA:CPU's older emitters)
  opt0            compiled with `xla_backend_optimization_level=0` (no LLVM optimisation)
Kernel variants (forward + backward of one op at the model's shapes, alone):
  attention       `jax.nn.dot_product_attention` against einsum-softmax-einsum
  gelu            tanh approximation against the exact erf form
  matmul_dtypes   the MLP's first matmul (tokens x D @ D x mlp_dim): f32; bf16 -> bf16; bf16 -> f32
                  with JAX's own transpose (f32 x bf16 backward dots); bf16 -> f32 through
                  `layers.mixed_einsum` (bf16 x bf16 -> f32 backward dots, the bf16 policy)
  conv1x1         a 1x1 convolution at the Fashion-MNIST ResNet's shapes (batch x 28 x 28,
                  16 -> 64 and 64 -> 16 channels; --model is ignored): `lax.conv_general_dilated`
                  against `layers.conv_general_dilated` (the same contraction as a dot)
"""
import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks import harness
from benchmarks import jax_side
from vit_jax import models
from vit_jax.models import layers

FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}
OPT0 = {"xla_backend_optimization_level": 0}
STEP_VARIANTS = ("scan", "unrolled", "bf16", "no_donation", "fast_compile", "opt0")
KERNEL_VARIANTS = ("attention", "gelu", "matmul_dtypes", "conv1x1")


def step_variant(name: str, batch: int, variant: str):
  """(JaxStep, description) for a train-step variant: '+'-joined tokens, e.g.
  'scan+remat:dots_saveable+fast_compile'. Without 'unrolled' the layers are scanned."""
  overrides, options, donate = dict(scan=True), {}, True
  for token in variant.split("+"):
    if token == "unrolled":
      overrides["scan"] = False
    elif token.startswith("remat:"):
      overrides["remat_policy"] = token.split(":", 1)[1]
    elif token == "bf16":
      overrides["dtype"] = "bfloat16"
    elif token == "no_donation":
      donate = False
    elif token == "fast_compile":
      options.update(FAST_COMPILE)
    elif token == "opt0":
      options.update(OPT0)
    elif token != "scan":
      raise ValueError(f"Unknown variant {token!r} in {variant!r}; known: "
                       f"{', '.join(STEP_VARIANTS)}, remat:<policy> (joined with '+'), or the "
                       f"kernels {', '.join(KERNEL_VARIANTS)}.")
  step = jax_side.JaxStep(jax_side.make_config(name, batch, overrides),
                          compiler_options=options, donate=donate)
  return step, dict(model_overrides=overrides, compiler_options=options, donate=donate)


def kernel_fns(name: str, batch: int, variant: str, image_size: int) -> dict:
  """{label: compiled fwd+bwd closure} for a kernel variant at the model's token shapes."""
  if variant == "conv1x1":
    return _conv1x1_fns(batch)
  m = models.get_model(name, num_classes=1000)
  tokens = (image_size // m.patch_size[0]) * (image_size // m.patch_size[1]) + 1
  heads, d = m.num_heads, m.hidden_size // m.num_heads
  key = jax.random.PRNGKey(0)
  if variant == "attention":
    q, k, v = (jax.random.normal(kk, (batch, tokens, heads, d)) for kk in jax.random.split(key, 3))

    def explicit(q, k, v):
      w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(q.dtype), -1)
      return jnp.einsum("bhqk,bkhd->bqhd", w, v)
    impls = {"fused": jax.nn.dot_product_attention, "explicit": explicit}
    args = (q, k, v)
  elif variant == "gelu":
    x = jax.random.normal(key, (batch, tokens, m.mlp_dim))
    impls = {"tanh": lambda x: jax.nn.gelu(x, approximate=True),
             "erf": lambda x: jax.nn.gelu(x, approximate=False)}
    args = (x,)
  elif variant == "matmul_dtypes":
    x = jax.random.normal(key, (batch * tokens, m.hidden_size))
    w = jax.random.normal(jax.random.PRNGKey(1), (m.hidden_size, m.mlp_dim)) * 0.03
    bf = lambda t: t.astype(jnp.bfloat16)
    impls = {
        "f32": jnp.dot,
        "bf16_out_bf16": lambda x, w: (bf(x) @ bf(w)).astype(jnp.float32),
        "bf16_out_f32_autodiff": lambda x, w: jnp.dot(bf(x), bf(w),
                                                      preferred_element_type=jnp.float32),
        "bf16_out_f32_mixed_einsum": lambda x, w: layers.mixed_einsum("mk,kn->mn", x, w),
    }
    args = (x, w)
  else:
    raise ValueError(f"Unknown kernel variant {variant!r}; known: {', '.join(KERNEL_VARIANTS)}.")
  return _grad_fns(variant, impls, args)


def _conv1x1_fns(batch: int) -> dict:
  fns = {}
  for cin, cout in ((16, 64), (64, 16)):
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 28, 28, cin))
    w = jax.random.normal(jax.random.PRNGKey(1), (1, 1, cin, cout)) * 0.1
    impls = {name: lambda x, w, conv=conv: conv(x, w, (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
             for name, conv in (("lax", jax.lax.conv_general_dilated),
                                ("dot", layers.conv_general_dilated))}
    fns.update(_grad_fns(f"conv1x1_{cin}to{cout}", impls, (x, w)))
  return fns


def _grad_fns(variant: str, impls: dict, args) -> dict:
  fns = {}
  for label, f in impls.items():
    grad = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=tuple(range(len(args)))))
    jax.block_until_ready(grad(*args))
    fns[f"{variant}:{label}"] = lambda grad=grad: jax.block_until_ready(grad(*args))
  return fns


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="ViT-B/16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--variants", default="scan,unrolled,bf16,fast_compile,attention,gelu")
  p.add_argument("--matmul_seconds", type=float, default=1.0,
                 help="how long each matmul-probe call runs per size")
  p.add_argument("--matmul_sizes", default="1024,2048", help="square sizes of the matmul probe")
  p.add_argument("--rounds", type=int, default=3, help="turns of the train-step variants")
  p.add_argument("--kernel_rounds", type=int, default=15, help="turns of the kernel variants")
  args = p.parse_args(argv)
  harness.disable_compilation_cache()
  harness.emit(dict(benchmark="environment", **harness.environment()))
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  fns, kernels, info, steps = {}, {}, {}, {}
  for v in variants:
    if v in KERNEL_VARIANTS:
      kernels.update(kernel_fns(args.model, args.batch, v, args.image_size))
      continue
    with harness.PeakMemory() as mem:
      step, desc = step_variant(args.model, args.batch, v)
      step.compile()
      step.materialize()
    fns[v], steps[v] = step, step
    info[v] = dict(desc, lower_s=round(step.lower_s, 3), compile_s=round(step.compile_s, 3),
                   memory=dict(mem.summary(), **harness.xla_memory(step.compiled)))
  flops = peak = None
  times = {}
  if steps:
    flops = next(iter(steps.values())).flops()
    peak = harness.MatmulPeak(harness.parse_ints(args.matmul_sizes, "--matmul_sizes"),
                              seconds=args.matmul_seconds)
    fns["matmul"] = peak
    times = harness.interleave(fns, args.rounds)
  if kernels:  # Short calls: many more turns, among themselves.
    times.update(harness.interleave(kernels, args.kernel_rounds))
  ref = next(iter(steps), None)  # the first step variant listed
  for label, ts in times.items():
    if label == "matmul":
      continue
    s = harness.median(ts)
    rec = dict(benchmark="ablation", model=args.model, batch=args.batch, variant=label,
               median_s=round(s, 4), times_s=[round(t, 4) for t in ts], **info.get(label, {}))
    if label in steps:
      rec["img_per_s"] = round(args.batch / s, 3)
      if flops:
        rec["mfu"] = round(flops / s / 1e9 / peak.peak_gflops(), 4)
      if ref:
        rec["speed_vs_first"] = round(harness.median(times[ref]) / s, 3)
    harness.emit(rec)
  harness.emit(dict(benchmark="ablation_summary",
                    matmul_peak=peak.summary() if peak else None,
                    flops_per_step=flops, load_average=harness.load_average()))


if __name__ == "__main__":
  main(sys.argv[1:])
