"""Instance masks (`models.masks`) against their references: pycocotools' own RLE decoding, and
torchvision's `paste_masks_in_image`, which the service's memory-light paste must equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from models.masks import decode_rle, encode_rle, paste_masks_rle


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (48, 64)])
def test_rle_round_trips_any_mask(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (np.zeros(shape, bool), np.ones(shape, bool), rng.random(shape) > 0.5):
        rle = encode_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        decoded = decode_rle(rle)
        assert decoded.dtype == bool and np.array_equal(decoded, mask)


def test_a_binary_mask_of_any_integer_or_bool_type_encodes_alike():
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2:6] = True
    want = encode_rle(mask)
    for dtype in (np.uint8, np.int32, np.int64):
        assert encode_rle(mask.astype(dtype)) == want, dtype


def test_the_rle_is_cocos_own():
    """pycocotools reads what the service writes, and the service reads pycocotools' bytes."""
    mask = np.zeros((6, 9), bool)
    mask[1:4, 2:8] = True
    rle = encode_rle(mask)
    coco = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert np.array_equal(mask_utils.decode(coco).astype(bool), mask)
    assert int(mask_utils.area(coco)) == mask.sum() == 18
    assert np.array_equal(decode_rle(mask_utils.encode(np.asfortranarray(mask, np.uint8))), mask)


def _reference(masks, boxes, height, width, threshold=0.5) -> np.ndarray:
    pasted = paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)
    return (pasted[:, 0] >= threshold).numpy()


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_pasted_masks_equal_torchvisions_paste(threshold):
    """Boxes inside the image, over its edges, a few pixels wide, and the whole image; those
    wholly outside it (below and right; left, beside it) are empty, where torchvision's paste
    fails."""
    height, width = 60, 80
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(
        [
            [10.0, 5.0, 50.0, 40.0],
            [-12.0, -7.0, 20.5, 15.2],
            [70.0, 50.0, 95.0, 72.0],
            [33.3, 21.7, 35.1, 23.9],
            [0.0, 0.0, 80.0, 60.0],
            [100.0, 80.0, 120.0, 90.0],
            [-40.0, 10.0, -12.0, 30.0],
        ]
    )
    masks = torch.rand((len(boxes), 28, 28), generator=g)
    got = [decode_rle(r) for r in paste_masks_rle(masks, boxes, height, width, threshold)]
    want = _reference(masks[:5], boxes[:5], height, width, threshold)
    assert len(got) == len(boxes)
    for i, (mine, theirs) in enumerate(zip(got, want, strict=False)):
        assert mine.shape == (height, width)
        assert np.array_equal(mine, theirs), (i, int((mine != theirs).sum()))
    assert all(m.any() for m in got[:5]) and not got[5].any() and not got[6].any()


def test_boxes_a_pixel_wide_or_high_equal_torchvisions_paste():
    """Boxes whose width or height rounds to nothing are resized to one pixel, as torchvision
    does; a single detection is pasted too."""
    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor(
        [[12.0, 5.0, 12.0, 30.0], [3.0, 17.0, 40.0, 17.0], [20.0, 20.0, 20.4, 20.4]]
    )
    masks = torch.rand((len(boxes), 28, 28), generator=g)
    want = _reference(masks, boxes, 48, 64)
    for i in range(len(boxes)):
        (rle,) = paste_masks_rle(masks[i : i + 1], boxes[i : i + 1], 48, 64)
        assert np.array_equal(decode_rle(rle), want[i]), i
        assert want[i].any(), i  # not vacuous: each of these masks has pixels


def test_a_pixel_at_the_threshold_is_in_the_mask():
    (rle,) = paste_masks_rle(torch.full((1, 28, 28), 0.5), torch.tensor([[4.0, 4, 20, 20]]), 32, 32)
    assert decode_rle(rle)[12, 12]
    (rle,) = paste_masks_rle(
        torch.full((1, 28, 28), 0.49), torch.tensor([[4.0, 4, 20, 20]]), 32, 32
    )
    assert not decode_rle(rle).any()


def test_masks_and_boxes_must_pair_up():
    with pytest.raises(ValueError):
        paste_masks_rle(torch.ones((2, 28, 28)), torch.tensor([[0.0, 0, 9, 9]]), 16, 16)


def test_each_mask_is_its_own():
    """The canvas is reused: a mask must not keep pixels of the one before it."""
    boxes = torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 60.0, 60.0]])
    masks = torch.ones((2, 14, 14))
    first, second = (decode_rle(r) for r in paste_masks_rle(masks, boxes, 64, 64))
    assert first[5, 5] and not first[50, 50]
    assert second[50, 50] and not second[5, 5]


def test_no_detections_no_masks():
    assert paste_masks_rle(torch.zeros((0, 28, 28)), torch.zeros((0, 4)), 10, 10) == []
