r"""DeiT's distillation at Fashion-MNIST scale: does a tiny ViT learn more from a ResNet teacher than
from the labels alone, at 6k, 20k and 54k training images?

  python -m experiments.runner experiments/fmnist_distill.py:phase=teacher --out=workdirs/fmd_t
  python -m experiments.runner experiments/fmnist_distill.py:phase=student,teachers=workdirs/fmd_t \
      --out=workdirs/fmd_s

Budget of every run (teachers and students): the data-scaling study's rule
(experiments/fmnist_data_scaling.py), max(64,000, 2 N) training examples: 500 steps of 128 at 6k
and 20k, 2 epochs (844 steps) at 54k.
Teachers (phase=teacher): a BiT ResNet (configs/fashion_mnist.py:resnet, stages 2/2/2 on a 3x3
stride-1 root, width 8: 14 MFLOPs, 56k parameters), one per subset, trained on that subset; each
exports params.npz.
Students (phase=student), all DeiT-Mu/7 with the data-scaling study's size-S widths (6 layers,
width 64, MLP 256, 2 heads, 7x7 patches, class token, DeiT's initialisation: 10 MFLOPs;
configs/fashion_mnist.py:deit), on the same subset with the same budget, learning rate and
weight decay:
  - `vit`: DeiT-Mu/7 without the distillation token, labels only (the baseline);
  - `dist_token`: DeiT-Mu/7-distilled without a teacher (both heads learn the labels): what the
    extra token alone does;
  - `distilled`: DeiT-Mu/7-distilled with the subset's teacher, DeiT's hard distillation (alpha
    0.5; the teacher sees the same batch, under stop_gradient).
Subsets are the data-scaling study's nested seeded ones (`train[:54000]@seeded(N, seed=S)`); the
last 6,000 training images are the validation split, evaluated at the end of every run; the test
split is evaluated once, at the end. The learning rate and weight decay are the configs' (2e-3,
0.05), not tuned here: no choice is made on the test split.

Arg (after the colon, comma-separated key=value, lists joined by "/"): phase (teacher|student),
teachers (the teacher phase's --out folder), sizes, seeds.
"""
import os
from typing import List

from experiments import sweep
from experiments import fmnist_data_scaling as study

CONFIG = "configs/fashion_mnist.py"
TEACHER_MODEL = {"base_width": 8, "gn_groups": 4}
STUDENT_MODEL = {"hidden_size": 64, "mlp_dim": 256, "num_heads": 2}
STUDENTS = {
    "vit": {"model_name": "DeiT-Mu/7"},
    "dist_token": {},
    "distilled": {"distill.type": "hard", "distill.alpha": 0.5},
}
LABELS = {"vit": "DeiT-Mu/7 (S), labels", "dist_token": "DeiT-Mu/7-distilled (S), no teacher",
          "distilled": "DeiT-Mu/7-distilled (S), ResNet teacher"}
DEFAULTS = dict(phase="teacher", teachers="", sizes=(6000, 20000, 54000), seeds=(0,))


def teacher_name(n: int, seed: int) -> str:
  return f"teacher_n{n}_s{seed}"


def get_sweep(arg=None) -> sweep.Sweep:
  a = sweep.parse_arg(arg, DEFAULTS)
  points: List[sweep.Point] = []
  if a["phase"] == "teacher":
    base = sweep.load_config(f"{CONFIG}:resnet")
    model = dict(base.model.to_dict(), **TEACHER_MODEL)
    for seed in a["seeds"]:
      for n in a["sizes"]:
        over = dict(study.run_overrides(base, n, seed, test=True), model=model)
        points.append(sweep.Point(teacher_name(n, seed), f"{CONFIG}:resnet", over, {
            "family": "ResNet", "model": "BiT-R26x1 (width 8)", "student": "teacher",
            "train_size": n, "seed": seed, "budget_examples": study.budget_examples(n)}))
    return sweep.Sweep("fmnist_distill_teachers", points,
                       "ResNet teachers for the distillation study, one per subset.")
  if a["phase"] != "student":
    raise ValueError(f"phase must be teacher or student, not {a['phase']!r}.")
  if not a["teachers"]:
    raise ValueError("phase=student needs teachers=DIR, the --out folder of phase=teacher.")
  base = sweep.load_config(f"{CONFIG}:deit")
  for seed in a["seeds"]:
    for n in a["sizes"]:
      for student, extra in STUDENTS.items():
        over = dict(study.run_overrides(base, n, seed, test=True), **extra)
        over["model"] = dict(base.model.to_dict(), **STUDENT_MODEL)
        if student == "distilled":
          over["distill.teacher"] = os.path.join(os.path.abspath(a["teachers"]), "points",
                                                 teacher_name(n, seed))
        points.append(sweep.Point(f"{student}_n{n}_s{seed}", f"{CONFIG}:deit", over, {
            "family": "DeiT", "model": LABELS[student], "student": student, "train_size": n,
            "seed": seed, "budget_examples": study.budget_examples(n)}))
  return sweep.Sweep("fmnist_distill", points,
                     "DeiT-Mu/7 with and without a ResNet teacher, equal budgets.")
