r"""Fine-tuning a pretrained ViT (the paper's recipe, docs/reference.md) on a TFDS data set.

  python -m vit_jax.main --config=configs/finetune.py:cifar10,ViT-B/16 --workdir=workdirs/ft \
      --config.pretrained.path=/path/to/ViT-B_16.npz

Arg: `<dataset>,<model>` with dataset in cifar10, cifar100, pets, flowers, imagenet1k.
SGD momentum 0.9, global-norm clip 1, batch 512, lr 0.03 (sweep {0.003, 0.01, 0.03, 0.06}),
cosine decay with 500 warm-up steps, 10k steps (20k for ImageNet), 384 px.
Result: not run here (no accelerator, no network for the data or the checkpoints); the paper
reports ViT-B/16 (ImageNet-21k) at 98.95% on CIFAR-10 with this recipe.
"""
from configs import common


def get_config(arg: str = "cifar10,ViT-B/16"):
  dataset, model_name = (arg.split(",") + ["ViT-B/16"])[:2]
  if dataset not in common.DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; known: {', '.join(common.DATASETS)}")
  ds = common.DATASETS[dataset]
  res = 384
  c = common.base_config()
  c.model_name = model_name
  c.dataset.name = ds["name"]
  c.train_split, c.eval_split = ds["train"], ds["test"]
  c.pp_train = f"decode|inception_crop({res})|flip_lr|value_range(-1,1)"
  c.pp_eval = f"decode|resize({res})|value_range(-1,1)"
  c.batch_size = 512
  c.eval_batch_size = 512
  c.total_steps = 20_000 if dataset == "imagenet1k" else 10_000
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.optax.name = "sgd"
  c.optax.momentum = 0.9
  c.lr.base = 0.03
  c.lr.warmup_steps = 500
  c.lr.decay = "cosine"
  c.grad_clip_norm = 1.0
  c.pretrained.required = True  # --config.pretrained.path=... or an error before any data
  return c
