"""The demo models are right on what people show them, not only on their own generator.

The three demo models, trained by `models.demo`'s recipes exactly as `make run` trains them,
scored on held-out drawn shapes they never trained on (`drawn_shapes.py`: the page's samples
and shapes drawn with Pillow), through the service's own runner. The thresholds leave margin
for another CPU's rounding and thread timing; docs/demo-models.md has the figures.
"""

from __future__ import annotations

import numpy as np
import pytest

from .demo_models import demo_checkpoints
from .demo_quality import (
    SERVED_SCORE_THRESHOLD,
    classify_scores,
    detect_scores,
    outputs,
    pipeline_scores,
    runner_for,
    segment_scores,
)
from .drawn_shapes import KINDS, box_iou, box_of, held_out, held_out_scenes, page_sample

pytestmark = [pytest.mark.slow, pytest.mark.needs_models("demo")]


@pytest.fixture(scope="module")
def checkpoints():
    return demo_checkpoints()


@pytest.fixture(scope="module")
def drawn():
    return held_out()


def test_the_classifier_names_drawn_shapes(checkpoints, drawn):
    scores = classify_scores(runner_for(checkpoints["classify"]), drawn)
    figures = scores.figures
    assert figures["top1"] >= 0.90, scores
    assert all(figures[f"top1 {kind}"] >= 0.80 for kind in KINDS), scores
    assert not [w for w in scores.wrong if w.startswith("page ")], scores  # the first click


def test_the_detector_finds_one_drawn_shape_with_few_extra_boxes(checkpoints, drawn):
    scores = detect_scores(runner_for(checkpoints["detect"]), drawn)
    assert scores.figures["best right"] >= 0.90, scores
    assert scores.figures["extra"] <= 0.10, scores  # another box scoring >= 0.5


def test_the_segmenter_covers_drawn_shapes_with_their_class(checkpoints, drawn):
    scores = segment_scores(runner_for(checkpoints["segment"]), drawn)
    assert scores.figures["shape IoU"] >= 0.70, scores


def test_the_page_scene_is_detected_and_segmented_shape_by_shape(checkpoints):
    scene = page_sample("scene")
    detector = runner_for(checkpoints["detect"])
    (found,) = outputs(detector, [scene], score_threshold=SERVED_SCORE_THRESHOLD)
    labels = [detector.meta.labels[int(c)] for c in found.class_ids]
    assert sorted(labels) == sorted(KINDS), labels
    for kind, mask in scene.shapes:
        box = found.boxes[labels.index(kind)]
        assert box_iou(box, box_of(mask)) >= 0.5, (kind, box, box_of(mask))
    segmenter = runner_for(checkpoints["segment"])
    (class_map,) = outputs(segmenter, [scene])
    for kind, mask in scene.shapes:
        said = class_map == segmenter.meta.labels.index(kind)
        assert (said & mask).sum() / (said | mask).sum() >= 0.5, kind
    assert np.mean(class_map[~np.any([m for _, m in scene.shapes], axis=0)] == 0) > 0.95


def test_the_demo_pipeline_finds_and_names_each_shape_of_drawn_scenes(checkpoints):
    """The detector's boxes, each cropped and classified as the service's pipeline does it."""
    detector = runner_for(checkpoints["detect"], "detector")
    classifier = runner_for(checkpoints["classify"], "classifier")
    scores = pipeline_scores(detector, classifier, held_out_scenes())
    assert scores.figures["found"] >= 0.90, scores
    assert scores.figures["named right"] >= 0.85, scores
    assert scores.figures["extra boxes"] <= 0.5, scores
    assert not [w for w in scores.wrong if w.startswith("page ")], scores  # the page's sample
