r"""Data scaling at CPU scale: do ResNets win on small data and ViTs catch up as data grows, and
where do hybrids sit? (The question of the ViT paper's figures 3 and 4, at Fashion-MNIST scale.)

  python -m experiments.runner experiments/fmnist_data_scaling.py:phase=select --out=workdirs/fms \
      --parallel=2 --pin
  python -m experiments.runner experiments/fmnist_data_scaling.py:phase=final,select_from=workdirs/fms \
      --out=workdirs/fmf --parallel=2 --pin

(`--parallel=2 --pin`: two points at once, one per core, on the 2-core VM the study was run on.)
Selected (2026-11-30, 48 points, experiments/results/fmnist_data_scaling/selection/): ResNet
lr 3e-2 / wd 0.5, ViT lr 3e-3 / wd 2, hybrid lr 3e-3 / wd 0.5, on the union of three grids (the
README's "Study (a)" has the table). A first final phase with the first grid's corner (lr 3e-3 /
wd 0.5 for every family) is kept in experiments/results/fmnist_data_scaling/narrow_recipe/.

Models (configs/fashion_mnist.py args `resnet`, `vit`, `hybrid`) at two sizes of matched forward
FLOPs per image (XLA's cost analysis of the forward pass, 28x28x1, 10 classes):
  size S: ResNet (BiT-R26x1 stages 2/2/2 on a 3x3 stride-1 root, width 7, 7 GroupNorm groups)
          11.1 MFLOPs, 43k parameters; ViT (ViT-Mu/7's 6 layers at width 64, MLP 256, 2 heads)
          10.3 MFLOPs, 304k; hybrid (that ViT on an 8-channel 3x3 root) 11.2 MFLOPs, 326k.
  size XS: ResNet width 3 (3 groups) 2.3 MFLOPs, 9k; ViT width 32, MLP 128, 2 heads 2.8 MFLOPs,
          78k; hybrid (on a 4-channel root) 3.0 MFLOPs, 83k.
(ViT-Mu/7 itself, 39.5 MFLOPs, and a ResNet of its FLOPs would cost 3-4x size S: out of reach of
this machine's budget for three seeds.)
Training sets: nested seeded subsets `train[:54000]@seeded(N, seed=S)` (the N-subset is contained
in every larger one of the same seed; the last 6,000 training images are the validation split
and never trained on), N in 1000, 7000, 54000 (steps of ~7.5x).
Budget (`budget_examples`): max(FLOOR_EXAMPLES, EPOCHS * N) training examples: the budget grows
with the data (2 epochs of 54k), with a floor of 64,000 examples (500 steps of 128: 64 epochs of
1k, 9 of 7k) so that the small sets train to convergence. Warm-up is 10% of it, cosine decay to 0.
A first design with a 20,480-example floor left every model under-trained: the ResNet ended at
train loss 1.3-1.4 and 44% validation accuracy on 1k after 20 epochs, and the first study's
points (experiments/results/fmnist_data_scaling_v1) sat at 66-77% whatever the data.
Selection (phase=select, model size S, seed 0, validation accuracy only): per family, learning
rate x weight decay on the grid LRS x WDS at N = 1000 and 7000; `choose` takes the pair with the
best mean validation accuracy over the two data sizes, and phase=final freezes it for both model
sizes.
Cost (measured by the runner before it starts, experiments/cost.py; `--plan` prints it without
running anything): on this repository's 2-core VM a ResNet step costs ~4x a ViT step of the same
FLOPs (XLA:CPU convolutions and GroupNorm), so the ResNets are most of the study.
Final (phase=final): every family x model size x N x seed 0/1/2; validation top-1 at the end,
then the test split once (`final_test_accuracy`) and the papers' linear few-shot probe
(big_vision's estimator, 1/5/10/25 shots drawn from the first 1,000 training images, 3 draws) on
the test split. Points run seed-major (every point of seed 0, then of seed 1, ...), so a study
stopped part-way has whole seeds. The runner skips finished points and resumes interrupted ones
from their checkpoints.

Arg (after the colon, comma-separated key=value, lists joined by "/"): phase (select|final),
select_from (the --out folder of the selection, phase=final), sizes, models, model_sizes, seeds,
lrs and wds (phase=select: the grid to run, default LRS x WDS; phase=final: restrict the choice to
these values, default every (lr, wd) the selection folder holds at both selection sizes).
A wider grid in the same folder as the first, or in a new one holding copies of the first's
points (same names, so finished points are skipped); `--only` runs part of a grid:
  mkdir -p workdirs/fms_wide/points && cp -r workdirs/fms/points/* workdirs/fms_wide/points/
  python -m experiments.runner \
      experiments/fmnist_data_scaling.py:phase=select,lrs=0.003/0.01,wds=0.5/2 \
      --out=workdirs/fms_wide --parallel=2 --pin
phase=final then chooses on the union of the grids run.
"""
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from experiments import aggregate
from experiments import sweep

CONFIG = "configs/fashion_mnist.py"
FAMILIES = {"resnet": "ResNet", "vit": "ViT", "hybrid": "Hybrid"}
TRAIN, VAL, TEST = "train[:54000]", "train[54000:]", "test"
FLOOR_EXAMPLES = 64000
EPOCHS = 2
LRS = (1e-3, 3e-3)
WDS = (0.05, 0.5)
SELECT_SIZES = (1000, 7000)
SELECT_MODEL_SIZE = "S"
FEWSHOT_TRAIN = "train[:1000]"
# Model-size overrides of the configs' models (size M is the config as it is).
MODEL_SIZES = {
    "S": {"vit": {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2},
          "hybrid": {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2,
                     "resnet": {"num_layers": (), "base_width": 8, "root": "small",
                                "gn_groups": 4}},
          "resnet": {"base_width": 7, "gn_groups": 7}},
    "XS": {"vit": {"hidden_size": 32, "mlp_dim": 128, "num_heads": 2},
           "hybrid": {"hidden_size": 32, "mlp_dim": 128, "num_heads": 2,
                      "resnet": {"num_layers": (), "base_width": 4, "root": "small",
                                 "gn_groups": 4}},
           "resnet": {"base_width": 3, "gn_groups": 3}},
}
DEFAULTS = dict(phase="select", select_from="", sizes=(1000, 7000, 54000),
                models=("resnet", "vit", "hybrid"), model_sizes=("S", "XS"), seeds=(0, 1, 2),
                lrs=(), wds=())


def budget_examples(n: int) -> int:
  """Training examples of a point with n training images: EPOCHS epochs, at least the floor."""
  return max(FLOOR_EXAMPLES, EPOCHS * n)


def train_split(n: int, seed: int) -> str:
  """The nested subset of n training images for a seed (never the validation images)."""
  return f"{TRAIN}@seeded({n}, seed={seed})"


def choose(rows: Sequence[Mapping], lrs: Optional[Sequence[float]] = None,
           wds: Optional[Sequence[float]] = None) -> Dict[str, Tuple[float, float]]:
  """{family: (lr, wd)} with the best mean validation accuracy over the selection sizes.

  Rows are the selection's results table (family, lr, wd, train_size, eval_split, accuracy);
  `accuracy` must be on the validation split. The candidates are every (lr, wd) the family was
  run with (the union of the grids run, e.g. a first grid and a wider one in one folder), or,
  with `lrs` and/or `wds`, the grid of those values only (rows off it are ignored). A candidate
  without a validation accuracy at every selection size is an error (a choice on part of the
  selection is not the frozen one). Ties go to the smaller lr, then the smaller wd."""
  for r in rows:
    if r.get("eval_split") != VAL:
      raise ValueError(f"Selection row {r.get('name')!r} was evaluated on "
                       f"{r.get('eval_split')!r}, not on the validation split {VAL!r}.")
  out = {}
  for family in sorted({r["family"] for r in rows}):
    mine = [r for r in rows if r["family"] == family]
    run = sorted({(float(r["lr"]), float(r["wd"])) for r in mine})
    if not lrs and not wds:
      grid = run
    else:  # the product of the given values (and of every value run for the one not given)
      grid = [(lr, wd) for lr in (lrs or sorted({p[0] for p in run}))
              for wd in (wds or sorted({p[1] for p in run}))]
    scores = {}
    for lr, wd in grid:
      accs = [float(r["accuracy"]) for r in mine if float(r["lr"]) == lr and
              float(r["wd"]) == wd and int(r["train_size"]) in SELECT_SIZES and
              r.get("accuracy") not in ("", None)]
      if len(accs) != len(SELECT_SIZES):
        raise ValueError(f"The selection of {family} lacks lr={lr:g}, wd={wd:g} at some of the "
                         f"sizes {SELECT_SIZES}: run phase=select to the end first.")
      scores[(lr, wd)] = sum(accs) / len(accs)
    out[family] = max(scores, key=lambda k: (scores[k], -k[0], -k[1]))
  return out


def read_choice(out_dir: str, lrs: Optional[Sequence[float]] = None,
                wds: Optional[Sequence[float]] = None) -> Dict[str, Tuple[float, float]]:
  return choose(aggregate.read_selection(out_dir), lrs, wds)


def _label(config, size: str) -> str:
  """The model's name for tables and legends: "R+ViT-Mu/7 (M)"."""
  return ("R+" if config.model.get("resnet") else "") + f"{config.model_name} ({size})"


def run_overrides(base, n: int, seed: int, *, test: bool) -> Dict:
  """Seed, data and duration of a run on the n-image subset of `seed`: budget_examples(n)
  training examples (10% warm-up, a checkpoint every quarter), the validation split, and the
  test split only when `test`. Shared with experiments/fmnist_distill.py."""
  budget = budget_examples(n)
  over = {"seed": seed, "train_split": train_split(n, seed), "eval_split": VAL,
          "test_split": TEST if test else ""}
  over.update(sweep.examples_budget(base, "total", budget, n))
  over.update(sweep.examples_budget(base, "lr.warmup", budget // 10, n))
  over.update(sweep.examples_budget(base, "checkpoint_every", budget // 4, n))
  return over


def _point(model, size, n, seed, lr, wd, *, final: bool, name: str) -> sweep.Point:
  config = f"{CONFIG}:{model}"
  base = sweep.load_config(config)
  budget = budget_examples(n)
  over = dict(run_overrides(base, n, seed, test=final), **{"lr.base": lr, "wd": wd})
  model_over = MODEL_SIZES[size].get(model, {})
  if model_over:
    merged = base.model.to_dict()
    merged.update(model_over)
    over["model"] = merged
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
  try:
    lrs, wds = (tuple(float(v) for v in a[k]) for k in ("lrs", "wds"))
  except ValueError:
    raise ValueError(f"lrs and wds are numbers joined by '/' (say lrs=0.003/0.01), not "
                     f"lrs={'/'.join(a['lrs'])}, wds={'/'.join(a['wds'])}.") from None
  points: List[sweep.Point] = []
  if a["phase"] == "select":
    for model in a["models"]:
      for n in SELECT_SIZES:
        for lr in lrs or LRS:
          for wd in wds or WDS:
            points.append(_point(model, SELECT_MODEL_SIZE, n, 0, lr, wd, final=False,
                                 name=f"select_{model}_n{n}_lr{lr:g}_wd{wd:g}"))
    return sweep.Sweep("fmnist_data_scaling_select", points,
                       "Fashion-MNIST data scaling: lr x wd per family on the validation split.")
  if a["phase"] != "final":
    raise ValueError(f"phase must be select or final, not {a['phase']!r}.")
  chosen = read_choice(a["select_from"], lrs or None, wds or None)
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
