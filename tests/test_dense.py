"""Mask R-CNN and UperNet on ConvNeXt: sizes, training signal, inference geometry, checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import build_model, load_checkpoint, save_checkpoint
from models.checkpoint import CheckpointError, CheckpointMeta, Provenance, init_backbone
from models.detection import detect
from models.images import padded_size_groups
from models.masks import decode_rle, encode_rle, paste_masks_rle
from models.segmentation import UperNet, argmax_at_size, segment


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_maskrcnn_convnext_tiny_has_48m_params():
    with torch.device("meta"):
        model = build_model("maskrcnn_convnext_tiny", num_classes=80)
    assert model.roi_heads.box_predictor.cls_score.out_features == 81  # + background
    assert abs(n_params(model) / 1e6 - 48.1) / 48.1 <= 0.01


def test_maskrcnn_head_widths_are_build_arguments():
    """FPN, box head and mask head widths default to the paper's and can narrow for small data."""
    with torch.device("meta"):
        paper = build_model("maskrcnn_convnext_atto", num_classes=3)
        narrow = build_model(
            "maskrcnn_convnext_atto",
            num_classes=3,
            fpn_channels=64,
            box_head_dim=256,
            mask_head_dim=64,
        )
    assert paper.backbone.out_channels == 256 and paper.roi_heads.box_head.fc7.out_features == 1024
    assert paper.roi_heads.mask_head[0][0].out_channels == 256
    heads = narrow.roi_heads
    assert narrow.backbone.out_channels == 64 and heads.box_head.fc6.in_features == 64 * 7 * 7
    assert (
        heads.box_head.fc7.out_features == 256 and heads.box_predictor.bbox_pred.in_features == 256
    )
    assert [layer[0].out_channels for layer in heads.mask_head] == [64] * 4
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4  # 3 classes + background
    assert n_params(narrow) < n_params(paper) / 2
    with pytest.raises(TypeError, match="box_head"):  # built here: not a pass-through option
        build_model("maskrcnn_convnext_atto", box_head=torch.nn.Identity())


def test_upernet_convnext_tiny_has_60m_params():
    with torch.device("meta"):
        model = build_model("upernet_convnext_tiny", num_classes=150)
    assert abs(n_params(model) / 1e6 - 60.0) / 60.0 <= 0.02


def shapes_batch(n=2, size=128, seed=0):
    """Images with one or two filled rectangles, and their COCO-style and per-pixel targets."""
    g = torch.Generator().manual_seed(seed)
    images, targets, seg = [], [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.2
        label_map = torch.zeros(size, size, dtype=torch.int64)
        boxes, labels, masks = [], [], []
        for k in range(1 + int(torch.randint(2, (1,), generator=g))):
            x0, y0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            w, h = (int(v) for v in torch.randint(size // 5, size // 2, (2,), generator=g))
            cls = 1 + (k % 2)
            img[cls - 1, y0 : y0 + h, x0 : x0 + w] = 0.9
            m = torch.zeros(size, size, dtype=torch.uint8)
            m[y0 : y0 + h, x0 : x0 + w] = 1
            label_map[m.bool()] = cls
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(cls)
            masks.append(m)
        images.append(img)
        seg.append(label_map)
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels),
                "masks": torch.stack(masks),
            }
        )
    return images, targets, torch.stack(seg)


def train_steps(model, step_losses, steps, lr):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for _ in range(steps):
        losses = step_losses()
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return history


def assert_each_loss_falls(history):
    for key in history[0]:
        first = np.mean([h[key] for h in history[:3]])
        last = np.mean([h[key] for h in history[-3:]])
        assert last < first, f"{key}: {first:.4f} -> {last:.4f}"


def test_maskrcnn_training_lowers_every_loss():
    torch.manual_seed(0)
    # the paper's heads; 128 sampled RoIs of 300 proposals (not 512 of 2000) halve the time
    model = build_model(
        "maskrcnn_convnext_atto",
        num_classes=2,
        min_size=128,
        max_size=128,
        box_batch_size_per_image=128,
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=300,
    )
    images, targets, _ = shapes_batch()
    history = train_steps(model, lambda: model(images, targets), steps=25, lr=3e-4)
    assert set(history[0]) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    assert_each_loss_falls(history)


def test_upernet_training_lowers_both_losses():
    torch.manual_seed(0)
    model = build_model("upernet_convnext_atto", num_classes=3)
    images, _, seg = shapes_batch(size=64)
    batch = torch.stack(images)
    history = train_steps(model, lambda: model(batch, seg), steps=15, lr=1e-3)
    assert set(history[0]) == {"loss_seg", "loss_aux"}
    assert_each_loss_falls(history)
    model.eval()
    assert model(batch).shape == (2, 3, 64, 64)  # eval: logits at the input's size


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    rle = encode_rle(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_rle(rle), mask)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_pasted_masks_land_in_their_boxes_at_image_size():
    # A full RoI mask for box [40, 20, 140, 80] in a 200 x 300 (H x W) image.
    boxes = torch.tensor([[40.0, 20.0, 140.0, 80.0], [-10.0, 150.0, 30.0, 260.0]])
    rles = paste_masks_rle(torch.ones(2, 28, 28), boxes, 200, 300)
    expected = np.zeros((200, 300), bool)
    expected[20:81, 40:141] = True
    assert iou(decode_rle(rles[0]), expected) >= 0.95
    clipped = decode_rle(rles[1])  # partly outside the image: clipped, not wrapped
    assert clipped.shape == (200, 300) and clipped[150:, :31].mean() > 0.9
    assert not clipped[:140].any() and not clipped[:, 40:].any()
    assert paste_masks_rle(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 10) == []


def test_detect_batches_sizes_and_maps_to_requested_coordinates():
    torch.manual_seed(0)
    model = build_model("maskrcnn_convnext_atto", num_classes=2, min_size=96, max_size=160).eval()
    small = (torch.rand(3, 120, 200) * 255).to(torch.uint8)
    other = (torch.rand(3, 300, 90) * 255).to(torch.uint8)
    base = detect(model, [small, other], score_threshold=0.0, max_detections=[7, 3])
    assert [(r.height, r.width) for r in base] == [(120, 200), (300, 90)]
    assert len(base[0].scores) == 7 and len(base[1].scores) == 3
    for r in base:
        assert np.all(np.diff(r.scores) <= 0)  # best first
        assert r.boxes[:, [0, 2]].max() <= r.width and r.boxes[:, [1, 3]].max() <= r.height
        assert set(r.class_ids) <= {0, 1}
        assert all(decode_rle(m).shape == (r.height, r.width) for m in r.masks)
    # The model saw the same pixels; only the output coordinates change.
    big = detect(
        model,
        [small, other],
        score_threshold=0.0,
        max_detections=[7, 3],
        output_sizes=[(360, 600), (300, 90)],
    )
    np.testing.assert_allclose(big[0].boxes, base[0].boxes * 3, rtol=1e-4, atol=1e-3)
    for r in (base[0], big[0]):  # each mask lies inside its own box, at either scale
        for box, rle in zip(r.boxes, r.masks, strict=True):
            ys, xs = np.nonzero(decode_rle(rle))
            if len(xs):
                assert xs.min() >= box[0] - 2 and xs.max() <= box[2] + 2
                assert ys.min() >= box[1] - 2 and ys.max() <= box[3] + 2
    no_masks = detect(model, [small], score_threshold=0.0, masks=False)
    assert no_masks[0].masks is None


def test_an_images_answer_does_not_depend_on_what_it_is_batched_with():
    """A batch pads to its largest image; an image padded more than it would be alone sees an
    edge that is not in it. Images run together only when they pad to the same size."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    wide, tall = (
        torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        for h, w in ((96, 128), (128, 96))
    )
    sizes = [(96, 128), (128, 128), (90, 130), (70, 100)]
    assert padded_size_groups(sizes, 32) == [[0, 3], [1], [2]]
    detector = build_model("maskrcnn_convnext_atto", num_classes=2, min_size=128, max_size=128)
    detector.eval()
    (alone,) = detect(detector, [wide], score_threshold=0.0, masks=False)
    mixed = detect(detector, [tall, wide, wide], score_threshold=0.0, masks=False)
    for together in mixed[1:]:
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(together.scores, alone.scores, atol=1e-5)
    segmenter = build_model("upernet_convnext_atto", num_classes=3).eval()
    (alone,) = segment(segmenter, [wide], image_size=96)
    mixed = segment(segmenter, [tall, wide], image_size=96)
    assert torch.equal(mixed[1], alone)


class RedSegmenter(UperNet):
    """UperNet whose logits are a known function of the input: class 1 where red > 0.5.

    Stands in for a trained network so the test can check the inference geometry (resize, pad,
    batch, slide, resize back) against known pixels.
    """

    def forward_logits(self, images):
        red = (images[:, :1] > 0.5).float()
        p = F.avg_pool2d(red, 4)
        return torch.cat([1 - p, p], dim=1) * 10


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_segment_maps_land_on_the_original_pixels(mode):
    model = build_model("upernet_convnext_atto", num_classes=2)
    model.__class__ = RedSegmenter
    model.eval()
    images, truths = [], []
    for h, w, box in [(300, 500, (40, 60, 200, 310)), (150, 96, (10, 20, 90, 70))]:
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        y0, x0, y1, x1 = box
        img[0, y0:y1, x0:x1] = 255
        truth = np.zeros((h, w), bool)
        truth[y0:y1, x0:x1] = True
        images.append(img)
        truths.append(truth)
    maps = segment(model, images, image_size=128, mode=mode)
    for m, truth in zip(maps, truths, strict=True):
        assert m.shape == truth.shape and m.dtype == torch.int64
        assert iou(m.numpy() == 1, truth) >= 0.95


def test_argmax_at_size_in_strips_equals_interpolate():
    logits = torch.randn(5, 13, 17)
    ref = F.interpolate(logits[None], size=(101, 77), mode="bilinear", align_corners=False)
    ref = ref[0].argmax(0)
    strips = argmax_at_size(logits, (1.0, 1.0), (101, 77), max_elems=5 * 77 * 7)  # 7-row strips
    assert (strips == ref).float().mean() > 0.999  # ties aside, identical
    tiles = argmax_at_size(logits, (1.0, 1.0), (101, 77), max_elems=5 * 10)  # 1 x 10 tiles
    assert (tiles == strips).all()


def test_dense_checkpoints_round_trip(tmp_path):
    det = build_model("maskrcnn_convnext_atto", num_classes=2, min_size=96, max_size=128).eval()
    meta = CheckpointMeta(
        task="detect",
        arch="maskrcnn_convnext_atto",
        head="maskrcnn",
        num_classes=2,
        labels=["square", "circle"],
        image_size=96,
        provenance=Provenance(source="trained"),
        model_kwargs={"min_size": 96, "max_size": 128},
    )
    save_checkpoint(det, tmp_path / "det.safetensors", meta)
    loaded, _ = load_checkpoint(tmp_path / "det.safetensors")
    assert loaded.transform.min_size == (96,) and loaded.transform.max_size == 128
    img = (torch.rand(3, 100, 140) * 255).to(torch.uint8)
    a = detect(det, [img], score_threshold=0.0)[0]
    b = detect(loaded, [img], score_threshold=0.0)[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)

    seg = build_model("upernet_convnext_atto", num_classes=3).eval()
    meta = meta.model_copy(
        update=dict(
            task="segment",
            arch="upernet_convnext_atto",
            head="upernet",
            num_classes=3,
            labels=["bg", "a", "b"],
            image_size=64,
            model_kwargs={},
        )
    )
    save_checkpoint(seg, tmp_path / "seg.safetensors", meta)
    loaded, _ = load_checkpoint(tmp_path / "seg.safetensors")
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), seg(x))


def test_backbone_initialises_from_a_classifier(tmp_path):
    cls = build_model("convnext_atto", num_classes=4)
    meta = CheckpointMeta(
        task="classify",
        arch="convnext_atto",
        head="linear",
        num_classes=4,
        labels=list("abcd"),
        provenance=Provenance(source="trained"),
    )
    path = save_checkpoint(cls, tmp_path / "cls.safetensors", meta)
    for name, body in [
        ("maskrcnn_convnext_atto", lambda m: m.backbone.body),
        ("upernet_convnext_atto", lambda m: m.backbone),
    ]:
        dense = build_model(name, num_classes=2)
        loaded = init_backbone(dense, path)
        assert "stages.2.5.gamma" in loaded and "head.weight" not in loaded
        torch.testing.assert_close(
            body(dense).stages[3][1].pwconv2.weight, cls.stages[3][1].pwconv2.weight
        )
        torch.testing.assert_close(
            body(dense).downsample_layers[0][0].weight, cls.downsample_layers[0][0].weight
        )
    with pytest.raises(CheckpointError, match="does not fit"):
        init_backbone(build_model("upernet_convnext_femto", num_classes=2), path)


def test_backbone_initialises_from_another_dense_model(tmp_path):
    """A segmenter can start from a detector's backbone (per-stage norms included), whose
    features are already fine-tuned to dense prediction."""
    det = build_model("maskrcnn_convnext_atto", num_classes=3)
    with torch.no_grad():
        det.backbone.body.norm2.weight.uniform_()
    meta = CheckpointMeta(
        task="detect",
        arch="maskrcnn_convnext_atto",
        head="maskrcnn",
        num_classes=3,
        labels=list("abc"),
        provenance=Provenance(source="trained"),
    )
    path = save_checkpoint(det, tmp_path / "det.safetensors", meta)
    seg = build_model("upernet_convnext_atto", num_classes=2)
    loaded = init_backbone(seg, path)
    assert "norm2.weight" in loaded and "stages.3.1.pwconv2.weight" in loaded
    assert not any(k.startswith(("fpn", "rpn", "roi", "body")) for k in loaded)
    for a, b in zip(
        seg.backbone.state_dict().values(), det.backbone.body.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match="does not fit"):
        init_backbone(build_model("upernet_convnext_femto", num_classes=2), path)
