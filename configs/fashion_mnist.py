r"""Fashion-MNIST from scratch on a CPU: the README's `make demo`.

  python -m vit_jax.main --config=configs/fashion_mnist.py:demo --workdir=workdirs/demo

Args (after the colon): `demo` (the default: the `hybrid` root under a wider, shallower ViT: width
192, MLP 768, 6 heads, 3 layers, 8 epochs), `hybrid` (ViT-Mu/7 on a 16-channel 3x3 ResNet root,
1.29M parameters, 42.8 MFLOPs per image forward), `vit` (pure ViT-Mu/7, 1.20M parameters, 39.5
MFLOPs), `resnet` (a 0.22M-parameter BiT ResNet, stages (2,2,2), 52.0 MFLOPs), `swin` (a
two-stage Swin). `vit` and `hybrid` were sized for about 10 minutes of training on the 2-core Zen 4
machine of the earlier sessions (2D sin-cos position embeddings, no augmentation); `resnet` and
`swin` are not tuned, nor are `deit`, `pvt`, `cvt` and `t2t` (small versions of ViT's
successors, see MODELS), nor `vit_relbias`, `vit_rope` (relative positions) and `resnet_attn`
(non-local block and attention-augmented convolutions), nor `sasa` and `axial` (ResNets whose 3x3
convolutions are local or axial self-attention).

Validation discipline: training uses the first 54,000 training images; choices are made on the
last 6,000 (`val_*` metrics); the 10,000 test images are evaluated once, at the end
(`final_test_*`). Recipe search for `demo` (experiments/demo_search.py, 2 epochs each, validation
accuracy): `hybrid` 88.45%, `demo` 88.88%, `demo` at batch 256 and lr 3e-3 87.92%.
Measured on this session's machine (2 cores, AVX2 only: about half the earlier machine's img/s),
with `make test` running beside it for most of the run: `demo`, 7 epochs of 54,000 images: final
validation accuracy 90.48%, test accuracy 90.14% (once, at the end); validation per epoch 83.48,
86.82, 88.10, 88.77, 89.03, 90.13, 90.48; 2954 steps at 165 img/s under that load (`hybrid` ran at
260 img/s here when quiet: at that rate ~24 minutes of training, over the 10-minute budget on
this machine). Not met: 91% within 10 training minutes.
`demo` at 8 epochs (the 12-minute budget of the issue on the task interface), `make demo` in a
fresh clone on a quiet 2-core AMD EPYC with AVX-512: 3376 steps in 714 s of training (605 img/s),
validation 90.48%, test 89.89% (2026-12-06). Not met: 90.5% test within 12 training minutes.

The figures below were measured before the validation split existed (training on all 60,000
images, choices made on the test split) on the earlier, faster machine:
Measured on this project's 2-core AMD EPYC machine, quiet, all 10,000 test images:
- `hybrid` (4.75 epochs): test accuracy 0.8949; trained 2228 steps in 566 s (504 img/s; 590 s in
  all). `make demo` on a fresh clone: 0.8949 again, in 583 s (489 img/s; 636 s in all).
- `vit` (5 epochs, `--config.eval_every_epochs=1`): test accuracy 0.8809; per epoch 79.6, 83.2,
  85.7, 87.3, 88.1; trained 2345 steps in 534 s (562 img/s; 607 s in all with start-up and
  evaluation).
Not met: issue #3's 91% (default) and 89% (pure ViT) within 10 training minutes.
Before the recipe dropped flips and learned position embeddings: `hybrid` 0.8931 (4.75 epochs,
567 s), `vit` 0.8741 (4.5 epochs, 475 s; per epoch 78.4, 81.1, 85.3, 87.3). What each change was
worth for `vit` after 2 epochs (full cosine schedule, one seed): flips and learned position
embeddings 84.90%; no flips 85.49%; sin-cos position embeddings 85.40%; lr 1e-3 84.42%, 4e-3
83.58%, 3e-3 with b2=0.98 84.39%; wd 0 84.65%. `hybrid` after 2 epochs: 87.08%; a 32-channel
root 87.20% at 1.15x the step time.
Other runs on the way (same data; "loaded" = the machine shared with 4-7 other jobs):
- `hybrid`, 7 epochs at batch 256, scanned: 89.88% (89.96% after epoch 6; 2133 s loaded).
- `vit`, 7 epochs at batch 256, scanned: 87.71% (loaded). 5 epochs with pad-2 random crops and
  label smoothing 0.1: 85.06% (loaded): crops and smoothing slow short runs down.
- ViT with 4x4 patches (49 tokens), width 96, 4 layers, 4.5 epochs: 87.23%; the same on a
  32-channel root (a hybrid), 4 epochs: 88.51%. Both cost ~1.6x the 7x7-patch model per image.
- `resnet`, 1 epoch with crops and label smoothing 0.1: 74.74% (loaded; XLA:CPU convolutions make
  it the slowest per image).
"""
from configs import common

# A ResNet root on 28x28x1 without down-sampling (3x3 stride-1 conv, 16 channels).
SMALL_ROOT = dict(num_layers=(), base_width=16, root="small", gn_groups=4)

MODELS = {
    # arg: (model_name, overrides, epochs, lr). Epochs fill 10 minutes of training on 2 CPU cores
    # at the measured 562 img/s (`vit`) and 504 img/s (`hybrid`), batch 128. Unrolled layers: on
    # this CPU they ran faster than scanned ones (669 vs 541 img/s at batch 256, one comparison).
    "vit": ("ViT-Mu/7", dict(classifier="gap", posemb="sincos2d"), 5, 2e-3),
    "hybrid": ("ViT-Mu/7", dict(classifier="gap", posemb="sincos2d", resnet=SMALL_ROOT), 4.75,
               2e-3),
    # The demo: the same root under a wider, shallower ViT (ViT-Ti's width 192, MLP 768, 6 heads,
    # 3 layers), chosen on the validation split (experiments/demo_search.py, 2 epochs: 88.88%
    # against 88.45% for `hybrid`), and faster per image than `hybrid`.
    "demo": ("ViT-Mu/7", dict(hidden_size=192, mlp_dim=768, num_heads=6, num_layers=3,
                              classifier="gap", posemb="sincos2d", resnet=SMALL_ROOT), 8, 2e-3),
    "resnet": ("BiT-R26x1", dict(num_layers=(2, 2, 2), base_width=16, root="small",
                                 gn_groups=8), 7, 2e-3),
    "swin": ("Swin-T", dict(embed_dim=48, depths=(2, 4), num_heads=(3, 6), patch_size=2,
                            window_size=7, img_size=28, droppath_rate=0.1), 7, 2e-3),
    # ViT's successors at CPU size (not tuned): DeiT-Mu/7 with the distillation token (set
    # --config.distill.teacher=WORKDIR to distil; without a teacher both heads learn the labels),
    # PVT v2 (overlapping patch embeddings, spatial-reduction attention; 7, 4, 2, 1 px stages),
    # CvT (convolutional embeddings and projections, BatchNorm), T2T-ViT (tokens-to-token).
    "deit": ("DeiT-Mu/7-distilled", dict(droppath_rate=0.0), 5, 2e-3),
    "pvt": ("PVTv2-B0", dict(hidden_sizes=(32, 64, 96, 128), depths=(1, 1, 2, 1),
                             num_heads=(1, 2, 3, 4), sr_ratios=(4, 2, 1, 1)), 5, 2e-3),
    "cvt": ("CvT-13", dict(embed_dims=(32, 64, 128), depths=(1, 1, 2), num_heads=(1, 2, 4)),
            5, 2e-3),
    "t2t": ("T2T-ViT-14", dict(embed_dim=128, depth=4, num_heads=4, token_dim=32), 5, 2e-3),
    # Relative positions (not tuned): `vit` with a learned 2-D relative position bias per head and
    # layer (BEiT/Swin) or with axial 2-D rotary embeddings (RoPE-ViT) instead of sin-cos; and
    # `resnet` with a non-local block after the last stage's first unit (Wang et al.) and
    # attention-augmented 3x3 convolutions in stages 2-3 (Bello et al.; 2 heads at this width).
    "vit_relbias": ("ViT-Mu/7", dict(classifier="gap", posemb="relbias"), 5, 2e-3),
    "vit_rope": ("ViT-Mu/7", dict(classifier="gap", posemb="rope2d"), 5, 2e-3),
    "resnet_attn": ("BiT-R26x1", dict(num_layers=(2, 2, 2), base_width=16, root="small",
                                      gn_groups=8, nonlocal_units=((3, 1),), aa_stages=(2, 3),
                                      aa_heads=2), 7, 2e-3),
    # Attention in place of every 3x3 conv (not tuned): stand-alone local self-attention (7x7
    # windows, relative row/column embeddings; Ramachandran et al.) and position-sensitive axial
    # attention (whole columns then rows; Axial-DeepLab), on the 3x3 stride-1 BatchNorm root.
    "sasa": ("SASA-ResNet-26", dict(num_layers=(1, 1, 1), base_width=16, num_heads=4,
                                    root="small"), 5, 2e-3),
    "axial": ("Axial-ResNet-S", dict(num_layers=(1, 1, 1), base_width=16, num_heads=4, span=28,
                                     root="small"), 5, 2e-3),
}


DEFAULT = "demo"  # the demo's model


def get_config(arg: str = DEFAULT):
  arg = arg or DEFAULT
  if arg not in MODELS:
    raise ValueError(f"Unknown fashion_mnist config arg {arg!r}; known: {', '.join(MODELS)}")
  name, overrides, epochs, lr = MODELS[arg]
  c = common.base_config()
  c.model_name = name
  c.model.update(overrides)
  data = common.DATASETS["fashion_mnist"]
  c.dataset.name = data["name"]
  # Choices are made on the validation split (the last 6,000 training images, evaluated during
  # training and at the end as `val_*`); the 10,000 test images are evaluated once, at the end
  # (`final_test_*`).
  c.train_split, c.eval_split, c.test_split = data["train"], data["val"], data["test"]
  c.fewshot.train_split, c.fewshot.test_split = data["train"], data["val"]
  # Short runs underfit: no augmentation, no label smoothing (see the results above).
  c.pp_train = "decode|value_range(-1,1)"
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
