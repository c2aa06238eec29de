r"""Data scaling at CPU scale: a ResNet, a ViT and a hybrid trained from scratch on 1k to 60k
Fashion-MNIST images at one fixed compute budget (the shape of the ViT paper's figures 3 and 4).

  python -m experiments.runner experiments/fmnist_data_scaling.py --out=workdirs/fmnist_scaling
  python -m experiments.runner experiments/fmnist_data_scaling.py:examples=81920,seeds=0/1 ...

Points: configs/fashion_mnist.py with args `resnet`, `vit`, `hybrid` (similar compute per image:
52.0, 39.5 and 42.8 MFLOPs forward, by XLA's cost analysis; 0.22M, 1.20M and 1.29M parameters),
with the flips and learned position embeddings the results were measured with (STUDY_OVERRIDES),
x training sets "train@seeded(N, seed=S)" for N in 1000, 3000, 10000, 30000, 60000 (nested: the
1k images are among the 3k ones, ...) x seeds S (the seed of the subset, the initialisation and the
augmentation). Named `{model}_n{N}_s{S}`.

Budget: every point trains on the same number of examples, whatever N (default 20480 = 160 steps of
128): the paper compares data sizes at a fixed pre-training compute. So N=1000 sees ~20 epochs and
overfits, N=60000 sees a third of an epoch and is compute-bound. Warm-up is 10% of the budget and
the cosine decay spans it; both are set in the base config's own units (`examples_budget`).
Evaluation: top-1 on the 10k test images, and linear few-shot (1/5/10/25 per class from the first
1000 training images, tested on the first 2000 test images, mean of 5 draws of the shots: one
draw varies by +-6 points at 1-shot), at the end and `evals` times during training (default 0:
one evaluation costs about as much as the training of a point here).

Arg (after the colon, comma-separated key=value, lists joined by "/"): examples (20480), sizes
(1000/3000/10000/30000/60000), models (resnet/vit/hybrid), seeds (0), evals (0), shots
(1/5/10/25).
Measured (defaults, 2 CPU cores, quiet, 35 minutes for the 15 points; table, plots and conclusions
in experiments/results/fmnist_data_scaling/ and the README): top-1 1k..60k ResNet 66.0-68.4%,
ViT 69.9-72.9%, hybrid 73.7-77.2%; a ViT point takes ~65-90 s (~45 s of training), a ResNet
point ~210 s.
"""
from experiments import sweep

CONFIG = "configs/fashion_mnist.py"
FAMILIES = {"resnet": "ResNet", "vit": "ViT", "hybrid": "Hybrid"}
# The recipe the committed results were measured with (configs/fashion_mnist.py has since dropped
# flips and learned position embeddings for its 10-minute runs): flips matter when 1k images are
# seen 20 times.
STUDY_OVERRIDES = {"pp_train": "decode|flip_lr|value_range(-1,1)"}
STUDY_MODEL_OVERRIDES = {"posemb": "learn"}  # for the models that have the key
DEFAULTS = dict(examples=20480, sizes=(1000, 3000, 10000, 30000, 60000),
                models=("resnet", "vit", "hybrid"), seeds=(0,), evals=0, shots=(1, 5, 10, 25))


def _label(config) -> str:
  """The model's name for tables and legends; a ViT with a ResNet stem is "R+ViT-Mu/7"."""
  return ("R+" if config.model.get("resnet") else "") + config.model_name


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  budget = int(a["examples"])
  points = []
  for model in a["models"]:
    config = f"{CONFIG}:{model}"
    base = sweep.load_config(config)
    for n in a["sizes"]:
      for seed in a["seeds"]:
        over = dict(STUDY_OVERRIDES)
        over.update({f"model.{k}": v for k, v in STUDY_MODEL_OVERRIDES.items() if k in base.model})
        over.update({"seed": seed, "train_split": f"train@seeded({n}, seed={seed})",
                     "fewshot.shots": tuple(a["shots"]), "fewshot.train_split": "train[:1000]",
                     "fewshot.test_split": "test[:2000]", "fewshot.num_trials": 5})
        over.update(sweep.examples_budget(base, "total", budget, n))
        over.update(sweep.examples_budget(base, "lr.warmup", budget // 10, n))
        over.update(sweep.examples_budget(base, "checkpoint_every", budget // 4, n))
        if a["evals"]:
          over.update(sweep.examples_budget(base, "eval_every", budget // (a["evals"] + 1), n))
        tags = {"family": FAMILIES.get(model, model), "model": _label(base), "train_size": n,
                "seed": seed, "budget_examples": budget}
        points.append(sweep.Point(f"{model}_n{n}_s{seed}", config, over, tags))
  return sweep.Sweep("fmnist_data_scaling", points,
                     f"Fashion-MNIST data scaling at {budget} training examples per point.")
