"""Cascade Mask R-CNN on ConvNeXt + FPN (`models/cascade.py`): the paper's sizes, every stage
learning, and the same inference API and checkpoints as Mask R-CNN."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import build_model, load_checkpoint, save_checkpoint
from models.cascade import CascadeRoIHeads
from models.checkpoint import CheckpointMeta, Provenance
from models.data import synth
from models.detection import detect
from models.masks import decode_rle
from service.cli import main as cli

from .test_dense import assert_each_loss_falls, shapes_batch, train_steps


@pytest.mark.parametrize("arch, millions", [("tiny", 86), ("small", 108), ("base", 146)])
def test_parameter_counts_are_the_papers(arch, millions):
    """The paper's Table 3 (COCO, Cascade Mask R-CNN, ImageNet-1K backbones): within 1%."""
    model = build_model(f"cascade_maskrcnn_convnext_{arch}", num_classes=80)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / (millions * 1e6) - 1) < 0.01, count


def test_the_stages_are_the_official_configs():
    model = build_model("cascade_maskrcnn_convnext_atto", num_classes=80)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads) and heads.stage_loss_weights == (1.0, 0.5, 0.25)
    matchers = [s.sampling.proposal_matcher for s in heads.stages]
    assert [m.high_threshold for m in matchers] == [0.5, 0.6, 0.7]
    assert [s.sampling.box_coder.weights for s in heads.stages] == [
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    ]
    stage = heads.stages[0]
    convs = [m for m in stage.head.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stage.head.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 4 and len(norms) == 4 and all(c.bias is None for c in convs)
    assert stage.predictor.bbox_pred.out_features == 81 * 4  # per class, background included
    agnostic = build_model("cascade_maskrcnn_convnext_atto", num_classes=80, class_agnostic=True)
    assert agnostic.roi_heads.stages[0].predictor.bbox_pred.out_features == 4
    assert len(heads.mask_heads) == len(heads.mask_predictors) == 3


def test_training_lowers_every_stages_losses():
    """Each stage's loss falls, and its classifier's and mask head's. A stage's box loss alone
    may rise: as mmdet does, it is summed over the positives and divided by every sampled RoI,
    and the positives grow as the RPN and the stages before learn."""
    torch.manual_seed(0)
    # narrow heads (the structure is the paper's): the 4-conv heads at 256 channels took 2.4 min
    model = build_model(
        "cascade_maskrcnn_convnext_atto",
        num_classes=2,
        min_size=128,
        max_size=128,
        box_batch_size_per_image=128,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=300,
        fpn_channels=64,
        box_head_dim=256,
        mask_head_dim=64,
    )
    images, targets, _ = shapes_batch()
    history = train_steps(model, lambda: model(images, targets), steps=25, lr=3e-4)
    stages = {f"s{i}_loss_{k}" for i in range(3) for k in ("classifier", "box_reg", "mask")}
    assert set(history[0]) == {"loss_objectness", "loss_rpn_box_reg", *stages}
    for h in history:
        for i in range(3):
            h[f"s{i}"] = sum(v for k, v in h.items() if k.startswith(f"s{i}_loss"))
    assert_each_loss_falls([{k: v for k, v in h.items() if "box_reg" not in k} for h in history])


def test_detects_through_the_same_api_and_round_trips_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        "cascade_maskrcnn_convnext_atto", num_classes=2, min_size=96, max_size=160
    ).eval()
    image = (torch.rand(3, 120, 200) * 255).to(torch.uint8)
    [found] = detect(model, [image], score_threshold=0.0, max_detections=7)
    assert len(found.scores) == 7 and np.all(np.diff(found.scores) <= 0)
    assert found.boxes[:, [0, 2]].max() <= 200 and found.boxes[:, [1, 3]].max() <= 120
    assert all(decode_rle(m).shape == (120, 200) for m in found.masks)
    meta = CheckpointMeta(
        task="detect",
        arch="cascade_maskrcnn_convnext_atto",
        head="maskrcnn",
        num_classes=2,
        labels=["square", "circle"],
        image_size=96,
        provenance=Provenance(source="trained"),
        model_kwargs={"min_size": 96, "max_size": 160},
    )
    save_checkpoint(model, tmp_path / "cascade.safetensors", meta)
    loaded, _ = load_checkpoint(tmp_path / "cascade.safetensors")
    [again] = detect(loaded, [image], score_threshold=0.0, max_detections=7)
    np.testing.assert_array_equal(found.boxes, again.boxes)
    np.testing.assert_array_equal(found.scores, again.scores)


def test_convnext_serve_train_detect_trains_a_cascade(tmp_path, capsys):
    """The same CLI and COCO layout as Mask R-CNN: `convnext-serve train detect --arch
    cascade_maskrcnn_convnext_atto` writes a served checkpoint that `eval` reads back."""
    synth("detect", tmp_path / "det", n=6, seed=1, image_size=96, n_val=2)
    out = tmp_path / "cascade.safetensors"
    args = [
        "train",
        "detect",
        "--data",
        str(tmp_path / "det"),
        "--arch",
        "cascade_maskrcnn_convnext_atto",
        "--out",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--min-size",
        "96",
        "--max-size",
        "96",
        "--fpn-channels",
        "64",
        "--box-head-dim",
        "256",
        "--mask-head-dim",
        "64",
        "--roi-batch-size",
        "64",
        "--no-progress",
        "--loader-workers",
        "0",
    ]
    assert cli(args) == 0
    rows = [
        json.loads(line) for line in out.with_name(out.stem + ".log.jsonl").read_text().splitlines()
    ]
    assert {"s0_loss_classifier", "s2_loss_mask"} <= set(rows[-1])
    model, meta = load_checkpoint(out)
    assert meta.arch == "cascade_maskrcnn_convnext_atto" and meta.task == "detect"
    assert isinstance(model.roi_heads, CascadeRoIHeads)
    capsys.readouterr()
    assert (
        cli(["eval", "detect", "--data", str(tmp_path / "det"), "--checkpoint", str(out), "--json"])
        == 0
    )
    assert "bbox_AP50" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["maskrcnn_convnext_atto", "cascade_maskrcnn_convnext_atto"])
def test_boxes_without_masks_skip_the_mask_branch_and_equal_those_with(arch):
    """No image of the batch wants masks: the mask head does not run, the boxes, scores and
    classes are those of a run with masks, and the model keeps its mask branch."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=2, min_size=96, max_size=160).eval()
    heads = model.roi_heads
    pool = heads.mask_roi_pool
    calls = []
    pool.register_forward_hook(lambda *_: calls.append(1))
    images = [(torch.rand(3, 120, 200) * 255).to(torch.uint8) for _ in range(2)]
    with_masks = detect(model, images, score_threshold=0.0, max_detections=7)
    assert calls
    calls.clear()
    boxes_only = detect(model, images, score_threshold=0.0, max_detections=7, masks=False)
    assert not calls and heads.mask_roi_pool is pool
    for a, b in zip(with_masks, boxes_only, strict=True):
        assert b.masks is None and len(a.scores) == 7
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
    mixed = detect(model, images, score_threshold=0.0, max_detections=7, masks=[False, True])
    assert calls and mixed[0].masks is None and len(mixed[1].masks) == 7
