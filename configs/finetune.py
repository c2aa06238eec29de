r"""Fine-tuning pretrained weights with the ViT paper's recipe (docs/reference.md, "Training
recipes") on a TFDS data set.

  python -m vit_jax.main --config=configs/finetune.py:cifar10,ViT-B/16 --workdir=workdirs/ft \
      --config.pretrained.path=/path/to/ViT-B_16.npz

`pretrained.path` takes any `vit_jax.pretrained` source: an `.npz`, a Hugging Face directory, or a
zoo name such as `imagenet21k/ViT-B_16` (`python -m vit_jax.pretrained --list`).

Arg: `<dataset>,<model>[,lr=X]` with dataset in cifar10, cifar100, pets, flowers, imagenet1k.
Source: the ViT paper (Dosovitskiy et al. 2021), Appendix B.1.1 Table 4: SGD with momentum 0.9,
batch 512, cosine decay, no weight decay, global-norm clipping at 1, 384 px; steps and the lr
grid per data set (the paper picks the lr on a validation split):

  | dataset | steps | lr grid |
  | imagenet1k | 20,000 | 0.003, 0.01, 0.03, 0.06 |
  | cifar10, cifar100 | 10,000 | 0.001, 0.003, 0.01, 0.03 |
  | pets, flowers | 500 | 0.001, 0.003, 0.01, 0.03 |

Warm-up: 500 steps, and 50 for the 500-step runs (ours: the table gives none for them).
Validation discipline: the lr is chosen on the last 2% of the training split (ImageNet: 1%,
"minival"; Flowers: its validation split), the eval_split; the official test split is evaluated
once at the end (test_split).
Reported (Table 5, ViT-B/16 pre-trained on ImageNet-21k): CIFAR-10 98.95, CIFAR-100 91.67,
Pets 94.43, Flowers 99.38, ImageNet 83.97% top-1.
Result: not run here (no accelerator, no network for the data or the checkpoints).
"""
from configs import common

TABLE4 = {  # dataset -> (steps, lr grid)
    "imagenet1k": (20_000, (0.003, 0.01, 0.03, 0.06)),
    "cifar10": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "cifar100": (10_000, (0.001, 0.003, 0.01, 0.03)),
    "pets": (500, (0.001, 0.003, 0.01, 0.03)),
    "flowers": (500, (0.001, 0.003, 0.01, 0.03)),
}


def get_config(arg: str = "cifar10,ViT-B/16"):
  parts = [p.strip() for p in (arg or "cifar10,ViT-B/16").split(",") if p.strip()]
  opts = dict(p.split("=", 1) for p in parts if "=" in p)
  positional = [p for p in parts if "=" not in p] + ["cifar10", "ViT-B/16"][len(
      [p for p in parts if "=" not in p]):]
  dataset, model_name = positional[:2]
  if dataset not in TABLE4:
    raise ValueError(f"Unknown dataset {dataset!r}; known: {', '.join(TABLE4)}")
  if set(opts) - {"lr"}:
    raise ValueError(f"Unknown option(s) {sorted(set(opts) - {'lr'})}; known: lr.")
  steps, grid = TABLE4[dataset]
  ds = common.DATASETS[dataset]
  res = 384
  c = common.base_config()
  c.model_name = model_name
  c.dataset.name = ds["name"]
  c.train_split, c.eval_split, c.test_split = ds["train"], ds["val"], ds["test"]
  c.pp_train = f"decode|inception_crop({res})|flip_lr|value_range(-1,1)"
  c.pp_eval = f"decode|resize({res})|value_range(-1,1)"
  c.batch_size = 512
  c.eval_batch_size = 512
  c.total_steps = steps
  c.log_every_steps = 50
  c.eval_every_steps = max(steps // 10, 50)
  c.checkpoint_every_steps = max(steps // 10, 50)
  c.optax.name = "sgd"
  c.optax.momentum = 0.9
  c.lr.base = float(opts.get("lr", grid[len(grid) // 2]))
  c.lr.warmup_steps = 500 if steps > 500 else 50
  c.lr.decay = "cosine"
  c.wd = 0.0
  c.grad_clip_norm = 1.0
  c.pretrained.required = True  # --config.pretrained.path=... or an error before any data
  return c
