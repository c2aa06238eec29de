r"""Fashion-MNIST from scratch on a CPU: the README's `make demo`.

  python -m vit_jax.main --config=configs/fashion_mnist.py:hybrid --workdir=workdirs/demo

(results: being measured)
"""
from configs import common

# A ResNet root on 28x28x1 without down-sampling (3x3 stride-1 conv, 16 channels).
SMALL_ROOT = dict(num_layers=(), base_width=16, root="small", gn_groups=4)

MODELS = {
    # arg: (model_name, overrides, epochs, lr). Epochs fill about 10 minutes of training on 2 CPU
    # cores (~480 img/s for `vit`, ~370 img/s for `hybrid` at batch 128). Unrolled layers: on this
    # CPU they ran faster than scanned ones (669 vs 541 img/s at batch 256, one quiet comparison).
    "vit": ("ViT-Mu/7", dict(classifier="gap"), 4.5, 2e-3),
    "hybrid": ("ViT-Mu/7", dict(classifier="gap", resnet=SMALL_ROOT), 3.5, 2e-3),
    "resnet": ("BiT-R26x1", dict(num_layers=(2, 2, 2), base_width=16, root="small",
                                 gn_groups=8), 7, 2e-3),
    "swin": ("Swin-T", dict(embed_dim=48, depths=(2, 4), num_heads=(3, 6), patch_size=2,
                            window_size=7, img_size=28, droppath_rate=0.1), 7, 2e-3),
}


DEFAULT = "hybrid"  # the demo's model


def get_config(arg: str = DEFAULT):
  arg = arg or DEFAULT
  if arg not in MODELS:
    raise ValueError(f"Unknown fashion_mnist config arg {arg!r}; known: {', '.join(MODELS)}")
  name, overrides, epochs, lr = MODELS[arg]
  c = common.base_config()
  c.model_name = name
  c.model.update(overrides)
  c.dataset.name = "fashion_mnist"
  c.train_split, c.eval_split = "train", "test"
  # Short runs underfit: flips only, no label smoothing (see the results above).
  c.pp_train = "decode|flip_lr|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.batch_size = 128  # faster per image than 256 on 2 CPU cores, and twice the steps
  c.eval_batch_size = 1000
  c.total_epochs = epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.optax.name = "adamw"
  c.lr.base = lr
  c.lr.warmup_epochs = 0.5
  c.lr.decay = "cosine"
  c.wd = 0.05
  c.label_smoothing = 0.0
  return c
