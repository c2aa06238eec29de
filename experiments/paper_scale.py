r"""The paper-scale study: ViT-Ti..H, hybrids and BiT ResNets trained from scratch on ImageNet-21k
subsets and on ImageNet-1k at one compute budget (the ViT paper's figures 3, 4 and 5), for a user
with accelerators and the TFDS data sets.

  python -m experiments.runner experiments/paper_scale.py --out=workdirs/paper_scale --print-commands
  python -m experiments.runner experiments/paper_scale.py --out=... --only='ViT-B_16'   # locally

Points: configs/imagenet_scratch.py with the ViT paper's recipe (Table 3: batch 4096, Adam, 10k
warm-up steps; ImageNet-21k lr 1e-3, linear decay, wd 0.03; ImageNet-1k lr 3e-3, cosine, wd 0.3;
dropout 0.1, 224 px) with
- `imagenet21k_n{N}_{model}_s{S}`: ImageNet-21k training sets "train@seeded(N, seed=S)" of the
  prepared image folder (its docstring) for N in 1,281,167 (ImageNet-1k's size), 3M and 10M
  (nested subsets), held-out images in its `holdout/` folder;
- `imagenet1k_{model}_s{S}`: ImageNet-1k "train[:99%]" (1,268,355 images);
models: ViT-Ti/16, S/16, B/32, B/16, L/32, L/16, H/14; R26+ViT-S/32, R50+ViT-B/16, R50+ViT-L/32;
BiT-R50x1, BiT-R101x1, BiT-R152x2 ("/" is "_" in point names).
Budget: the same number of training examples for every point (default 384M: 300 ImageNet-1k
epochs, the paper's ImageNet budget), warm-up as in the config (10k steps).
Evaluation: top-1 on the config's held-out split every 2500 steps and at the end (ImageNet-1k's
validation set once at the end), and big_vision's linear few-shot probe on ImageNet-1k (1/5/10/25
per class from its first 100k training images, tested on its minival) for every point: ImageNet-21k
points probe it as a separate data set.

Arg (after the colon, comma-separated key=value, lists joined by "/"): examples (384000000),
sizes (1281167/3000000/10000000), families (ViT/Hybrid/ResNet), seeds (0), imagenet1k (1: include
the ImageNet-1k points).
Not run here (no accelerator, no data).
"""
from experiments import sweep

CONFIG = "configs/imagenet_scratch.py"
MODELS = {
    "ViT": ("ViT-Ti/16", "ViT-S/16", "ViT-B/32", "ViT-B/16", "ViT-L/32", "ViT-L/16", "ViT-H/14"),
    "Hybrid": ("R26+ViT-S/32", "R50+ViT-B/16", "R50+ViT-L/32"),
    "ResNet": ("BiT-R50x1", "BiT-R101x1", "BiT-R152x2"),
}
IMAGENET1K_TRAIN = 1_281_167 * 99 // 100  # "train[:99%]"
DEFAULTS = dict(examples=384_000_000, sizes=(1_281_167, 3_000_000, 10_000_000),
                families=("ViT", "Hybrid", "ResNet"), seeds=(0,), imagenet1k=1)


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  unknown = set(a["families"]) - set(MODELS)
  if unknown:
    raise ValueError(f"Unknown families {sorted(unknown)}; known: {', '.join(MODELS)}.")
  budget = int(a["examples"])
  # Units and batch size are the same for every model of the config.
  base = sweep.load_config(f"{CONFIG}:imagenet21k,ViT-B/16")
  runs = [("imagenet21k", n) for n in a["sizes"]]
  if a["imagenet1k"]:
    runs.append(("imagenet1k", IMAGENET1K_TRAIN))
  points = []
  for family in a["families"]:
    for model in MODELS[family]:
      slug = model.replace("/", "_")
      for data, n in runs:
        for seed in a["seeds"]:
          over = {"seed": seed}
          over.update(sweep.examples_budget(base, "total", budget, n))
          if data == "imagenet21k":
            over["train_split"] = f"train@seeded({n}, seed={seed})"
            name = f"{data}_n{n}_{slug}_s{seed}"
          else:
            name = f"{data}_{slug}_s{seed}"
          tags = {"family": family, "model": model, "dataset": data, "train_size": n,
                  "seed": seed, "budget_examples": budget}
          points.append(sweep.Point(name, f"{CONFIG}:{data},{model}", over, tags))
  return sweep.Sweep("paper_scale", points,
                     f"ImageNet-21k subsets and ImageNet-1k at {budget} examples per point.")
