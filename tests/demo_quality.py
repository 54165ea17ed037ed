"""How right a served model is on the held-out drawn shapes (`drawn_shapes.py`).

Each score runs the images through the service's own `ModelRunner` (its decoder, the
checkpoint's preprocessing, its batch call), so what is scored is what `/v1/*` answers.
`tests/test_demo_models.py` asserts the thresholds; `bench/demo_quality.py` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.config import DEMO_PIPELINE, ModelConfig, PipelineConfig
from service.pipelines import select_crops
from service.runtime import BatchItem, ModelRunner
from service.tasks import ADAPTERS, ClassifyOptions

from .drawn_shapes import KINDS, Drawn, box_iou, box_of

SERVED_SCORE_THRESHOLD = 0.5  # the service's default for /v1/detect


def runner_for(checkpoint, name: str = "heldout") -> ModelRunner:
    return ModelRunner(ModelConfig(name=name, checkpoint=str(checkpoint)))


def outputs(runner: ModelRunner, drawn: list[Drawn], **options) -> list:
    task = ADAPTERS[runner.meta.task]
    entries = [BatchItem(d.png(), task.options(**options)) for d in drawn]
    return _run(runner, entries)


def _run(runner: ModelRunner, entries: list[BatchItem]) -> list:
    results = []
    for start in range(0, len(entries), 8):
        results += runner.run_batch(entries[start : start + 8])
    return results


@dataclass
class Scores:
    """One model's figures on the held-out set, and the images it got wrong."""

    figures: dict[str, float]
    wrong: list[str] = field(default_factory=list)


def classify_scores(runner: ModelRunner, drawn: list[Drawn]) -> Scores:
    """Top-1 overall and for each kind."""
    labels = runner.meta.labels
    hits: dict[str, list[bool]] = {k: [] for k in KINDS}
    wrong = []
    for d, out in zip(drawn, outputs(runner, drawn, top_k=1), strict=True):
        ((kind, _),) = d.shapes
        ((class_id, score),) = out
        hits[kind].append(labels[class_id] == kind)
        if not hits[kind][-1]:
            wrong.append(f"{d.name}: {labels[class_id]} {score:.2f}")
    figures = {"top1": float(np.mean([hit for kind in KINDS for hit in hits[kind]]))}
    figures |= {f"top1 {k}": float(np.mean(v)) for k, v in hits.items()}
    return Scores(figures, wrong)


def detect_scores(runner: ModelRunner, drawn: list[Drawn]) -> Scores:
    """On one-shape images: how often the best box has the right label and IoU >= 0.5 with the
    shape's box, and how often other boxes score at least the served threshold."""
    labels = runner.meta.labels
    right, extra, wrong = [], [], []
    for d, out in zip(drawn, outputs(runner, drawn, score_threshold=0.05), strict=True):
        ((kind, mask),) = d.shapes
        if len(out.scores):  # scores descending: the first box is the best
            label, iou = labels[int(out.class_ids[0])], box_iou(out.boxes[0], box_of(mask))
            said = f"{label} {out.scores[0]:.2f} IoU {iou:.2f}"
        else:
            label, iou, said = None, 0.0, "nothing"
        ok = label == kind and iou >= 0.5
        more = int((out.scores[1:] >= SERVED_SCORE_THRESHOLD).sum())
        right.append(ok)
        extra.append(more > 0)
        if not ok or more:
            wrong.append(f"{d.name}: {said}, {more} extra")
    return Scores({"best right": float(np.mean(right)), "extra": float(np.mean(extra))}, wrong)


def segment_scores(runner: ModelRunner, drawn: list[Drawn]) -> Scores:
    """On one-shape images: the mean IoU of the pixels given the shape's class with the shape."""
    labels = runner.meta.labels
    ious, wrong = [], []
    for d, class_map in zip(drawn, outputs(runner, drawn), strict=True):
        ((kind, mask),) = d.shapes
        said = class_map == labels.index(kind)
        iou = float((said & mask).sum() / max(1, (said | mask).sum()))
        ious.append(iou)
        if iou < 0.5:
            wrong.append(f"{d.name}: IoU {iou:.2f}")
    return Scores({"shape IoU": float(np.mean(ious))}, wrong)


def pipeline_scores(
    detector: ModelRunner,
    classifier: ModelRunner,
    scenes: list[Drawn],
    pipeline: PipelineConfig | None = None,
) -> Scores:
    """The demo pipeline on scenes of several shapes, each box's crop cut as the service cuts
    it (`service.pipelines.select_crops`): of all the shapes, how many a box found (IoU >= 0.5)
    and how many the classifier then named right from that box's crop; and the boxes that
    found no shape."""
    pipeline = pipeline or PipelineConfig(**DEMO_PIPELINE)
    task = ADAPTERS["detect"]
    found_by = outputs(detector, scenes, score_threshold=pipeline.score_threshold)
    results = [task.result(detector.meta, out) for out in found_by]
    jobs, _ = select_crops(pipeline, [s.image for s in scenes], results)
    crops = [job for items in jobs.values() for job in items]
    named = _run(classifier, [BatchItem(crop, ClassifyOptions(1)) for _, _, crop in crops])
    for (detection, _, _), ((class_id, _),) in zip(crops, named, strict=True):
        detection["named"] = classifier.meta.labels[class_id]
    found, right, extra, wrong = [], [], 0, []
    for scene, result in zip(scenes, results, strict=True):
        boxes = [d["box"] for d in result["detections"]]
        used = set()
        for kind, mask in scene.shapes:
            ious = [box_iou(box, box_of(mask)) for box in boxes]
            best = int(np.argmax(ious)) if ious else -1
            hit = best >= 0 and ious[best] >= 0.5
            said = result["detections"][best].get("named") if hit else None
            found.append(hit)
            right.append(said == kind)
            used.add(best)
            if said != kind:
                wrong.append(f"{scene.name}: {kind} named {said or 'nothing: not found'}")
        extra += len(boxes) - len(used - {-1})
    figures = {
        "found": float(np.mean(found)),
        "named right": float(np.mean(right)),
        "extra boxes": extra / len(scenes),
    }
    return Scores(figures, wrong)


SCORES = {"classify": classify_scores, "detect": detect_scores, "segment": segment_scores}
