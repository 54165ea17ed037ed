"""The paper's released detectors and segmenters (`models/convert_dense.py`): an mmdetection or
mmsegmentation state dict, written here with the official configs' module names, converts to
a served checkpoint with the same outputs as the model it came from; every tensor has its
place, a stray or missing one is refused; a release name downloads (from a `file://` mirror
here); a converted Cascade Mask R-CNN serves through `/v1/detect`."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import build_model, convert_checkpoint, load_checkpoint
from models.checkpoint import CheckpointError, read_checkpoint_meta
from models.convert import pretrained_checkpoint
from models.detection import detect
from models.labels import ade20k_labels, coco_labels
from models.segmentation import segment
from service.config import pretrained_serve_config

from .live_service import run_service


def _conv_bn(ours, theirs, prefix, mm_prefix):
    """A ConvModule (conv without bias, BN) of mm*: `<mm_prefix>.conv` / `<mm_prefix>.bn`."""
    theirs[f"{mm_prefix}.conv.weight"] = ours.pop(f"{prefix}.0.weight")
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        theirs[f"{mm_prefix}.bn.{name}"] = ours.pop(f"{prefix}.1.{name}")


def _bg_last(v):  # torchvision's background first -> mmdet's last
    return torch.cat([v[1:], v[:1]])


def mmdet_state_dict(model, cascade: bool) -> dict[str, torch.Tensor]:
    """The model's tensors under mmdetection's keys (ConvNeXt configs: FPN neck, RPNHead,
    Shared2FCBBoxHead or 3 x ConvFCBBoxHead(4 convs, 1 fc, SyncBN), FCNMaskHead(s)); fails
    unless every tensor of the model finds its key."""
    ours = dict(model.state_dict())
    theirs = {}
    for key in [k for k in ours if k.startswith("backbone.body.")]:
        theirs["backbone." + key.removeprefix("backbone.body.")] = ours.pop(key)
    for i in range(4):
        for p in ("weight", "bias"):
            theirs[f"neck.lateral_convs.{i}.conv.{p}"] = ours.pop(
                f"backbone.fpn.inner_blocks.{i}.0.{p}"
            )
            theirs[f"neck.fpn_convs.{i}.conv.{p}"] = ours.pop(
                f"backbone.fpn.layer_blocks.{i}.0.{p}"
            )
    for p in ("weight", "bias"):
        theirs[f"rpn_head.rpn_conv.{p}"] = ours.pop(f"rpn.head.conv.0.0.{p}")
        theirs[f"rpn_head.rpn_cls.{p}"] = ours.pop(f"rpn.head.cls_logits.{p}")
        theirs[f"rpn_head.rpn_reg.{p}"] = ours.pop(f"rpn.head.bbox_pred.{p}")
    if cascade:
        boxes = [(f"roi_head.bbox_head.{s}", f"roi_heads.stages.{s}") for s in range(3)]
        masks = [
            (
                f"roi_head.mask_head.{s}",
                f"roi_heads.mask_heads.{s}",
                f"roi_heads.mask_predictors.{s}",
            )
            for s in range(3)
        ]
    else:
        boxes = [("roi_head.bbox_head", "roi_heads")]
        masks = [("roi_head.mask_head", "roi_heads.mask_head", "roi_heads.mask_predictor")]
    for mm, tv in boxes:
        if cascade:
            for k in range(4):
                _conv_bn(ours, theirs, f"{tv}.head.{k}", f"{mm}.shared_convs.{k}")
            fcs = [(f"{tv}.head.5", f"{mm}.shared_fcs.0")]
            predictor = f"{tv}.predictor"
        else:
            fcs = [
                (f"{tv}.box_head.fc6", f"{mm}.shared_fcs.0"),
                (f"{tv}.box_head.fc7", f"{mm}.shared_fcs.1"),
            ]
            predictor = f"{tv}.box_predictor"
        for p in ("weight", "bias"):
            for src, dst in fcs:
                theirs[f"{dst}.{p}"] = ours.pop(f"{src}.{p}")
            theirs[f"{mm}.fc_cls.{p}"] = _bg_last(ours.pop(f"{predictor}.cls_score.{p}"))
            theirs[f"{mm}.fc_reg.{p}"] = ours.pop(f"{predictor}.bbox_pred.{p}")[4:]  # no bg
    for mm, head, predictor in masks:
        for p in ("weight", "bias"):
            for k in range(4):
                theirs[f"{mm}.convs.{k}.conv.{p}"] = ours.pop(f"{head}.{k}.0.{p}")
            theirs[f"{mm}.upsample.{p}"] = ours.pop(f"{predictor}.conv5_mask.{p}")
            theirs[f"{mm}.conv_logits.{p}"] = ours.pop(f"{predictor}.mask_fcn_logits.{p}")[1:]
    assert not ours, f"tensors with no mmdet key: {sorted(ours)[:5]}"
    return theirs


def mmseg_state_dict(model) -> dict[str, torch.Tensor]:
    """UperNet's tensors under mmsegmentation's keys (UPerHead + FCNHead auxiliary)."""
    ours = dict(model.state_dict())
    theirs = {k: ours.pop(k) for k in [k for k in ours if k.startswith("backbone.")]}
    for i in range(4):
        _conv_bn(ours, theirs, f"decode_head.ppm.{i}.1", f"decode_head.psp_modules.{i}.1")
    _conv_bn(ours, theirs, "decode_head.bottleneck", "decode_head.bottleneck")
    for i in range(3):
        _conv_bn(ours, theirs, f"decode_head.lateral_convs.{i}", f"decode_head.lateral_convs.{i}")
        _conv_bn(ours, theirs, f"decode_head.fpn_convs.{i}", f"decode_head.fpn_convs.{i}")
    _conv_bn(ours, theirs, "decode_head.fpn_bottleneck", "decode_head.fpn_bottleneck")
    _conv_bn(ours, theirs, "auxiliary_head.conv", "auxiliary_head.convs.0")
    for head in ("decode_head", "auxiliary_head"):
        for p in ("weight", "bias"):
            theirs[f"{head}.conv_seg.{p}"] = ours.pop(f"{head}.conv_seg.{p}")
    assert not ours, f"tensors with no mmseg key: {sorted(ours)[:5]}"
    return theirs


def _randomise_norms(model) -> None:
    """BN statistics away from 0/1, so a tensor that lands in the wrong place shows."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _save_mm(sd, path) -> None:
    torch.save({"meta": {"mmdet_version": "2.x"}, "state_dict": sd}, path)


def _image(h=150, w=220) -> torch.Tensor:
    torch.manual_seed(2)
    return (torch.rand(3, h, w) * 255).to(torch.uint8)


@pytest.mark.parametrize("arch", ["maskrcnn_convnext_atto", "cascade_maskrcnn_convnext_atto"])
def test_an_mmdet_detector_converts_to_the_same_outputs(arch, tmp_path):
    torch.manual_seed(0)
    kw = {"min_size": 128, "max_size": 224, "roi_align": "mmdet"}
    model = build_model(arch, num_classes=80, **kw).eval()
    _randomise_norms(model)
    _save_mm(mmdet_state_dict(model, cascade=arch.startswith("cascade")), tmp_path / "mm.pth")
    meta = convert_checkpoint(
        tmp_path / "mm.pth", tmp_path / "det.safetensors", arch=arch, image_size=128
    )
    assert meta.labels == coco_labels() and meta.head == "maskrcnn"
    assert meta.model_kwargs["roi_align"] == "mmdet"  # what the weights were trained with
    loaded, _ = load_checkpoint(tmp_path / "det.safetensors")
    loaded.transform.max_size = 224  # the test's small images; the release's is 1333
    a = detect(model, [_image()], score_threshold=0.0, max_detections=20)[0]
    b = detect(loaded, [_image()], score_threshold=0.0, max_detections=20)[0]
    assert len(a.scores) == 20
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert a.masks == b.masks


def test_an_mmseg_upernet_converts_to_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("upernet_convnext_atto", num_classes=150).eval()
    _randomise_norms(model)
    _save_mm(mmseg_state_dict(model), tmp_path / "mm.pth")
    meta = convert_checkpoint(
        tmp_path / "mm.pth", tmp_path / "seg.safetensors", arch="upernet_convnext_atto"
    )
    assert meta.labels == ade20k_labels() and meta.image_size == 512
    loaded, _ = load_checkpoint(tmp_path / "seg.safetensors")
    a = segment(model, [_image()], image_size=128)[0]
    b = segment(loaded, [_image()], image_size=128)[0]
    np.testing.assert_array_equal(a, b)


def test_a_stray_or_missing_tensor_is_refused(tmp_path):
    model = build_model("upernet_convnext_atto", num_classes=150)
    sd = mmseg_state_dict(model)
    _save_mm({**sd, "decode_head.extra_conv.weight": torch.zeros(1)}, tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match="decode_head.extra_conv.weight"):
        convert_checkpoint(
            tmp_path / "stray.pth", tmp_path / "o.safetensors", arch="upernet_convnext_atto"
        )
    sd.pop("decode_head.fpn_bottleneck.bn.running_var")
    _save_mm(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing"):
        convert_checkpoint(
            tmp_path / "missing.pth", tmp_path / "o.safetensors", arch="upernet_convnext_atto"
        )
    with pytest.raises(CheckpointError, match="not an mmdet"):
        convert_checkpoint(
            tmp_path / "missing.pth", tmp_path / "o.safetensors", arch="maskrcnn_convnext_atto"
        )


def test_a_release_name_downloads_from_the_mirror(tmp_path, monkeypatch):
    """`convnext-serve convert maskrcnn_convnext_tiny_1k_3x_coco` on a machine with internet
    fetches the official file; here from a `file://` mirror with the same layout."""
    model = build_model("maskrcnn_convnext_tiny", num_classes=80, roi_align="mmdet")
    (tmp_path / "mirror" / "coco").mkdir(parents=True)
    _save_mm(
        mmdet_state_dict(model, cascade=False),
        tmp_path / "mirror" / "coco" / "mask_rcnn_convnext_tiny_1k_3x.pth",
    )
    monkeypatch.setenv("CONVNEXT_SERVE_WEIGHTS_URL", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("CONVNEXT_SERVE_CACHE", str(tmp_path / "cache"))
    meta = convert_checkpoint("maskrcnn_convnext_tiny_1k_3x_coco", tmp_path / "t.safetensors")
    assert meta.arch == "maskrcnn_convnext_tiny" and meta.provenance.dataset == "coco"
    assert meta.model_kwargs == {"min_size": 800, "max_size": 1333, "roi_align": "mmdet"}
    assert meta.provenance.model_extra["paper"] == "box AP 46.2, mask AP 41.7"


def test_a_converted_cascade_serves_through_v1_detect(tmp_path):
    torch.manual_seed(0)
    model = build_model("cascade_maskrcnn_convnext_atto", num_classes=80, roi_align="mmdet")
    _save_mm(mmdet_state_dict(model, cascade=True), tmp_path / "mm.pth")
    convert_checkpoint(
        tmp_path / "mm.pth",
        tmp_path / "cascade.safetensors",
        arch="cascade_maskrcnn_convnext_atto",
        image_size=160,
    )
    buf = io.BytesIO()
    Image.fromarray(_image().permute(1, 2, 0).numpy()).save(buf, "PNG")
    models = [
        {
            "name": "cascade",
            "checkpoint": str(tmp_path / "cascade.safetensors"),
            "max_batch_size": 1,
            "warmup_batches": 1,
        }
    ]
    for svc in run_service(tmp_path, models, {}):
        r = svc.post("/v1/detect", [buf.getvalue()], params={"score_threshold": 0.0})
        assert r.status_code == 200, r.text
        [result] = r.json()["results"]
        assert result["detections"], result
        assert {d["label"] for d in result["detections"]} <= set(coco_labels())


def test_run_pretrained_takes_the_released_dense_models(tmp_path, monkeypatch):
    """`convnext-serve run --pretrained upernet_convnext_tiny_1k_ade20k_512` (and the detectors):
    the release converts on first use into the cache, and the config serves it as the paper
    evaluates it (a sliding window; the detectors in small batches)."""
    model = build_model("upernet_convnext_tiny", num_classes=150)
    (tmp_path / "mirror" / "ade20k").mkdir(parents=True)
    _save_mm(
        mmseg_state_dict(model),
        tmp_path / "mirror" / "ade20k" / "upernet_convnext_tiny_1k_512x512.pth",
    )
    monkeypatch.setenv("CONVNEXT_SERVE_WEIGHTS_URL", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("CONVNEXT_SERVE_CACHE", str(tmp_path / "cache"))
    path = pretrained_checkpoint("upernet_convnext_tiny_1k_ade20k_512")
    assert path == tmp_path / "cache" / "served" / "upernet_convnext_tiny_1k_ade20k_512.safetensors"
    meta = read_checkpoint_meta(path)
    assert meta.task == "segment" and meta.image_size == 512 and meta.labels[0] == "wall"
    names = [
        "upernet_convnext_tiny_1k_ade20k_512",
        "cascade_maskrcnn_convnext_tiny_1k_3x_coco",
        "convnext_tiny_1k",
    ]
    models = pretrained_serve_config(names)["applications"][0]["args"]["models"]
    assert [m.get("sliding_window") for m in models] == [True, None, None]
    assert [m.get("max_batch_size") for m in models] == [None, 2, None]
    with pytest.raises(ValueError, match="not an official release"):
        pretrained_checkpoint("cascade_maskrcnn_convnext_huge_3x_coco")
