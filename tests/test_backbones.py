"""The offline ImageNet weights of the default backbone (and of Lite1/Lite2), checked on real photos."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from PIL import Image

from edge_tl.errors import UserError
from edge_tl.finetune.backbones import OFFLINE_WEIGHTS, create_backbone, offline_imagenet_state_dict, preprocess_spec
from edge_tl.finetune.train import eval_transform

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real test photos (pip install scikit-image)")

TABBY_CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite1", 240),
                                        ("tf_efficientnet_lite2", 260)])
def test_mapped_offline_weights_name_real_photos(name, size):
    model = timm.create_model(name).eval()
    model.load_state_dict(offline_imagenet_state_dict(model, name))
    spec = preprocess_spec(model)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5) and spec.input_size == (size, size)
    tf = eval_transform(spec)
    photos = {"chelsea": TABBY_CATS, "coffee": COFFEE}
    for photo, expected in photos.items():
        x = tf(Image.fromarray(getattr(skimage_data, photo)()))[None]
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        top = int(probs.argmax())
        assert top in expected, f"{name} on {photo}: top-1 ImageNet class {top}"
        assert probs[sorted(expected)].sum() > 0.5


def test_default_backbone_gets_new_head_and_pretrained_body():
    model, source = create_backbone("tf_efficientnet_lite0", 4)
    assert "PyPI" in source and model.get_classifier().out_features == 4
    ref = offline_imagenet_state_dict(timm.create_model("tf_efficientnet_lite0"), "tf_efficientnet_lite0")
    assert torch.equal(model.state_dict()["conv_stem.weight"], ref["conv_stem.weight"])


@pytest.mark.parametrize("name, extra", [("tf_efficientnet_lite0", "train"), ("tf_efficientnet_lite2", "backbones")])
def test_missing_offline_weights_package_names_the_pip_command(monkeypatch, name, extra):
    dist = OFFLINE_WEIGHTS[name][0]
    monkeypatch.setitem(sys.modules, dist.replace("-", "_"), None)  # its import now fails
    with pytest.raises(UserError, match=rf"pip install {dist} .*pip install -e '\.\[{extra}\]' in the edge-tl checkout"):
        create_backbone(name, 3)


def test_weights_file_and_scratch(tmp_path):
    src = timm.create_model("resnet10t", num_classes=10)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pth")
    model, source = create_backbone("resnet10t", 3, weights=tmp_path / "w.pth")
    assert source == "file:w.pth" and model.get_classifier().out_features == 3
    assert torch.equal(model.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    scratch, source = create_backbone("resnet10t", 3, scratch=True)
    assert source.startswith("none") and not torch.equal(scratch.state_dict()["conv1.0.weight"],
                                                         src.state_dict()["conv1.0.weight"])


def test_wrong_weights_and_names_are_clear_errors(tmp_path, monkeypatch):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "r.pth")
    with pytest.raises(UserError, match="tensors fit this model"):
        create_backbone("tf_efficientnet_lite0", 2, weights=tmp_path / "r.pth")
    partial = timm.create_model("resnet10t").state_dict()
    partial.pop("layer4.0.conv2.weight")  # one backbone tensor short: refused, not silently random
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="1 outside the classifier"):
        create_backbone("resnet10t", 2, weights=tmp_path / "partial.pth")
    torch.save(timm.create_model("resnet10t"), tmp_path / "whole.pt")  # the model object, not its state dict
    with pytest.raises(UserError, match=r"whole.pt: a pickled Python object \(a whole model\?\), which edge-tl "
                                        r"does not unpickle .* torch.save\(model.state_dict\(\), FILE\).$"):
        create_backbone("resnet10t", 2, weights=tmp_path / "whole.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="not a state dict"):
        create_backbone("resnet10t", 2, weights=tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="no such weights file"):
        create_backbone("tf_efficientnet_lite0", 2, weights=tmp_path / "missing.pth")
    with pytest.raises(UserError, match="not a timm model"):
        create_backbone("efficientnet_liteZ9", 2)
    with pytest.raises(UserError, match=r"resnet_18: not a timm model name; did you mean one of \['resnet18'"):
        create_backbone("resnet_18", 2)
    # a deeper model's file fits every tensor of the shallower one: refused, not a model built of its subset
    torch.save(timm.create_model("efficientnet_b1").state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(UserError, match=r"deeper.pth: 128 of its 508 tensors have no place in --model efficientnet_b0 "
                                        r"\(e.g. \['blocks.0.1.conv_dw.weight'"):
        create_backbone("efficientnet_b0", 2, weights=tmp_path / "deeper.pth")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set.*--weights FILE"):
        create_backbone("resnet10t", 2)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """Hub caches in tmp_path and a hub host that never resolves (.invalid, RFC 2606): no test downloads."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_hub_model_offline_fails_at_once_naming_the_host(empty_hub):
    with pytest.raises(UserError, match="none in the local hub caches, and hub.invalid cannot be reached.*--weights FILE"):
        create_backbone("resnet10t", 2)


def test_hub_model_loads_weights_an_earlier_download_cached(empty_hub):
    from safetensors.torch import save_file

    hub_id = timm.create_model("resnet10t").pretrained_cfg["hf_hub_id"]
    repo = empty_hub / "hf" / f"models--{hub_id.replace('/', '--')}"  # huggingface_hub's cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c0ffee")
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    torch.manual_seed(7)
    src = timm.create_model("resnet10t").state_dict()
    save_file(src, repo / "snapshots" / "c0ffee" / "model.safetensors")
    model, source = create_backbone("resnet10t", 2)
    assert source == f"imagenet (timm hub: {hub_id}, from the local cache)"
    assert torch.equal(model.state_dict()["layer4.0.conv2.weight"], src["layer4.0.conv2.weight"])
    assert model.get_classifier().out_features == 2

    from edge_tl.finetune.backbones import _cached_hub_weights

    url = "https://example.invalid/weights/old_model-1234.pth"  # timm's older URL-only weights
    assert _cached_hub_weights({"url": url}) is None
    (empty_hub / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(src, empty_hub / "torch" / "hub" / "checkpoints" / "old_model-1234.pth")
    assert _cached_hub_weights({"url": url}) == str(empty_hub / "torch" / "hub" / "checkpoints" / "old_model-1234.pth")


def test_non_square_pretrained_size_needs_img_size():
    from edge_tl.finetune.backbones import preprocess_spec

    model = timm.create_model("resnet10t", pretrained=False)
    model.pretrained_cfg["input_size"] = (3, 48, 80)
    with pytest.raises(UserError, match="48x80 .*--img-size"):
        preprocess_spec(model)
    assert preprocess_spec(model, 64).input_size == (64, 64)


def test_a_pretrained_squash_crop_is_noted_not_silently_replaced():
    """timm's tf_efficientnetv2_b3 was pretrained with a 'squash' crop; the spec centre-crops everywhere."""
    from edge_tl.finetune.backbones import crop_mode_note

    note = crop_mode_note(timm.create_model("tf_efficientnetv2_b3", pretrained=False))
    assert note.startswith("note: tf_efficientnetv2_b3 was pretrained with timm's 'squash' crop")
    assert crop_mode_note(timm.create_model("tf_efficientnet_lite0", pretrained=False)) is None


def test_stored_index_buffers_are_not_unused_tensors(tmp_path, monkeypatch):
    """Original BEiT/Swin-style checkpoints save relative-position index buffers that timm keeps out of
    the state dict: they are the same model's, not another's (strictest share, so one stray tensor counts)."""
    from edge_tl.finetune import backbones

    monkeypatch.setattr(backbones, "UNUSED_SHARE", 1e-9)
    model = timm.create_model("efficientvit_m0", pretrained=False)
    sd = model.state_dict()
    sd.update({n: b for n, b in model.named_buffers() if n not in sd})  # attention_bias_idxs, as such files hold
    torch.save(sd, tmp_path / "with_buffers.pth")
    assert create_backbone("efficientvit_m0", 2, weights=tmp_path / "with_buffers.pth")[1] == "file:with_buffers.pth"
    sd["blocks.99.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "stray.pth")
    with pytest.raises(UserError, match=r"1 of its \d+ tensors have no place"):
        create_backbone("efficientvit_m0", 2, weights=tmp_path / "stray.pth")
