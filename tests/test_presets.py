"""The preprocessing a checkpoint carries (`models.presets`): the ImageNet eval view against
torchvision's own transforms, and what a detector's or segmenter's input is fitted to."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from models.checkpoint import CheckpointMeta, Provenance
from models.classification import INTERPOLATION
from models.presets import DETECT_MAX_SIZE, ClassifyPreset, FitPreset, preset_for


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize(
    "size, crop_pct, hw", [(224, 0.875, (300, 400)), (32, 1.0, (50, 40)), (64, 0.9, (64, 64))]
)
def test_the_classify_view_is_torchvisions(size, crop_pct, hw, interpolation):
    preset = ClassifyPreset(size, crop_pct, interpolation)
    reference = v2.Compose(
        [
            v2.Resize(
                int(size / crop_pct), interpolation=INTERPOLATION[interpolation], antialias=True
            ),
            v2.CenterCrop(size),
        ]
    )
    x = image(*hw)
    got = preset(x)
    assert got.dtype == torch.uint8 and got.shape == (3, size, size)
    assert torch.equal(got, reference(x))


def test_the_classify_preset_says_what_the_decoder_must_keep():
    preset = ClassifyPreset(224, 0.875)
    assert preset.resize_size == 256 and preset.min_short_side == 256
    odd = ClassifyPreset(100, 0.3)  # 333.33: the decoder keeps the pixel the resize rounds to
    assert odd.resize_size == 333 and odd.min_short_side == 334


@pytest.mark.parametrize(
    "short, long, hw, expected",
    [
        (800, 1333, (600, 900), (600, 900)),  # smaller than both: never upscaled
        (800, 1333, (1600, 1200), (1067, 800)),  # the short side decides
        (800, 1333, (1000, 4000), (333, 1333)),  # the long side decides
        (128, 128, (128, 128), (128, 128)),  # exactly at the limit: untouched
        (64, 256, (10_000, 1), (256, 1)),  # never below one pixel
        (64, 256, (1, 10_000), (1, 256)),
    ],
)
def test_fit_only_shrinks_to_what_the_model_keeps(short, long, hw, expected):
    preset = FitPreset(short, long)
    assert preset.size_for(*hw) == expected
    assert preset.min_short_side == short
    if max(hw) <= 4000:
        original = image(*hw)
        out = preset(original)
        assert tuple(out.shape[-2:]) == expected
        if expected == hw:
            assert out is original  # the same pixels, not a resampled copy


def test_fit_averages_what_it_shrinks():
    """Antialiased: a one-pixel checkerboard shrunk three times is grey, not a moire of black
    and white (each output pixel falls on one input pixel)."""
    checker = (torch.arange(192)[:, None] + torch.arange(192)[None, :]) % 2
    out = FitPreset(64, 64)(checker.float().expand(3, 192, 192))
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=0.05)


def meta(task: str, **kw) -> CheckpointMeta:
    head = {"classify": "linear", "detect": "maskrcnn", "segment": "upernet"}[task]
    arch = {
        "classify": "convnext_atto",
        "detect": "maskrcnn_convnext_atto",
        "segment": "upernet_convnext_atto",
    }[task]
    return CheckpointMeta(
        task=task,
        arch=arch,
        head=head,
        num_classes=2,
        labels=["a", "b"],
        provenance=Provenance(source="trained"),
        **kw,
    )


def test_each_task_gets_its_preset_from_the_checkpoint():
    assert preset_for(
        meta("classify", image_size=96, crop_pct=0.9, interpolation="bilinear")
    ) == ClassifyPreset(96, 0.9, "bilinear")
    assert preset_for(meta("detect", image_size=800)) == FitPreset(800, DETECT_MAX_SIZE)
    detector = meta("detect", image_size=128, model_kwargs={"max_size": 160})
    assert preset_for(detector) == FitPreset(128, 160)
    assert preset_for(meta("segment", image_size=512)) == FitPreset(512, 2048)
