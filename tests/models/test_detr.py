"""Tests for vit_jax/models/detr.py: parameter counts, sine encodings and masks by hand, the
padding mask, shapes of every output, and parity with transformers' DetrForObjectDetection."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import detr

# transformers' DetrForObjectDetection with use_timm_backbone=False, backbone=None,
# use_pretrained_backbone=False, backbone_config=ResNetConfig(out_features=["stage4"]) and the
# rest of DetrConfig's defaults (2 labels): model.num_parameters(). Its frozen BatchNorms are
# buffers, not parameters; ours are in batch_stats.
DETR_R50_PARAMS = 41_501_895


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_detr_r50_count_equals_transformers():
  model = models.get_model("DETR-R50", num_classes=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
  assert _count(shapes["params"]) == DETR_R50_PARAMS
  # Frozen BN: scale, bias, mean, var for the 53 BatchNorms of ResNet-50 (26,560 channels).
  assert set(shapes["batch_stats"]["backbone"]["stem_bn"]) == {"scale", "bias", "mean", "var"}
  assert _count(shapes["batch_stats"]) == 4 * 26_560


def test_downsample_mask_picks_as_torch_nearest():
  mask = jnp.asarray(np.arange(7)[None, :, None] * np.ones((1, 1, 3)) < 5)  # rows 0..4 real
  out = np.asarray(detr.downsample_mask(mask, 4, 3))
  # 7 -> 4 rows: source rows floor(i * 1.75) = 0, 1, 3, 5.
  np.testing.assert_array_equal(out[0, :, 0], [True, True, True, False])


def test_sine_position_encoding_by_hand():
  mask = np.ones((1, 3, 4), bool)
  mask[0, :, 3] = False  # a padded last column
  pe = np.asarray(detr.sine_position_encoding(jnp.asarray(mask), num_feats=4))
  assert pe.shape == (1, 3, 4, 8)
  scale, eps = 2 * math.pi, 1e-6
  dim_t = 10_000 ** (2 * (np.arange(4) // 2) / 4)  # 1, 1, 100, 100
  for i in range(3):
    for j in range(4):
      # Counts of real pixels above and to the left (inclusive), over the column's / row's total:
      # in the padded column y counts nothing (0), and x stays at the last real count.
      y = (i + 1) / (3 + eps) * scale if j < 3 else 0.0
      x = min(j + 1, 3) / (3 + eps) * scale
      want_y = [np.sin(y / dim_t[0]), np.cos(y / dim_t[1]), np.sin(y / dim_t[2]),
                np.cos(y / dim_t[3])]
      want_x = [np.sin(x / dim_t[0]), np.cos(x / dim_t[1]), np.sin(x / dim_t[2]),
                np.cos(x / dim_t[3])]
      np.testing.assert_allclose(pe[0, i, j], want_y + want_x, rtol=1e-5, atol=1e-6)


def test_masked_keys_do_not_matter_and_dropout_runs():
  att = detr.DetrAttention(num_heads=2, dropout_rate=0.5)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, n, 8)), jnp.float32) for n in (3, 5, 5))
  key_mask = jnp.array([[True, True, True, False, False]])
  variables = att.init(jax.random.PRNGKey(0), q, k, v, key_mask, deterministic=True)
  out = att.apply(variables, q, k, v, key_mask, deterministic=True)
  k2 = k.at[:, 3:].set(100.0)
  v2 = v.at[:, 3:].set(-100.0)
  np.testing.assert_allclose(att.apply(variables, q, k2, v2, key_mask, deterministic=True), out,
                             atol=1e-6)
  assert not np.allclose(att.apply(variables, q, k2, v2, None, deterministic=True), out)
  dropped = att.apply(variables, q, k, v, key_mask, deterministic=False,
                      rngs={"dropout": jax.random.PRNGKey(1)})
  assert np.isfinite(np.asarray(dropped)).all() and not np.allclose(dropped, out)


def test_mu_outputs_and_padding(random_variables):
  model = models.get_model("DETR-Mu", num_classes=10)
  # 64 px instead of the canvases' 128 keeps the compilation short; the shapes do not change.
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 1)), jnp.float32)
  variables = random_variables(model, images)
  assert set(variables) == {"params"}  # the BiT backbone has no BatchNorm
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(variables, images)
  assert out["logits"].shape == (2, 16, 11) and out["boxes"].shape == (2, 16, 4)
  assert out["aux_logits"].shape == (1, 2, 16, 11) and out["aux_boxes"].shape == (1, 2, 16, 4)
  assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
  # An all-True mask is the default; a padded one changes the outputs.
  full = apply(variables, images, jnp.ones((2, 64, 64), bool))
  np.testing.assert_allclose(full["logits"], out["logits"], atol=1e-6)
  mask = np.ones((2, 64, 64), bool)
  mask[1, :, 32:] = False
  padded = apply(variables, images, jnp.asarray(mask))
  np.testing.assert_allclose(padded["logits"][0], out["logits"][0], atol=1e-6)
  assert not np.allclose(padded["logits"][1], out["logits"][1], atol=1e-3)


def test_registry_and_errors():
  assert {"DETR-R50", "DETR-Mu"} <= set(models.known_names())
  assert models.get_model("DETR-Mu", num_classes=10, num_queries=8).num_queries == 8
  bad = models.get_model("DETR-Mu", num_classes=10, backbone="vit")
  with pytest.raises(ValueError, match="Unknown DETR backbone 'vit'; known: 'resnet'"):
    jax.eval_shape(lambda: bad.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1))))
  model = models.get_model("DETR-Mu", num_classes=10)
  with pytest.raises(ValueError, match=r"DETR mask has shape \(1, 32\); it needs \(B, H, W\)"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 1)),
                                      jnp.ones((1, 32), bool)))


def _hf_small():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.DetrConfig(
      use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
      backbone_config=transformers.ResNetConfig(out_features=["stage2"], depths=[1, 2],
                                                hidden_sizes=[32, 64], embedding_size=16),
      d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
      decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_queries=7,
      num_labels=5)
  torch.manual_seed(0)
  hf = transformers.DetrForObjectDetection(cfg).eval()
  with torch.no_grad():  # random everything, BatchNorm buffers included (init leaves some at 0/1)
    for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
      if name.endswith("num_batches_tracked"):
        continue
      if name.endswith("running_var"):
        t.copy_(torch.rand_like(t) + 0.5)
      elif name.endswith("weight") and t.ndim == 1:  # norm scales
        t.copy_(1 + 0.2 * torch.randn_like(t))
      elif "query_position" in name or (t.ndim == 2 and ("q_proj" in name or "k_proj" in name)):
        # Large enough for peaked cross-attention: otherwise every query attends uniformly and
        # all predictions are nearly the same box, a weak test of the decoder.
        t.copy_(torch.randn_like(t) * (1.0 if "query" in name else 3 / math.sqrt(t.shape[1])))
      else:
        t.copy_(torch.randn_like(t) * (0.1 if t.ndim == 1 else 1 / math.sqrt(t[0].numel())))
  return torch, cfg, hf


@pytest.mark.slow  # importing torch and transformers alone takes 20-35 s on this loaded machine
def test_parity_with_transformers_small_config():
  torch, cfg, hf = _hf_small()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  variables = detr.from_hf_state_dict(sd, cfg)
  model = detr.DETR(**detr.model_kwargs_from_hf(cfg))
  assert _count(variables["params"]) == hf.num_parameters()
  x = np.random.default_rng(0).normal(size=(2, 3, 70, 90)).astype(np.float32)
  mask = np.ones((2, 70, 90), np.int64)
  mask[1, 50:, :] = 0  # the second image is 50 x 61, padded
  mask[1, :, 61:] = 0
  with torch.no_grad():
    want = hf(pixel_values=torch.tensor(x), pixel_mask=torch.tensor(mask))
  got = jax.jit(model.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                             jnp.asarray(mask.astype(bool)))
  logits_diff = np.abs(np.asarray(got["logits"]) - want.logits.numpy()).max()
  boxes_diff = np.abs(np.asarray(got["boxes"]) - want.pred_boxes.numpy()).max()
  print(f"max abs diff: logits {logits_diff:.2e}, boxes {boxes_diff:.2e}")
  assert logits_diff < 1e-4 and boxes_diff < 1e-4, (logits_diff, boxes_diff)
  # Predictions that differ between queries and images by far more than the tolerance.
  assert want.pred_boxes.numpy().std(1).min() > 1e-3, want.pred_boxes.numpy().std(1)
  assert want.logits.numpy().std(1).min() > 1e-2
  assert np.abs(want.logits.numpy()[0] - want.logits.numpy()[1]).max() > 1e-2


@pytest.mark.slow  # torch
def test_converter_rejects_unknown_and_missing_keys():
  torch, cfg, hf = _hf_small()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  with pytest.raises(ValueError, match="Unconverted keys in the DETR state dict: .*extra"):
    detr.from_hf_state_dict(dict(sd, extra=np.zeros(1)), cfg)
  del sd["model.query_position_embeddings.weight"]
  with pytest.raises(ValueError, match="lacks 'model.query_position_embeddings.weight'"):
    detr.from_hf_state_dict(sd, cfg)
  cfg.position_embedding_type = "learned"
  with pytest.raises(ValueError, match="position_embedding_type='sine'"):
    detr.model_kwargs_from_hf(cfg)


@pytest.mark.slow
def test_count_equals_transformers_default_build():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.DetrConfig(use_timm_backbone=False, backbone=None,
                                use_pretrained_backbone=False,
                                backbone_config=transformers.ResNetConfig(out_features=["stage4"]))
  with torch.device("meta"):
    hf = transformers.DetrForObjectDetection(cfg)
  assert hf.num_parameters() == DETR_R50_PARAMS
  assert detr.model_kwargs_from_hf(cfg) == dict(detr.config_from_name("DETR-R50"),
                                                **_kwargs_r50_defaults())


def _kwargs_r50_defaults():
  fields = {f: getattr(detr.DETR, f) for f in (
      "hidden_size", "num_heads", "mlp_dim", "encoder_layers", "decoder_layers", "num_queries",
      "dropout_rate", "backbone", "resnet_depths", "resnet_widths", "resnet_stem_width")}
  return dict(fields, num_classes=2)


@pytest.mark.slow  # compiling the train step takes 1-2 minutes on this loaded 2-core machine
def test_mu_learns_on_canvases():
  """Model, canvases and the DETR loss together, as the trainer will run them: 15 AdamW steps
  on batches of 8 canvases lower the loss."""
  optax = pytest.importorskip("optax")
  from vit_jax.data import canvases
  from vit_jax.detection import loss as loss_lib
  ds = canvases.FashionMnistCanvases("train", seed=0, num_examples=120)
  model = models.get_model("DETR-Mu", num_classes=10)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 1)))["params"]
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adamw(3e-4, weight_decay=1e-4))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      out = model.apply({"params": p}, batch["image"], batch["image_mask"], train=True)
      return loss_lib.detr_loss(out, batch)
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for b in ds.batches(8, epochs=1):
    batch = dict(b, image=b["image"].astype(np.float32) / 127.5 - 1)
    params, opt, loss = step(params, opt, batch)
    losses.append(float(loss))
  assert len(losses) == 15 and np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3]), losses


def _legacy_name(key):
  """transformers 5 names -> those of the Hub's DETR checkpoints (transformers 4, timm ResNet)."""
  import re
  key = re.sub(r"layers\.(\d+)\.mlp\.fc", r"layers.\1.fc", key)
  key = key.replace(".o_proj.", ".out_proj.")
  key = key.replace("model.backbone.model.embedder.embedder.convolution.",
                    "model.backbone.model.conv1.")
  key = key.replace("model.backbone.model.embedder.embedder.normalization.",
                    "model.backbone.model.bn1.")
  key = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.",
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}.", key)
  key = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.",
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}.", key)
  key = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.",
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0.", key)
  key = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.",
               lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1.", key)
  return key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")


def test_legacy_timm_names_convert_to_the_same_variables():
  rng = np.random.default_rng(0)
  model = detr.DETR(num_classes=3, hidden_size=16, num_heads=2, mlp_dim=24, encoder_layers=1,
                    decoder_layers=2, num_queries=4, resnet_depths=(1, 2), resnet_widths=(32, 64),
                    resnet_stem_width=8)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  # A random state dict with transformers 5's names and shapes for this small model (those of
  # test_parity_with_transformers_small_config's model, written out so that no torch is needed).
  names = {
      "model.backbone.model.embedder.embedder.convolution.weight": (8, 3, 7, 7),
      "model.input_projection.weight": (16, 64, 1, 1), "model.input_projection.bias": (16,),
      "model.query_position_embeddings.weight": (4, 16),
      "class_labels_classifier.weight": (4, 16), "class_labels_classifier.bias": (4,),
      "model.decoder.layernorm.weight": (16,), "model.decoder.layernorm.bias": (16,)}
  bn = lambda p, c: {f"{p}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
  names.update(bn("model.backbone.model.embedder.embedder.normalization", 8))
  for s, (depth, width, c_in) in enumerate([(1, 32, 8), (2, 64, 32)]):
    for u in range(depth):
      p = f"model.backbone.model.encoder.stages.{s}.layers.{u}"
      cin = c_in if u == 0 else width
      for j, (o, i, k) in enumerate([(width // 4, cin, 1), (width // 4, width // 4, 3),
                                     (width, width // 4, 1)]):
        names[f"{p}.layer.{j}.convolution.weight"] = (o, i, k, k)
        names.update(bn(f"{p}.layer.{j}.normalization", o))
      if u == 0:
        names[f"{p}.shortcut.convolution.weight"] = (width, cin, 1, 1)
        names.update(bn(f"{p}.shortcut.normalization", width))
  for j, (o, i) in enumerate([(16, 16), (16, 16), (4, 16)]):
    names[f"bbox_predictor.layers.{j}.weight"], names[f"bbox_predictor.layers.{j}.bias"] = (
        (o, i), (o,))
  layer_parts = {"encoder": ("self_attn",), "decoder": ("self_attn", "encoder_attn")}
  norms = {"encoder": ("self_attn_layer_norm", "final_layer_norm"),
           "decoder": ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")}
  for part, n in (("encoder", 1), ("decoder", 2)):
    for i in range(n):
      p = f"model.{part}.layers.{i}"
      for att in layer_parts[part]:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
          names[f"{p}.{att}.{proj}.weight"], names[f"{p}.{att}.{proj}.bias"] = (16, 16), (16,)
      for norm in norms[part]:
        names[f"{p}.{norm}.weight"], names[f"{p}.{norm}.bias"] = (16,), (16,)
      names[f"{p}.mlp.fc1.weight"], names[f"{p}.mlp.fc1.bias"] = (24, 16), (24,)
      names[f"{p}.mlp.fc2.weight"], names[f"{p}.mlp.fc2.bias"] = (16, 24), (16,)
  sd = {k: rng.normal(size=v).astype(np.float32) for k, v in names.items()}
  cfg = dict(num_labels=3, d_model=16, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=24, decoder_ffn_dim=24, encoder_layers=1, decoder_layers=2,
             num_queries=4, dropout=0.1, position_embedding_type="sine",
             activation_function="relu", dilation=False, use_timm_backbone=False,
             backbone_config=dict(layer_type="bottleneck", hidden_act="relu",
                                  downsample_in_bottleneck=False,
                                  downsample_in_first_stage=False, depths=[1, 2],
                                  hidden_sizes=[32, 64], embedding_size=8,
                                  out_features=["stage2"]))
  modern = detr.from_hf_state_dict(sd, cfg)
  assert jax.tree.map(lambda x: x.shape, modern) == jax.tree.map(lambda x: x.shape,
                                                                 dict(shapes))
  legacy = detr.from_hf_state_dict({_legacy_name(k): v for k, v in sd.items()}, cfg)
  assert any("conv_encoder" in _legacy_name(k) for k in sd)
  jax.tree.map(np.testing.assert_array_equal, legacy, modern)


def test_hub_config_json_kwargs():
  # The fields of facebook/detr-resnet-50's config.json that the conversion reads (it has
  # id2label with 91 entries and no num_labels).
  cfg = dict(use_timm_backbone=True, backbone="resnet50", backbone_config=None, d_model=256,
             encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
             decoder_ffn_dim=2048, encoder_layers=6, decoder_layers=6, num_queries=100,
             dropout=0.1, position_embedding_type="sine", activation_function="relu",
             dilation=False, id2label={str(i): f"c{i}" for i in range(91)})
  kwargs = detr.model_kwargs_from_hf(cfg)
  assert kwargs == dict(_kwargs_r50_defaults(), num_classes=91)
  with pytest.raises(ValueError, match="timm backbones \\['resnet101', 'resnet50'\\]"):
    detr.model_kwargs_from_hf(dict(cfg, backbone="resnet18"))
