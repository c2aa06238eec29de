r"""ViT from scratch on ImageNet-21k or ImageNet-1k with the published recipe (docs/reference.md).

  python -m vit_jax.main --config=configs/imagenet_scratch.py:imagenet21k,ViT-B/16 \
      --workdir=workdirs/i21k_b16 --config.dataset.data_dir=gs://your-bucket/tfds

Arg: `<imagenet21k|imagenet1k>,<model>` (a ViT, a hybrid such as R50+ViT-B/16, or BiT-R50x1). Adam (b1 0.9, b2 0.999), batch 4096, lr 1e-3 with 10k
linear warm-up steps then linear decay, weight decay 0.03 (decoupled, kernels only), dropout 0.1,
a representation layer, head bias -10, 90 epochs (21k) / 300 epochs (1k), 224 px.
Result: not run here (no accelerator, no data); the paper's ViT-B/16 from scratch on ImageNet-1k
reaches 77.9% top-1 (Table 5), ImageNet-21k pre-training then fine-tuning 83.97%.
"""
from configs import common

WIDTHS = {"Ti": 192, "S": 384, "B": 768, "L": 1024, "H": 1280}


def get_config(arg: str = "imagenet21k,ViT-B/16"):
  dataset, model_name = (arg.split(",") + ["ViT-B/16"])[:2]
  if dataset not in ("imagenet21k", "imagenet1k"):
    raise ValueError(f"Unknown dataset {dataset!r}; use imagenet21k or imagenet1k.")
  ds = common.DATASETS[dataset]
  c = common.base_config()
  c.model_name = model_name
  c.model.head_bias_init = -10.0
  if not model_name.startswith("BiT-"):  # ViTs and hybrids; BiT ResNets have none of these
    c.model.dropout_rate = 0.1
    # The representation layer is as wide as the model (ViT-B: 768).
    c.model.representation_size = WIDTHS[model_name.split("-")[1].split("/")[0]]
    c.model.scan = True
  c.dataset.name = ds["name"]
  c.train_split, c.eval_split = ds["train"], ds["test"]
  c.pp_train = "decode|inception_crop(224)|flip_lr|value_range(-1,1)"
  c.pp_eval = "decode|resize(256)|central_crop(224)|value_range(-1,1)"
  c.batch_size = 4096
  c.eval_batch_size = 4096
  c.total_epochs = 90 if dataset == "imagenet21k" else 300
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 1000
  c.optax.name = "adam"
  c.lr.base = 1e-3
  c.lr.warmup_steps = 10_000
  c.lr.decay = "linear"
  c.wd = 0.03
  c.grad_clip_norm = 1.0
  return c
