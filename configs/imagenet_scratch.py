r"""ImageNet-scale training from scratch with published recipes (docs/reference.md, "Training
recipes").

  python -m vit_jax.main --config=configs/imagenet_scratch.py:imagenet1k,ViT-B/16 \
      --workdir=workdirs/i1k_b16 --config.dataset.data_dir=gs://your-bucket/tfds

Arg: `<data>,<model>[,recipe=...][,epochs=N][,aug=...]` with data `imagenet1k` (TFDS imagenet2012,
which needs the manual download: see `PREPARE`) or `imagenet21k` (an image folder you prepare).
Recipes, each as its source reports it:
- `recipe=vit` (default): the ViT paper (Dosovitskiy et al. 2021), Appendix B.1 Table 3. Batch
  4096, Adam (0.9, 0.999), 10k warm-up steps, 224 px, dropout 0.1, a representation layer.
  ImageNet-1k: 300 epochs, lr 3e-3, cosine decay, weight decay 0.3, global-norm clipping at 1.
  ImageNet-21k: 90 epochs (ViT-L: 30 or 90, `epochs=`), lr 1e-3, linear decay, weight decay 0.03.
  Reported (Table 5; after fine-tuning at 384 px, the paper gives no 224-px number for these
  runs): ImageNet-1k pre-training B/32 73.38, B/16 77.91, L/32 71.16, L/16 76.53; ImageNet-21k
  pre-training B/32 81.28, B/16 83.97, L/32 80.99, L/16 85.15 (ImageNet top-1).
- `recipe=plain`: "Better plain ViT baselines for ImageNet-1k" (Beyer et al. 2022; big_vision
  `configs/vit_s16_i1k.py`): ViT-S/16, global average pooling, 2-D sin-cos position embeddings,
  a representation layer, batch 1024, Adam, lr 1e-3, 10k warm-up, cosine, weight decay 1e-4 in
  big_vision's convention (decay not scaled by lr: 0.1 here), clipping at 1, inception crop +
  flip + RandAugment(2, 10), mixup 0.2. `epochs=90|150|300`: reported 76.5 / 78.5 / 80.0% top-1
  on the ImageNet validation set at 224 px.
- `recipe=swin` (Swin-T/S/B; the default for a Swin name): Swin's ImageNet-1k recipe (Liu et al.
  2021, Sec. 4.1 and Appendix A2.1; their code's configs for the clipping): AdamW, batch 1024, lr
  1e-3, 300 epochs, cosine decay, 20 warm-up epochs, weight decay 0.05 (PyTorch's AdamW
  convention, which is optax's), gradient clipping at 5, stochastic depth 0.2 / 0.3 / 0.5 for
  T / S / B, label smoothing 0.1, and DeiT's augmentation without repeated augmentation or EMA:
  inception crop + flip + RandAugment(2, 9) + random erasing 0.25, mixup 0.8 / CutMix 1.0.
  Reported (224 px, ImageNet top-1): Swin-T 81.3, Swin-S 83.0, Swin-B 83.5 (the paper's Table
  1a); 81.2, 83.2, 83.5 (the official repository's model zoo).
- `aug=none|light1|light2|medium1|medium2|strong1|strong2` (with `recipe=augreg`): the AugReg
  presets ("How to train your ViT", Steiner et al. 2022; big_vision `configs/vit_i1k.py`):
  RandAugment(2, m) with m = 0/0/10/15/15/20/20 and mixup 0/0/0.2/0.2/0.5/0.5/0.8 (none: neither),
  `reg=0.1` adds dropout and stochastic depth 0.1 (the paper's "reg"). Batch 4096, 300 epochs
  (ImageNet-21k: 30 or 300, `epochs=`), Adam, lr 1e-3, cosine, 10k warm-up, weight decay 1e-4 in
  big_vision's convention (0.1 here), class token. The default preset per model is big_vision's.

Weight decay here is optax's: p <- p - lr(t) * wd * p. The ViT paper's values are in this form;
big_vision multiplies its wd by the schedule but not by the base lr, so its 1e-4 at lr 1e-3 is 0.1.

Validation discipline: ImageNet-1k trains on `train[:99%]`, chooses on `train[99%:]` ("minival",
eval_split, during training) and evaluates the official validation set once at the end
(`test_split`). ImageNet-21k holds out the images you move to `holdout/` (see PREPARE).
Result: not run here (no accelerator, no data).
"""
from configs import common

WIDTHS = {"Ti": 192, "S": 384, "B": 768, "L": 1024, "H": 1280}
PREPARE = {
    "imagenet1k": (
        "ImageNet-1k (TFDS imagenet2012) needs a manual download: get ILSVRC2012_img_train.tar "
        "and ILSVRC2012_img_val.tar from https://image-net.org (free for research after "
        "registration), put them in a folder, pass --config.dataset.manual_dir=FOLDER and a "
        "--config.dataset.data_dir to write the prepared data set to (or run `tfds build "
        "imagenet2012 --manual_dir=FOLDER --data_dir=DIR` once)."),
    "imagenet21k": (
        "ImageNet-21k is not a TFDS data set: download winter21_whole.tar.gz from "
        "https://image-net.org, then: D=/data/imagenet21k; mkdir -p $D/train $D/holdout; "
        "tar -xf winter21_whole.tar.gz -C $D/train; cd $D/train; for t in *.tar; do "
        "c=${t%.tar}; mkdir -p $c ../holdout/$c; tar -xf $t -C $c; rm $t; "
        "ls $c | head -n 3 | xargs -I{} mv $c/{} ../holdout/$c/; done; and pass "
        "--config.dataset.data_dir=$D."),
}
DATA = {
    "imagenet1k": dict(name="tfds:imagenet2012", train="train[:99%]", val="train[99%:]",
                       test="validation"),
    "imagenet21k": dict(name="image_folder", train="train", val="holdout", test=""),
}
# ViT paper, Table 3: (epochs, lr, decay, wd) per data set; ViT-L on ImageNet-21k: 30 or 90.
VIT_PAPER = {"imagenet1k": (300, 3e-3, "cosine", 0.3), "imagenet21k": (90, 1e-3, "linear", 0.03)}
# AugReg (big_vision configs/vit_i1k.py): preset -> (RandAugment magnitude or None, mixup).
AUGREG = {"none": (None, 0.0), "light1": (0, 0.0), "light2": (10, 0.2), "medium1": (15, 0.2),
          "medium2": (15, 0.5), "strong1": (20, 0.5), "strong2": (20, 0.8)}
AUGREG_DEFAULT = {"Ti/16": "light1", "S/32": "light2", "S/16": "medium2", "B/32": "medium2",
                  "B/16": "medium2", "L/16": "medium2"}
SWIN_DROPPATH = {"T": 0.2, "S": 0.3, "B": 0.5}  # Swin, Appendix A2.1
PLAIN_EPOCHS = {90: 76.5, 150: 78.5, 300: 80.0}  # reported top-1 (%)
TRAIN_PP = "decode|inception_crop(224)|flip_lr"
EVAL_PP = "decode|resize_small(256)|central_crop(224)|value_range(-1,1)"


def get_config(arg: str = "imagenet1k,ViT-B/16"):
  data, model_name, opts = _parse(arg)
  is_swin = model_name.startswith("Swin-")
  recipe = opts.get("recipe", "swin" if is_swin else "vit")
  if recipe not in ("vit", "plain", "augreg", "swin"):
    raise ValueError(f"Unknown recipe {recipe!r}: use vit, plain, augreg or swin.")
  if (recipe == "swin") != is_swin:
    raise ValueError(f"recipe={recipe} is not for {model_name}: Swin models train with "
                     "recipe=swin, the others with vit, plain or augreg.")
  d = DATA[data]
  c = common.base_config()
  c.model_name = model_name
  c.dataset.name = d["name"]
  c.dataset.prepare = PREPARE[data]
  c.train_split, c.eval_split, c.test_split = d["train"], d["val"], d["test"]
  c.pp_train = TRAIN_PP + "|value_range(-1,1)"
  c.pp_eval = EVAL_PP
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000
  c.optax.name = "adamw"  # the papers' "Adam" with decoupled weight decay
  c.lr.warmup_steps = 10_000
  c.grad_clip_norm = 1.0
  variant = model_name.split("-", 1)[1] if "-" in model_name else model_name
  is_vit = "ViT-" in model_name  # ViT-B/16, R50+ViT-B/16; not BiT-, NL-/AA-ResNet- or Swin-
  if is_vit:
    c.model.representation_size = WIDTHS[variant.split("/")[0]]
    c.model.scan = True

  if recipe == "vit":
    epochs, lr, decay, wd = VIT_PAPER[data]
    c.batch_size = c.eval_batch_size = 4096
    c.total_epochs = float(opts.get("epochs", epochs))
    c.lr.base, c.lr.decay, c.wd = lr, decay, wd
    if data == "imagenet21k":
      c.grad_clip_norm = 0.0  # Table 3's note: clipping for ImageNet(-1k) only.
    if is_vit:
      c.model.dropout_rate = 0.1
  elif recipe == "plain":
    epochs = int(opts.get("epochs", 90))
    if epochs not in PLAIN_EPOCHS:
      raise ValueError(f"recipe=plain has epochs {sorted(PLAIN_EPOCHS)}, not {epochs}.")
    c.batch_size = c.eval_batch_size = 1024
    c.total_epochs = float(epochs)
    c.lr.base, c.lr.decay, c.wd = 1e-3, "cosine", 0.1  # big_vision's wd 1e-4 / lr 1e-3
    c.model.update(classifier="gap", posemb="sincos2d")
    c.pp_train = TRAIN_PP + "|randaug(2,10)|value_range(-1,1)"
    c.mixup = 0.2
  elif recipe == "swin":
    c.batch_size = c.eval_batch_size = 1024
    c.total_epochs = float(opts.get("epochs", 300))
    c.optax.name = "adamw"
    c.lr.base, c.lr.decay, c.wd = 1e-3, "cosine", 0.05
    c.lr.warmup_steps = None
    c.lr.warmup_epochs = 20.0
    c.grad_clip_norm = 5.0
    c.label_smoothing = 0.1
    c.model.droppath_rate = SWIN_DROPPATH[model_name.split("-", 1)[1]]
    c.pp_train = TRAIN_PP + "|randaugment(2, 9)|value_range(-1,1)|random_erase(0.25)"
    c.mixup, c.cutmix = 0.8, 1.0
  else:  # augreg
    preset = opts.get("aug") or AUGREG_DEFAULT.get(variant, "medium2")
    if preset not in AUGREG:
      raise ValueError(f"Unknown AugReg preset {preset!r}; known: {', '.join(AUGREG)}.")
    magnitude, mixup = AUGREG[preset]
    c.batch_size = c.eval_batch_size = 4096
    c.total_epochs = float(opts.get("epochs", 300))
    c.lr.base, c.lr.decay, c.wd = 1e-3, "cosine", 0.1
    randaug = "" if magnitude is None else f"|randaug(2,{magnitude})"
    c.pp_train = TRAIN_PP + randaug + "|value_range(-1,1)"
    c.mixup = mixup
    reg = float(opts.get("reg", 0.0))
    if reg and is_vit:
      c.model.update(dropout_rate=reg, droppath_rate=reg)
  # The papers' probe (big_vision's fewshot_lsr): 1/5/10/25-shot linear regression on ImageNet-1k
  # features, shots drawn from the first 100k training images, tested on minival. ImageNet-21k
  # runs probe ImageNet-1k as a separate data set (prepared as PREPARE["imagenet1k"] says).
  c.fewshot.shots = (1, 5, 10, 25)
  c.fewshot.train_split = "train[:100000]"
  c.fewshot.test_split = "train[99%:]"
  if data == "imagenet21k":
    c.fewshot.dataset.name = "tfds:imagenet2012"
    c.fewshot.dataset.prepare = PREPARE["imagenet1k"]
  return c


def _parse(arg: str):
  """'imagenet1k,ViT-B/16,recipe=plain,epochs=150' -> ('imagenet1k', 'ViT-B/16', {...})."""
  parts = [p.strip() for p in (arg or "imagenet1k,ViT-B/16").split(",") if p.strip()]
  positional = [p for p in parts if "=" not in p]
  opts = dict(p.split("=", 1) for p in parts if "=" in p)
  data = positional[0] if positional else "imagenet1k"
  model_name = positional[1] if len(positional) > 1 else (
      "ViT-S/16" if opts.get("recipe") == "plain" else "ViT-B/16")
  if data not in DATA:
    raise ValueError(f"Unknown data {data!r}; use imagenet1k or imagenet21k.")
  unknown = set(opts) - {"recipe", "epochs", "aug", "reg"}
  if unknown:
    raise ValueError(f"Unknown option(s) {sorted(unknown)}; known: recipe, epochs, aug, reg.")
  return data, model_name, opts
