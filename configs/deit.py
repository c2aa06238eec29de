r"""DeiT's ImageNet-1k recipe ("Training data-efficient image transformers & distillation through
attention", Touvron et al. 2021, Table 9 and the official code's defaults).

  python -m vit_jax.main --config=configs/deit.py:DeiT-S/16 --workdir=workdirs/deit_s \
      --config.dataset.data_dir=gs://your-bucket/tfds
  python -m vit_jax.main --config=configs/deit.py:DeiT-S/16-distilled,teacher=workdirs/regnet \
      --workdir=workdirs/deit_s_dist

Arg: `<model>[,teacher=SOURCE][,epochs=N]`, model one of DeiT-{Ti,S,B}/16 and their
`-distilled` versions (tokens [cls, dist, patches], two heads; the distillation head learns from
the teacher, see vit_jax/tasks/classification.py's loss_terms). `teacher` is a workdir of ours
or a `vit_jax.pretrained` source (`--config.distill.model=NAME` for an .npz); the paper's
teacher is a RegNetY-16GF (82.9% top-1), which this project does not have: any model of ours
trained on the same classes works. Without a teacher a distilled model trains both heads on
the labels.

Recipe: 300 epochs, batch 1024, AdamW (0.9, 0.999), lr 5e-4 x batch / 512 = 1e-3, weight decay
0.05, cosine decay, 5 warm-up epochs, label smoothing 0.1, stochastic depth 0.1 (the code's
default for every size), no dropout, no gradient clipping; inception crop 224 + flip +
RandAugment(2, 9) (the paper's rand-m9-mstd0.5: magnitude noise not modelled) + random erasing
0.25; mixup 0.8 and CutMix 1.0 (one of the two per batch); repeated augmentation x3; hard
distillation (alpha 0.5). An EMA of the weights (decay 0.99996, the code's default) is evaluated
and exported beside them (the paper finds it adds nothing after fine-tuning).
Reported (Table 5, 224 px, ImageNet top-1): DeiT-Ti 72.2, DeiT-S 79.8, DeiT-B 81.8; distilled
(with the distillation token) Ti 74.5, S 81.2, B 83.4.
Validation discipline: trains on `train[:99%]`, chooses on `train[99%:]` (eval_split), and
evaluates the official validation set once at the end (test_split).
Result: not run here (no accelerator, no ImageNet).
"""
from configs import common

MODELS = tuple(f"DeiT-{v}/16{d}" for v in ("Ti", "S", "B") for d in ("", "-distilled"))


def get_config(arg: str = "DeiT-S/16"):
  parts = [p.strip() for p in (arg or "DeiT-S/16").split(",") if p.strip()]
  opts = dict(p.split("=", 1) for p in parts if "=" in p)
  names = [p for p in parts if "=" not in p] or ["DeiT-S/16"]
  if len(names) != 1 or names[0] not in MODELS:
    raise ValueError(f"Unknown deit config model {names!r}; known: {', '.join(MODELS)}.")
  if set(opts) - {"teacher", "epochs"}:
    raise ValueError(f"Unknown option(s) {sorted(set(opts) - {'teacher', 'epochs'})}; known: "
                     "teacher, epochs.")
  data = common.DATASETS["imagenet1k"]
  c = common.base_config()
  c.model_name = names[0]
  c.model.droppath_rate = 0.1
  c.dataset.name = data["name"]
  c.train_split, c.eval_split, c.test_split = data["train"], data["val"], data["test"]
  c.pp_train = ("decode|inception_crop(224)|flip_lr|randaugment(2, 9)|value_range(-1,1)|"
                "random_erase(0.25)")
  c.pp_eval = "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"
  c.mixup, c.cutmix = 0.8, 1.0
  c.repeated_aug = 3
  c.label_smoothing = 0.1
  c.batch_size = 1024
  c.eval_batch_size = 1024
  c.total_epochs = float(opts.get("epochs", 300))
  c.log_every_steps = 100
  c.eval_every_epochs = 10
  c.checkpoint_every_steps = 1000
  c.optax.name = "adamw"
  c.lr.base = 5e-4 * c.batch_size / 512
  c.lr.warmup_epochs = 5
  c.lr.decay = "cosine"
  c.wd = 0.05
  c.grad_clip_norm = 0.0
  c.ema_decay = 0.99996
  c.distill.teacher = opts.get("teacher", "")
  c.distill.type = "hard"
  c.distill.alpha = 0.5
  c.model.dtype = "bfloat16"  # f32 parameters, bf16 matmuls (vit_jax/models/layers.py)
  return c
