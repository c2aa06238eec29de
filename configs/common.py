"""The keys every config has (the trainer reads each of them), and shared tables.

Durations are given as `X_steps`, `X_epochs` or `X_examples` (set exactly one of each group; the
others stay None) for X in total, lr.warmup, log_every, eval_every and checkpoint_every.
"""
import ml_collections
from ml_collections import config_dict

# TFDS data sets: name, training split, the validation split carved from the training data (or
# the data set's own), and the test split (evaluated once, at the end).
DATASETS = {
    # Fashion-MNIST: the last 6,000 training images are the validation split.
    "fashion_mnist": dict(name="fashion_mnist", train="train[:54000]", val="train[54000:]",
                          test="test"),
    "cifar10": dict(name="tfds:cifar10", train="train[:98%]", val="train[98%:]", test="test"),
    "cifar100": dict(name="tfds:cifar100", train="train[:98%]", val="train[98%:]", test="test"),
    "pets": dict(name="tfds:oxford_iiit_pet", train="train[:98%]", val="train[98%:]",
                 test="test"),
    "flowers": dict(name="tfds:oxford_flowers102", train="train", val="validation", test="test"),
    "imagenet1k": dict(name="tfds:imagenet2012", train="train[:99%]", val="train[99%:]",
                       test="validation"),
}


def _durations(cfg, prefix):
  for unit, kind in (("steps", int), ("epochs", float), ("examples", int)):
    cfg[f"{prefix}_{unit}"] = config_dict.placeholder(kind)


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_name = "ViT-B/16"
  c.model = ml_collections.ConfigDict()  # overrides of the named model's fields

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.data_dir = config_dict.placeholder(str)
  c.dataset.manual_dir = config_dict.placeholder(str)  # TFDS data sets downloaded by hand
  c.dataset.prepare = ""  # how to get the data set: said when it is missing
  c.dataset.channels = 3  # image_folder: what images decode to (1 grey, 3 RGB)
  c.dataset.image_key = "image"  # TFDS feature names
  c.dataset.label_key = "label"
  c.dataset.shuffle_buffer = 50_000  # TFDS: records in the per-host shuffle buffer
  c.dataset.tfds_fallback = True  # fashion_mnist: TFDS when Debian's files are missing
  c.dataset.tfds_data_dir = config_dict.placeholder(str)  # ... and its TFDS data_dir
  # Choices are made on eval_split, carved from the training data by default (metrics `val_*`);
  # the test split is evaluated once, at the end (metrics `final_test_*`, result `test_*`).
  c.train_split = "train[:98%]"
  c.eval_split = "train[98%:]"  # evaluated during training (every eval_every) and at the end
  c.test_split = "test"  # evaluated once, at the end only ("" skips it)
  c.pp_train = "decode|value_range(-1,1)"
  c.pp_eval = "decode|value_range(-1,1)"
  c.mixup = 0.0
  c.cutmix = 0.0  # CutMix Beta(a, a); 0 disables it. With mixup too: one of them per batch (1/2)
  # Repeated augmentation (DeiT: 3): each example `repeated_aug` times per batch, augmented
  # independently (in-memory data sets; see data.train_iterator).
  c.repeated_aug = 1
  c.batch_size = 512
  c.eval_batch_size = 512

  _durations(c, "total")
  _durations(c, "log_every")
  _durations(c, "eval_every")
  _durations(c, "checkpoint_every")
  c.keep_checkpoints = 2
  # Saves are written by a background thread while training goes on (orbax's async
  # checkpointing; still atomic). False: the step waits for each save to be on disk.
  c.checkpoint_async = True

  # name: sgd | momentum | adam | adamw, each what optax's optimizer of that name does
  # (vit_jax/optim.py): sgd has no momentum unless `momentum` is set, momentum's default is 0.9,
  # adam has no weight decay (wd > 0 with it is an error), adamw decays decoupled.
  c.optax = ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.999))
  c.optax.momentum = config_dict.placeholder(float)
  c.lr = ml_collections.ConfigDict(dict(base=1e-3, decay="cosine", end=0.0))
  _durations(c.lr, "warmup")
  # Decoupled weight decay p <- p - lr(t) * wd * p: multiplied by the learning rate, as optax's
  # adamw and torch's AdamW do; big_vision multiplies its wd by the schedule only, so its wd is
  # ours times lr.base (its 1e-4 at lr 1e-3 is our 0.1).
  c.wd = 0.0
  c.wd_mask = r".*/kernel"  # decoupled weight decay on kernels only
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.freeze = ""  # regex of frozen parameters
  # The task (vit_jax/tasks/): "classification" (softmax cross-entropy on one-hot labels;
  # evaluation: top-1), "detr" (DETR's set loss on boxes and labels, vit_jax/detection/loss.py: a
  # DETR model on a detection data set; evaluation: COCO-style mAP) or "generation" (an
  # autoregressive ImageTransformer-*'s likelihood of the intensities; evaluation: bits/dim). `detr` holds the weights of its
  # terms (DETR's): "no object" class weight, class, L1 and GIoU weights (matching cost and
  # loss), and the auxiliary losses of the earlier decoder layers.
  c.loss = "classification"
  c.detr = ml_collections.ConfigDict(dict(eos_coef=0.1, class_weight=1.0, bbox_weight=5.0,
                                          giou_weight=2.0, aux=True))

  c.parallel = "jit"  # jit (NamedSharding over the mesh) | pmap
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1: all that is left
  c.sharding = ml_collections.ConfigDict(dict(min_fsdp_size=2 ** 14, rules=()))
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)
  c.distributed.local_device_ids = config_dict.placeholder(str)  # "0,1,2,3" | "all"
  c.distributed.cpu_collectives = "gloo"  # cross-process collectives of CPU devices
  # How long JAX's coordination service waits for a silent process before stopping the others
  # with an error naming it, and at start-up / shutdown (unset: JAX's 100, 300 and 300 s).
  c.distributed.heartbeat_timeout_seconds = config_dict.placeholder(int)
  c.distributed.initialization_timeout = config_dict.placeholder(int)
  c.distributed.shutdown_timeout_seconds = config_dict.placeholder(int)

  # The evaluators run every eval_every and at the end, in this order (vit_jax/train.py's
  # EVALUATORS): "task", the task's own on eval_split (top-1 and loss; mAP for loss="detr"), and
  # "fewshot", the linear probes below (nothing while fewshot.shots is empty).
  c.evals = ("task", "fewshot")

  # Few-shot linear evaluation on frozen pre-logits features (the ViT paper's estimator, as
  # big_vision's evaluators/fewshot_lsr.py computes it: vit_jax/evaluators/fewshot.py), run every
  # eval_every and at the end; empty `shots` disables it (big_vision's: (1, 5, 10, 25)).
  c.fewshot = ml_collections.ConfigDict()
  c.fewshot.shots = ()
  # The probe's data set, with the fields of `dataset` (unset ones take their defaults), e.g.
  # --config.fewshot.dataset.name=tfds:cifar100; name None: the training data set (`dataset`).
  # The splits below are of this data set.
  c.fewshot.dataset = ml_collections.ConfigDict(
      {k: config_dict.placeholder(c.dataset.get_type(k)) for k in c.dataset.keys()})
  c.fewshot.train_split = "train[:98%]"  # the probe is a choice too: never the test split
  c.fewshot.test_split = "train[98%:]"
  c.fewshot.l2_reg = 2.0 ** 10  # big_vision's, on features standardised per dimension
  c.fewshot.num_trials = 3  # random support sets per k, averaged (big_vision's num_seeds)

  # An exponential moving average of the parameters and of the BatchNorm statistics (0: off),
  # updated after every step, evaluated beside the raw weights (metrics prefixed `ema_`) and
  # exported as params_ema.npz (and batch_stats_ema.npz).
  c.ema_decay = 0.0
  # Distillation (DeiT): a frozen teacher sees the same augmented batch; `teacher` is a workdir
  # of ours or any vit_jax.pretrained source ("" disables it), `model` names an .npz teacher's
  # model. type "hard" (DeiT's default, alpha 0.5) or "soft" (DeiT: alpha 0.1, tau 3).
  c.distill = ml_collections.ConfigDict(dict(teacher="", model="", type="hard", alpha=0.5,
                                             tau=1.0))

  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.path = config_dict.placeholder(str)
  c.pretrained.strict = True
  c.pretrained.required = False  # True: a run without pretrained.path is an error (fine-tuning)
  c.export_npz = True
  return c
