r"""Data scaling at CPU scale: do ResNets win on small data and ViTs catch up as data grows, and
where do hybrids sit? (The question of the ViT paper's figures 3 and 4, at Fashion-MNIST scale.)

  python -m experiments.runner experiments/fmnist_data_scaling.py:phase=select --out=workdirs/fms
  python -m experiments.runner experiments/fmnist_data_scaling.py:phase=final,select_from=workdirs/fms \
      --out=workdirs/fmf

Models (configs/fashion_mnist.py args `resnet`, `vit`, `hybrid`) at two sizes of matched forward
FLOPs per image (XLA's cost analysis of the forward pass, 28x28x1, 10 classes):
  size M: ResNet (BiT-R26x1, stages 2/2/2, width 14, 7 GroupNorm groups) 41.5 MFLOPs, 0.17M
          parameters; ViT-Mu/7 39.5 MFLOPs, 1.20M; hybrid (ViT-Mu/7 on a 16-channel 3x3 root)
          42.8 MFLOPs, 1.29M.
  size S: ResNet width 7: 11.1 MFLOPs, 43k; ViT width 64, MLP 256, 2 heads: 10.3 MFLOPs, 304k;
          hybrid (that ViT on an 8-channel root): 11.2 MFLOPs, 326k.
Training sets: nested seeded subsets `train[:54000]@seeded(N, seed=S)` (the N-subset is contained
in every larger one of the same seed; the last 6,000 training images are the validation split
and never trained on), N in 1000, 3000, 10000, 54000.
Budget (`budget_examples`): max(FLOOR_EXAMPLES, EPOCHS * N) training examples: the budget grows
with the data (1 epoch of 54k), with a floor of 20,480 examples (160 steps of 128) so that the
smallest sets still train to convergence (20 epochs of 1k, 2 of 10k). Warm-up is 10% of it,
cosine decay to 0.
Selection (phase=select, model size S, seed 0, validation accuracy only): per family, learning
rate x weight decay on the grid LRS x WDS at N = 1000 and 10000; `choose` takes the pair with the
best mean validation accuracy over the two data sizes, and phase=final freezes it for both model
sizes (selecting on S keeps the selection at a quarter of the cost of M's).
Cost (measured by the runner before it starts, experiments/cost.py): on this repository's 2-core
VM a ResNet step costs 4x a ViT step of the same FLOPs (XLA:CPU convolutions), so ResNet M is most
of the study; `--plan` prints the estimate without running anything.
Final (phase=final): every family x size x N x seed 0/1/2; validation top-1 during training, then
the test split once at the end (`final_test_accuracy`) and the papers' linear few-shot probe
(big_vision's estimator, 1/5/10/25 shots drawn from the first 1,000 training images, 3 draws) on
the test split. Points run seed-major (every point of seed 0, then of seed 1, ...), so a study
stopped part-way has whole seeds. The runner skips finished points and resumes interrupted ones from their checkpoints.

Arg (after the colon, comma-separated key=value, lists joined by "/"): phase (select|final),
select_from (the --out folder of the selection, phase=final), sizes, models, model_sizes, seeds.
"""
import csv
import os
from typing import Dict, List, Mapping, Sequence, Tuple

from experiments import sweep

CONFIG = "configs/fashion_mnist.py"
FAMILIES = {"resnet": "ResNet", "vit": "ViT", "hybrid": "Hybrid"}
TRAIN, VAL, TEST = "train[:54000]", "train[54000:]", "test"
FLOOR_EXAMPLES = 20480
EPOCHS = 1
LRS = (1e-3, 3e-3)
WDS = (0.05, 0.5)
SELECT_SIZES = (1000, 10000)
SELECT_MODEL_SIZE = "S"
FEWSHOT_TRAIN = "train[:1000]"
# Model-size overrides of the configs' models (size M is the config as it is).
MODEL_SIZES = {
    "M": {"resnet": {"base_width": 14, "gn_groups": 7}},
    "S": {"vit": {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2},
          "hybrid": {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2,
                     "resnet": {"num_layers": (), "base_width": 8, "root": "small",
                                "gn_groups": 4}},
          "resnet": {"base_width": 7, "gn_groups": 7}},
}
DEFAULTS = dict(phase="select", select_from="", sizes=(1000, 3000, 10000, 54000),
                models=("resnet", "vit", "hybrid"), model_sizes=("M", "S"), seeds=(0, 1, 2))


def budget_examples(n: int) -> int:
  """Training examples of a point with n training images: EPOCHS epochs, at least the floor."""
  return max(FLOOR_EXAMPLES, EPOCHS * n)


def train_split(n: int, seed: int) -> str:
  """The nested subset of n training images for a seed (never the validation images)."""
  return f"{TRAIN}@seeded({n}, seed={seed})"


def choose(rows: Sequence[Mapping]) -> Dict[str, Tuple[float, float]]:
  """{family: (lr, wd)} with the best mean validation accuracy over the selection sizes.

  Rows are the selection's results table (family, lr, wd, train_size, eval_split, accuracy);
  `accuracy` must be on the validation split, and a family whose grid is incomplete is an error
  (a choice on part of the grid is not the frozen one)."""
  out = {}
  for r in rows:
    if r.get("eval_split") != VAL:
      raise ValueError(f"Selection row {r.get('name')!r} was evaluated on "
                       f"{r.get('eval_split')!r}, not on the validation split {VAL!r}.")
  for family in sorted({r["family"] for r in rows}):
    scores = {}
    for lr in LRS:
      for wd in WDS:
        accs = [float(r["accuracy"]) for r in rows if r["family"] == family and
                float(r["lr"]) == lr and float(r["wd"]) == wd and
                int(r["train_size"]) in SELECT_SIZES and r.get("accuracy") not in ("", None)]
        if len(accs) != len(SELECT_SIZES):
          raise ValueError(f"The selection of {family} lacks lr={lr}, wd={wd} at some of the "
                           f"sizes {SELECT_SIZES}: run phase=select to the end first.")
        scores[(lr, wd)] = sum(accs) / len(accs)
    out[family] = max(scores, key=lambda k: (scores[k], -k[0], -k[1]))
  return out


def read_choice(out_dir: str) -> Dict[str, Tuple[float, float]]:
  path = os.path.join(out_dir, "results.csv")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No selection results at {path}: run phase=select with "
                            f"--out={out_dir} first (the runner writes results.csv).")
  with open(path) as f:
    return choose(list(csv.DictReader(f)))


def _label(config, size: str) -> str:
  """The model's name for tables and legends: "R+ViT-Mu/7 (M)"."""
  return ("R+" if config.model.get("resnet") else "") + f"{config.model_name} ({size})"


def _point(model, size, n, seed, lr, wd, *, final: bool, name: str) -> sweep.Point:
  config = f"{CONFIG}:{model}"
  base = sweep.load_config(config)
  budget = budget_examples(n)
  over = {"seed": seed, "train_split": train_split(n, seed), "eval_split": VAL,
          "test_split": TEST if final else "", "lr.base": lr, "wd": wd}
  model_over = MODEL_SIZES[size].get(model, {})
  if model_over:
    merged = base.model.to_dict()
    merged.update(model_over)
    over["model"] = merged
  over.update(sweep.examples_budget(base, "total", budget, n))
  over.update(sweep.examples_budget(base, "lr.warmup", budget // 10, n))
  over.update(sweep.examples_budget(base, "checkpoint_every", budget // 4, n))
  if final:
    over.update({"fewshot.shots": (1, 5, 10, 25), "fewshot.train_split": FEWSHOT_TRAIN,
                 "fewshot.test_split": TEST, "fewshot.num_trials": 3})
  label = _label(base, size) if not model_over else None
  tags = {"family": FAMILIES.get(model, model), "model": label, "model_size": size,
          "train_size": n, "seed": seed, "budget_examples": budget, "lr": lr, "wd": wd}
  point = sweep.Point(name, config, over, tags)
  if label is None:  # the label of the overridden model
    tags["model"] = _label(sweep.build_config(point), size)
  return point


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  points: List[sweep.Point] = []
  if a["phase"] == "select":
    for model in a["models"]:
      for n in SELECT_SIZES:
        for lr in LRS:
          for wd in WDS:
            points.append(_point(model, SELECT_MODEL_SIZE, n, 0, lr, wd, final=False,
                                 name=f"select_{model}_n{n}_lr{lr:g}_wd{wd:g}"))
    return sweep.Sweep("fmnist_data_scaling_select", points,
                       "Fashion-MNIST data scaling: lr x wd per family on the validation split.")
  if a["phase"] != "final":
    raise ValueError(f"phase must be select or final, not {a['phase']!r}.")
  if not a["select_from"]:
    raise ValueError("phase=final needs select_from=DIR, the --out folder of phase=select.")
  chosen = read_choice(a["select_from"])
  # Seed-major order: an interrupted study has every point of seed 0 before any of seed 1.
  for seed in a["seeds"]:
    for size in a["model_sizes"]:
      for n in a["sizes"]:
        for model in a["models"]:
          lr, wd = chosen[FAMILIES.get(model, model)]
          points.append(_point(model, size, n, seed, lr, wd, final=True,
                               name=f"{model}{size}_n{n}_s{seed}"))
  return sweep.Sweep("fmnist_data_scaling", points,
                     "Fashion-MNIST data scaling: test accuracy and few-shot at the end.")
