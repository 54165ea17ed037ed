"""Upstream checkpoints (official, timm, torchvision) convert to identical served models."""

import collections

import pytest
import timm
import torch
import torchvision

from models import CheckpointError, convert_checkpoint, load_checkpoint
from models.convert import OFFICIAL_RELEASES
from service.cli import main as cli

from . import official_convnext as official
from .conftest import perturb_, rel_max_diff

TOL = 1e-5


def logits_match(source: torch.nn.Module, served: torch.nn.Module, size: int = 96) -> float:
    x = torch.randn(2, 3, size, size)
    source.eval()
    with torch.inference_mode():
        return rel_max_diff(served(x), source(x))


def test_official_layout(tmp_path):
    src = perturb_(official.ConvNeXt(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)))
    pth = tmp_path / "official.pth"
    torch.save({"model": src.state_dict()}, pth)  # the official release format
    out = tmp_path / "atto.safetensors"
    convert_checkpoint(pth, out, arch="convnext_atto")
    served, meta = load_checkpoint(out)
    assert meta.num_classes == 1000 and meta.labels[0] == "tench"  # ImageNet-1K names
    assert logits_match(src, served) <= TOL


@pytest.mark.parametrize("arch", ["convnext_atto", "convnext_tiny"])
def test_timm_layout(tmp_path, arch):
    # timm's atto..nano use a 1x1-conv MLP (conv_mlp=True); tiny uses Linear
    src = perturb_(timm.create_model(arch, num_classes=10))
    pth = tmp_path / "timm.pth"
    torch.save(src.state_dict(), pth)
    out = tmp_path / "out.safetensors"
    convert_checkpoint(pth, out, arch=arch, labels=[str(i) for i in range(10)])
    served, meta = load_checkpoint(out)
    assert meta.provenance.model_extra["upstream_layout"] == "timm"
    assert logits_match(src, served) <= TOL


def test_timm_safetensors_source(tmp_path):
    from safetensors.torch import save_file

    src = perturb_(timm.create_model("convnext_femto", num_classes=4))
    save_file(src.state_dict(), tmp_path / "model.safetensors")  # as on the Hugging Face hub
    out = tmp_path / "out.safetensors"
    convert_checkpoint(tmp_path / "model.safetensors", out, arch="convnext_femto")
    served, meta = load_checkpoint(out)
    assert meta.labels == ["class_0", "class_1", "class_2", "class_3"]
    assert logits_match(src, served) <= TOL


def test_torchvision_layout(tmp_path):
    src = perturb_(torchvision.models.convnext_tiny())
    pth = tmp_path / "tv.pth"
    torch.save(src.state_dict(), pth)
    out = tmp_path / "out.safetensors"
    convert_checkpoint(pth, out, arch="convnext_tiny")
    served, meta = load_checkpoint(out)
    # torchvision's weight metadata: resize 236 then crop 224, bilinear
    assert meta.interpolation == "bilinear" and meta.crop_pct == pytest.approx(224 / 236)
    assert logits_match(src, served) <= TOL


@pytest.mark.parametrize("layer_scale", [0.0, 1e-6])
def test_isotropic_with_and_without_layer_scale(tmp_path, layer_scale):
    full = official.ConvNeXtIsotropic(depth=18, dim=384, layer_scale_init_value=layer_scale)
    perturb_(full)
    torch.save({"model": full.state_dict()}, tmp_path / "iso.pth")
    out = tmp_path / "iso.safetensors"
    meta = convert_checkpoint(tmp_path / "iso.pth", out, arch="convnext_iso_small")
    served, _ = load_checkpoint(out)
    assert (served.blocks[0].gamma is not None) == (layer_scale > 0)
    assert meta.model_kwargs == ({"layer_scale_init_value": 1e-6} if layer_scale else {})
    assert logits_match(full, served, size=64) <= TOL


def test_release_name_downloads_from_the_mirror(tmp_path, monkeypatch):
    """`convnext-serve convert convnext_tiny_1k` fetches the official file, here from file://."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    src = perturb_(official.ConvNeXt())
    torch.save({"model": src.state_dict()}, mirror / OFFICIAL_RELEASES["convnext_tiny_1k"].filename)
    monkeypatch.setenv("CONVNEXT_SERVE_WEIGHTS_URL", mirror.as_uri())
    monkeypatch.setenv("CONVNEXT_SERVE_CACHE", str(cache))
    out = tmp_path / "tiny.safetensors"
    assert cli(["convert", "convnext_tiny_1k", "--out", str(out)]) == 0
    assert (cache / "convnext_tiny_1k_224_ema.pth").is_file()
    served, meta = load_checkpoint(out)
    assert meta.arch == "convnext_tiny" and meta.provenance.dataset == "imagenet-1k"
    assert meta.provenance.model_extra["upstream"].startswith("file://")
    assert logits_match(src, served) <= TOL


class NotATensor:
    pass


def test_pickled_objects_are_never_loaded(tmp_path, capsys):
    pth = tmp_path / "evil.pth"
    torch.save({"model": collections.OrderedDict(x=NotATensor())}, pth)
    with pytest.raises(CheckpointError, match=r"evil\.pth: cannot read upstream weights"):
        convert_checkpoint(pth, tmp_path / "o.safetensors", arch="convnext_atto")
    # the CLI turns it into one line on stderr and exit code 2, no traceback
    assert cli(["convert", str(pth), "--arch", "convnext_atto", "--out", "o.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "evil.pth" in err and "Traceback" not in err


def test_weights_of_the_wrong_arch(tmp_path):
    src = official.ConvNeXt(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    torch.save({"model": src.state_dict()}, tmp_path / "atto.pth")
    with pytest.raises(CheckpointError, match=r"atto\.pth: weights do not match convnext_tiny"):
        convert_checkpoint(tmp_path / "atto.pth", tmp_path / "o.safetensors", arch="convnext_tiny")


def test_wrong_number_of_labels(tmp_path):
    src = official.ConvNeXt(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), num_classes=3)
    torch.save({"model": src.state_dict()}, tmp_path / "atto.pth")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ValueError, match="2 labels given for a head of 3 classes"):
        convert_checkpoint(tmp_path / "atto.pth", tmp_path / "o.st", "convnext_atto", labels)
