"""Tests for vit_jax/pretrained.py: Hugging Face round trips per family, .npz round trips, the zoo,
resizing, mismatch reports and the optional `hf` extra."""
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax import npz
from vit_jax import pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # issue 18: "the same logits within 1e-4"
VIT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
           image_size=32, patch_size=8)


def randomise(model, seed=0):
  """Random weights of a useful scale (HF initialises norms to 1 and biases to 0), eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
  return model.eval()


def hf_model(family):
  t = transformers
  if family == "vit":
    return randomise(t.ViTForImageClassification(t.ViTConfig(**VIT, num_labels=5)))
  if family == "deit":
    return randomise(t.DeiTForImageClassification(t.DeiTConfig(**VIT, num_labels=5)))
  if family == "deit_distilled":
    return randomise(t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**VIT, num_labels=5)))
  if family == "swin":
    return randomise(t.SwinForImageClassification(t.SwinConfig(
        image_size=32, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4,
        num_labels=5)))
  if family == "bit":
    return randomise(t.BitForImageClassification(t.BitConfig(
        embedding_size=8, hidden_sizes=[32, 64], depths=[1, 2], num_groups=2, num_labels=5)))
  raise ValueError(family)


def images(n=2, size=32, seed=0):
  return np.random.RandomState(seed).randn(n, 3, size, size).astype(np.float32)  # NCHW


def torch_logits(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x)).logits.numpy()


def our_logits(model, params, x):
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1))))


FAMILIES = ["vit", "deit", "deit_distilled", "swin", "bit"]


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_round_trip_gives_the_same_logits(tmp_path, family):
  hf = hf_model(family)
  hf.save_pretrained(tmp_path / "hf")
  x = images()
  want = torch_logits(hf, x)
  assert np.abs(want).max() > 0.5  # logits of order 1: ATOL is a meaningful bound

  model, params = pretrained.load(tmp_path / "hf")
  got = our_logits(model, params, x)
  assert got.shape == (2, 5)
  # Measured: vit 1.3e-5, deit 2.0e-5, deit_distilled 1.2e-5 (LayerNorm eps 1e-12 vs 1e-6),
  # swin 3.6e-7, bit 7.2e-7.
  assert np.abs(got - want).max() < ATOL

  pretrained.save_hf(model, params, str(tmp_path / "back"))
  again = type(hf).from_pretrained(tmp_path / "back").eval()
  assert np.abs(torch_logits(again, x) - want).max() < ATOL
  assert np.abs(torch_logits(again, x) - got).max() < 1e-5  # the exported config is ours exactly

  # Exact GELU (HF ViT/DeiT) and a zero-padded max-pool (HF BiT) are what the loader switches on:
  # without them the logits move by more than the tolerance, so this test can fail.
  option = {"vit": dict(approximate_gelu=True), "bit": dict(zero_pad_pool=False)}.get(family)
  if option:
    assert np.abs(our_logits(model.clone(**option), params, x) - want).max() > ATOL


def test_class_names_come_from_id2label_and_pytorch_model_bin_loads(tmp_path):
  cfg = transformers.ViTConfig(**VIT, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
  hf = randomise(transformers.ViTForImageClassification(cfg))
  hf.save_pretrained(tmp_path)
  info = pretrained.load_with_info(tmp_path)
  assert info.class_names == ("cat", "dog")
  assert info.image_size == (32, 32) and info.mean == pretrained.HALF
  # The same weights as pytorch_model.bin (older Hub repositories) load to the same params.
  (tmp_path / "model.safetensors").unlink()
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  _, params = pretrained.load(tmp_path)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                  jax.tree.leaves(info.params)))


def test_num_classes_and_img_size(tmp_path):
  logs = []
  hf_model("vit").save_pretrained(tmp_path / "vit")
  model, params = pretrained.load(tmp_path / "vit", num_classes=3, img_size=48, log=logs.append)
  assert params["head"]["kernel"].shape == (16, 3)
  assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 1 + 6 * 6, 16)
  assert any("head re-initialised" in l for l in logs)
  assert np.isfinite(our_logits(model, params, images(size=48))).all()

  hf_model("swin").save_pretrained(tmp_path / "swin")
  model, params = pretrained.load(tmp_path / "swin", img_size=64)
  # Window 4 at 32 px (8x8 then 4x4 maps: the last stage clamps to 4); at 64 px still 4, so the
  # tables keep their shape; at 24 px stage 2's map is 3x3 and its tables shrink to (5*5, 2).
  assert params["layers_1"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (49, 2)
  model, params = pretrained.load(tmp_path / "swin", img_size=24)
  assert params["layers_1"]["blocks_0"]["attn"]["relative_position_bias_table"].shape == (25, 2)
  assert np.isfinite(our_logits(model, params, images(size=24))).all()


def test_mismatches_are_named_with_both_shapes(tmp_path):
  hf_model("vit").save_pretrained(tmp_path)
  other = models.get_model("ViT-B/8", num_classes=5, hidden_size=16, num_layers=2, num_heads=2,
                           mlp_dim=64, approximate_gelu=False)
  init = jax.device_get(jax.eval_shape(other.init, jax.random.PRNGKey(0),
                                       jnp.zeros((1, 32, 32, 3)))["params"])
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  with pytest.raises(ValueError) as e:
    pretrained.load_into(str(tmp_path), init)
  msg = str(e.value)
  assert ("mis-shaped: Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel: checkpoint (16, 32) "
          "vs model (16, 64)") in msg
  assert "encoderblock_1/MlpBlock_3/Dense_1/kernel" in msg


def test_load_into_takes_any_source(tmp_path):
  # What config.pretrained.path goes through: a Hugging Face directory into a fresh model's params.
  hf = hf_model("vit")
  hf.save_pretrained(tmp_path)
  model, params = pretrained.load(tmp_path)
  init = jax.tree.map(np.zeros_like, params)
  loaded = pretrained.load_into(str(tmp_path), init)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def _random_tree(model, size, seed=0):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes["params"])


def test_npz_round_trip_is_bitwise_and_needs_no_hf_extra(tmp_path, monkeypatch):
  for name in ("transformers", "safetensors", "safetensors.numpy", "huggingface_hub"):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
  tree = _random_tree(models.get_model("ViT-Mu/8", num_classes=7), 32)
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  np.savez(tmp_path / "in.npz", **flat)
  model, params = pretrained.load(str(tmp_path / "in.npz"), model="ViT-Mu/8", img_size=32)
  npz.save_npz(params, tmp_path / "out.npz")
  a, b = np.load(tmp_path / "in.npz"), np.load(tmp_path / "out.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  assert model.num_classes == 7

  # ... while a Hugging Face source names the extra to install.
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text('{"model_type": "vit"}')
  (hf_dir / "model.safetensors").write_bytes(b"")
  with pytest.raises(ImportError, match=r"\.\[hf\]"):
    pretrained.load(str(hf_dir))


def test_bit_release_npz(tmp_path):
  # A BiT release file (`resnet/...` names, GroupNorm params (1,1,1,C), head as a 1x1 conv) loads
  # into our ResNet-v2 with every array in its place.
  model = models.get_model("BiT-R26x1", num_classes=4, base_width=16, gn_groups=4)
  ours = _random_tree(model, 32)
  flat = {"resnet/root_block/standardized_conv2d/kernel": ours["conv_root"]["kernel"],
          "resnet/group_norm/gamma": ours["norm-pre-head"]["scale"].reshape(1, 1, 1, -1),
          "resnet/group_norm/beta": ours["norm-pre-head"]["bias"].reshape(1, 1, 1, -1),
          "resnet/head/conv2d/kernel": ours["head"]["kernel"][None, None],
          "resnet/head/conv2d/bias": ours["head"]["bias"]}
  for b in range(1, 5):
    for u in (1, 2):
      unit, pre = ours[f"block{b}"][f"unit{u}"], f"resnet/block{b}/unit{u:02d}"
      for i, part in enumerate("abc", 1):
        flat[f"{pre}/{part}/standardized_conv2d/kernel"] = unit[f"conv{i}"]["kernel"]
        flat[f"{pre}/{part}/group_norm/gamma"] = unit[f"gn{i}"]["scale"].reshape(1, 1, 1, -1)
        flat[f"{pre}/{part}/group_norm/beta"] = unit[f"gn{i}"]["bias"]
      if "conv_proj" in unit:
        flat[f"{pre}/a/proj/standardized_conv2d/kernel"] = unit["conv_proj"]["kernel"]
  np.savez(tmp_path / "bit.npz", **flat)
  with pytest.raises(ValueError, match="known names"):
    pretrained.load(str(tmp_path / "bit.npz"))  # which model? the file name does not say
  # The registry name gives the depth; the small widths are the model's overrides here, so the
  # tree goes in through load_into (as config.pretrained.path does) against this model's params.
  got = pretrained.load_into(str(tmp_path / "bit.npz"), jax.tree.map(np.zeros_like, ours),
                             model="BiT-R26x1")
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ours)))


def test_zoo_lists_and_offline_errors_say_where_to_put_the_file(tmp_path, monkeypatch, capsys):
  assert pretrained.main(["--list"]) == 0
  out = capsys.readouterr().out
  name = ("augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-"
          "steps_20k-lr_0.03-res_384")
  assert name in out and "85.49" in out and "microsoft/swin-tiny-patch4-window7-224" in out
  assert pretrained.ZOO["facebook/deit-base-distilled-patch16-224"].top1 == 83.4
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("VIT_JAX_PRETRAINED_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    pretrained.load(name)
  assert os.path.join(str(tmp_path), name.split("/")[1] + ".npz") in str(e.value)
  assert "gsutil cp gs://vit_models/augreg/" in str(e.value)
  with pytest.raises(FileNotFoundError, match="huggingface-cli download google/vit-base"):
    pretrained.load("google/vit-base-patch16-224")


def test_unknown_sources_are_named(tmp_path):
  with pytest.raises(ValueError, match="Unknown weights source 'ViT-Q'"):
    pretrained.load("ViT-Q")
  (tmp_path / "config.json").write_text('{"model_type": "cvt"}')
  with pytest.raises(NotImplementedError, match="model_type 'cvt' .* supported: vit, deit, swin, "
                                                "bit"):
    pretrained.load(str(tmp_path))


def test_one_table_picks_each_family_by_class():
  """`FAMILIES` is keyed by model class; a subclass without a row of its own (the hybrid, a
  VisionTransformer) takes its nearest base's, DeiT its own (a VisionTransformer too)."""
  name = lambda model: pretrained.family_of(models.get_model(model, num_classes=1)).name
  assert [name(m) for m in ("ViT-Ti/16", "R26+ViT-S/32", "DeiT-Ti/16-distilled", "Swin-T",
                            "BiT-R50x1")] == ["ViT", "ViT", "DeiT", "Swin", "BiT"]
  assert pretrained.family_of(models.get_model("CvT-13", num_classes=1)) is None
  with pytest.raises(NotImplementedError, match="save_hf writes ViT, DeiT, Swin, BiT models, not "
                                                "ConvolutionalVisionTransformer"):
    pretrained.save_hf("CvT-13", {}, "unused")


def test_shipped_class_names():
  names = pretrained.class_names("imagenet")
  assert len(names) == 1000 and names[0].startswith("tench") and names[999].startswith("toilet")
  assert len(pretrained.class_names("imagenet21k")) == 21843


@pytest.mark.slow  # torch and transformers: 20-35 s to import on the loaded 2-core machine
def test_load_detr_hf_directory(tmp_path):
  """DETR (vit_jax/models/detr.py) from a save_pretrained directory: the same boxes as torch."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.DetrConfig(
      use_timm_backbone=False, backbone=None, use_pretrained_backbone=False,
      backbone_config=transformers.ResNetConfig(out_features=["stage2"], depths=[1, 1],
                                                hidden_sizes=[16, 32], embedding_size=8),
      d_model=16, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
      decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_queries=5,
      num_labels=3)
  torch.manual_seed(0)
  hf = transformers.DetrForObjectDetection(cfg).eval()
  hf.save_pretrained(tmp_path)
  model, variables = pretrained.load_detr_hf(str(tmp_path))
  assert set(variables) == {"params", "batch_stats"} and model.num_queries == 5
  x = np.random.default_rng(0).normal(size=(1, 3, 48, 40)).astype(np.float32)
  with torch.no_grad():
    want = hf(pixel_values=torch.tensor(x))
  got = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got["logits"], want.logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(got["boxes"], want.pred_boxes.numpy(), atol=1e-4)
  with pytest.raises(ValueError, match="load_detr_hf reads 'detr' directories"):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    pretrained.load_detr_hf(str(tmp_path))
