r"""Attention designs at matched FLOPs on Fashion-MNIST 54k: ViT with learned, 2-D relative
(BEiT-style bias) and rotary (2-D RoPE) positions, the stand-alone local-attention ResNet (SASA),
the Axial-ResNet, and the BiT ResNet they replace the convolutions of.

  python -m experiments.runner experiments/attention_comparison.py:phase=select \
      --out=workdirs/attn_select --no-plan --parallel=2 --pin
  python -m experiments.runner \
      experiments/attention_comparison.py:phase=final,select_from=workdirs/attn_select \
      --out=workdirs/attn_final --no-plan --parallel=2 --pin

Models (forward multiply-adds x 2 of the matrix multiplications and convolutions per 28x28x1
image, `vit_jax.plan.jaxpr_flops`; `python -m experiments.attention_comparison` prints them):
ViT-Mu/7 at the Fashion-MNIST study's size S (6 layers, width 64, MLP 256, 2 heads, average
pooled) 9.93 MFLOPs with any of the three position encodings; BiT ResNet (stages 2/2/2 on the 3x3
stride-1 root, width 7, 7 GroupNorm groups) 9.86; SASA-ResNet (stages 2/2/2, width 6, 2 heads,
7x7 windows) 9.27; Axial-ResNet (stages 1/1/1, width 3, 1 head, whole-axis span 28) 9.63. The
counts are asserted by tests/experiments/test_attention_comparison.py.

Data and budget: train on the first 54,000 training images (seeded order), 1 epoch (54,000
examples, 10% warm-up, cosine; the data-scaling study's 54k points had 2), batch 128,
validation on the last 6,000 training images; the test split once at the end of the final runs.

Recipe, chosen on the validation split (phase=select, seed 0): every family tries the two recipes
the data-scaling study selected on its own validation runs (experiments/fmnist_data_scaling.py:
ViT lr 3e-3 / wd 2, ResNet lr 3e-2 / wd 0.5); `choose` keeps the better validation accuracy per
family, and phase=final runs it with seeds 0, 1, 2 (seed-major).

Cost, measured by the runner's plan (`--plan`; experiments/cost.py) on this project's 2-core
Intel Xeon, seconds per training step of 128 images: ViT 0.07-0.08 (any position encoding),
BiT ResNet 0.29, Axial-ResNet 1.27. SASA-ResNet took 7.49 there with its windows computed as 49
shifted products per layer; by 4x4 query blocks (`sasa.LocalSelfAttention.query_block`, the
default) its step is 0.30x of that (`python -m benchmarks.sasa_attention`, AMD EPYC: 1.76 s
against 5.88 s), still the dearest of the six.

Arg (comma-separated key=value, lists joined by "/"): phase (select|final), select_from (the
selection's --out folder, phase=final), models, seeds, epochs (default 1).
"""
from typing import Dict, List, Mapping, Sequence, Tuple

from experiments import aggregate
from experiments import sweep

CONFIG = "configs/fashion_mnist.py"
TRAIN, VAL, TEST = "train[:54000]", "train[54000:]", "test"
N = 54000
RECIPES = {"vit": (3e-3, 2.0), "resnet": (3e-2, 0.5)}  # (lr, wd) of the data-scaling study
_VIT_S = {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2}
# name: (family label, config arg, model overrides merged into the config's model)
MODELS = {
    "vit_learn": ("ViT learned", "vit", dict(_VIT_S, posemb="learn")),
    "vit_relbias": ("ViT 2-D relative bias", "vit_relbias", dict(_VIT_S)),
    "vit_rope": ("ViT 2-D RoPE", "vit_rope", dict(_VIT_S)),
    "resnet": ("BiT ResNet", "resnet", {"base_width": 7, "gn_groups": 7}),
    # SASA trains by 4x4 query blocks against their 10x10 halo with the window masked in: its
    # FLOPs here count each pixel's 7x7 window (query_block=0), the computation does about
    # (10 / 7)**2 = 2x the attention's multiply-adds (18.7 MFLOPs in all).
    "sasa": ("SASA local attention", "sasa", {"num_layers": (2, 2, 2), "base_width": 6,
                                               "num_heads": 2}),
    "axial": ("Axial attention", "axial", {"num_layers": (1, 1, 1), "base_width": 3,
                                           "num_heads": 1}),
}
DEFAULTS = dict(phase="select", select_from="", models=tuple(MODELS), seeds=(0, 1, 2), epochs=1)


def model_config(name: str):
  """The point's config before its run overrides (the config arg with the size overrides)."""
  _, arg, over = MODELS[name]
  config = sweep.load_config(f"{CONFIG}:{arg}")
  with config.unlocked():
    config.model.update(over)
  return config


def forward_mflops(name: str) -> float:
  """Forward MFLOPs per 28x28x1 image (matrix multiplications and convolutions)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import models, plan  # pylint: disable=g-import-not-at-top
  config = model_config(name)
  kwargs = config.model.to_dict()
  if name == "sasa":  # count the attention as defined, each pixel's own window (see MODELS)
    kwargs["query_block"] = 0
  model = models.get_model(config.model_name, num_classes=10, **kwargs)
  x = jnp.zeros((1, 28, 28, 1), jnp.float32)
  rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}
  variables = jax.eval_shape(lambda: model.init(rngs, x, train=False))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return plan.jaxpr_flops(jaxpr) / 1e6


def choose(rows: Sequence[Mapping]) -> Dict[str, Tuple[float, float]]:
  """{model: (lr, wd)} with the best validation accuracy of the selection (ties: smaller lr)."""
  best: Dict[str, Tuple[float, Tuple[float, float]]] = {}
  for r in rows:
    if r.get("eval_split") != VAL:
      raise ValueError(f"Selection row {r.get('name')!r} was evaluated on "
                       f"{r.get('eval_split')!r}, not on the validation split {VAL!r}.")
    if r.get("accuracy") in ("", None):
      continue
    key = (float(r["accuracy"]), -float(r["lr"]))
    if r["arch"] not in best or key > best[r["arch"]][0]:
      best[r["arch"]] = (key, (float(r["lr"]), float(r["wd"])))
  return {k: v[1] for k, v in best.items()}


def _point(name: str, seed: int, lr: float, wd: float, epochs: float, *, final: bool,
           point_name: str) -> sweep.Point:
  label, arg, _ = MODELS[name]
  base = model_config(name)
  budget = int(epochs * N)
  overrides = {"seed": seed, "train_split": f"{TRAIN}@seeded({N}, seed={seed})",
               "eval_split": VAL, "test_split": TEST if final else "",
               "model": base.model.to_dict(),
               "lr.base": lr, "wd": wd}
  overrides.update(sweep.examples_budget(base, "total", budget, N))
  overrides.update(sweep.examples_budget(base, "lr.warmup", budget // 10, N))
  overrides.update(sweep.examples_budget(base, "checkpoint_every", budget // 4, N))
  tags = {"family": label, "arch": name, "model": label, "train_size": N, "seed": seed,
          "lr": lr, "wd": wd, "budget_examples": budget}
  return sweep.Point(point_name, f"{CONFIG}:{arg}", overrides, tags)


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  unknown = [m for m in a["models"] if m not in MODELS]
  if unknown:
    raise ValueError(f"Unknown models {unknown}; known: {', '.join(MODELS)}.")
  epochs = float(a["epochs"])
  points: List[sweep.Point] = []
  if a["phase"] == "select":
    for name in a["models"]:
      for recipe, (lr, wd) in RECIPES.items():
        points.append(_point(name, 0, lr, wd, epochs, final=False,
                             point_name=f"{name}_{recipe}_recipe"))
    return sweep.Sweep("attention_comparison_select", points,
                       "Recipe per family on the validation split (seed 0).")
  if a["phase"] != "final":
    raise ValueError(f"phase={a['phase']!r}: use phase=select or phase=final.")
  chosen = choose(aggregate.read_selection(a["select_from"]))
  missing = [m for m in a["models"] if m not in chosen]
  if missing:
    raise ValueError(f"The selection in {a['select_from']} has no finished run of {missing}: "
                     "run phase=select to the end first.")
  for seed in (int(s) for s in a["seeds"]):
    for name in a["models"]:
      lr, wd = chosen[name]
      points.append(_point(name, seed, lr, wd, epochs, final=True,
                           point_name=f"{name}_seed{seed}"))
  return sweep.Sweep("attention_comparison", points,
                     "Attention designs at matched FLOPs, Fashion-MNIST 54k, 3 seeds.")


if __name__ == "__main__":
  for m in MODELS:
    print(f"{m:12s} {forward_mflops(m):6.2f} MFLOPs")
