"""Pipelines' config and crops, without a service (the served pipelines: `test_service`)."""

from __future__ import annotations

import pytest

from service.config import AppConfig, check_pipeline_tasks, served_models, served_pipelines
from service.pipelines import crop_rect, step_for


def pipelines_of(user_config: dict) -> list:
    """The pipelines of a server's user_config, as a replica reads them."""
    return served_pipelines(user_config, *served_models(user_config))


MODELS = [
    {"name": "boxes", "checkpoint": "demo:detect"},
    {"name": "shapes", "checkpoint": "demo:classify"},
    {"name": "regions", "checkpoint": "demo:segment"},
]


def pipeline(**settings) -> dict:
    return {"name": "chain", "detector": "boxes", "steps": [{"model": "shapes"}], **settings}


@pytest.mark.parametrize(
    "settings, error",
    [
        ({"detector": "nowhere"}, "pipelines[0] ('chain').detector: no model 'nowhere'"),
        (
            {"steps": [{"model": "shapes"}, {"model": "gone"}]},
            "pipelines[0] ('chain').steps[1].model: no model 'gone'",
        ),
        ({"name": "shapes"}, "pipelines[0] ('shapes').name: 'shapes' is also a model's name"),
        (
            {"steps": [{"model": "chain"}]},
            "pipelines[0] ('chain').steps[0].model: 'chain' is a pipeline; a pipeline runs "
            "models, not other pipelines",
        ),
        ({"steps": []}, "steps\n  List should have at least 1 item"),
        ({"margin": -0.1}, "margin\n  Input should be greater than or equal to 0"),
        ({"stages": []}, "stages\n  Extra inputs are not permitted"),
    ],
)
def test_a_pipeline_that_cannot_run_is_a_config_error_naming_the_field(settings, error):
    with pytest.raises(ValueError) as refused:
        AppConfig.from_args({"models": MODELS, "pipelines": [pipeline(**settings)]})
    assert error in str(refused.value)
    # the same, under the server deployment's user_config
    with pytest.raises(ValueError) as refused:
        pipelines_of({"models": MODELS, "pipelines": [pipeline(**settings)]})
    assert error in str(refused.value)


def test_two_pipelines_of_one_name_are_refused():
    with pytest.raises(ValueError, match=r"pipelines\[0\] \('chain'\).name: .* must be unique"):
        pipelines_of({"models": MODELS, "pipelines": [pipeline(), pipeline()]})


def test_a_pipeline_checks_its_models_tasks_once_they_are_loaded():
    [chain] = pipelines_of({"models": MODELS, "pipelines": [pipeline()]})
    tasks = {"boxes": "detect", "shapes": "classify", "regions": "segment"}
    check_pipeline_tasks([chain], tasks)  # as configured: fine
    segmenting = chain.model_copy(
        update={"steps": [chain.steps[0].model_copy(update={"model": "regions"})]}
    )
    check_pipeline_tasks([segmenting], tasks)
    wrong = chain.model_copy(update={"detector": "shapes"})
    with pytest.raises(
        ValueError, match=r"\('chain'\).detector: 'shapes' is a classify model, not detect"
    ):
        check_pipeline_tasks([wrong], tasks)
    wrong = chain.model_copy(
        update={"steps": [chain.steps[0].model_copy(update={"model": "boxes"})]}
    )
    with pytest.raises(
        ValueError, match=r"steps\[0\].model: 'boxes' is a detect model, not classify or segment"
    ):
        check_pipeline_tasks([wrong], tasks)


def test_a_crop_is_the_box_with_its_margin_within_the_image():
    assert crop_rect([10.0, 20.0, 30.0, 60.0], 100, 100, 0.0) == (10, 20, 30, 60)
    assert crop_rect([10.0, 20.0, 30.0, 60.0], 100, 100, 0.1) == (8, 16, 32, 64)
    assert crop_rect([10.5, 20.5, 30.2, 60.2], 100, 100, 0.0) == (10, 20, 31, 61)  # outward
    assert crop_rect([2.0, 5.0, 98.0, 99.0], 100, 100, 0.5) == (0, 0, 100, 100)  # clipped
    assert crop_rect([99.5, 10.0, 99.9, 20.0], 100, 100, 0.0) == (99, 10, 100, 20)  # one column
    assert crop_rect([10.0, 10.0, 10.0, 20.0], 100, 100, 0.1) is None  # no width
    assert crop_rect([100.0, 10.0, 120.0, 20.0], 100, 100, 0.0) is None  # beside the image


def test_a_box_goes_to_the_first_step_that_takes_its_label():
    [chain] = pipelines_of(
        {
            "models": MODELS,
            "pipelines": [
                pipeline(
                    steps=[
                        {"model": "regions", "classes": ["circle"]},
                        {"model": "shapes", "classes": ["circle", "star"]},
                        {"model": "shapes"},
                    ]
                )
            ],
        }
    )
    assert step_for(chain, "circle") is chain.steps[0]
    assert step_for(chain, "star") is chain.steps[1]
    assert step_for(chain, "square") is chain.steps[2]
    only = chain.model_copy(update={"steps": chain.steps[:2]})
    assert step_for(only, "square") is None


def test_a_pipeline_answer_as_tensors_pads_boxes_and_classes_and_keeps_each_reason():
    """Two images (two boxes, none): boxes padded to the most of an image, a classifier's
    classes to the largest top_k of its steps, a segment step's map as its PNG, a held-back
    box's reason in `box_errors` with an empty crop."""
    import base64

    import numpy as np

    from service.config import PipelineConfig
    from service.pipelines import tensor_outputs, tensors

    config = PipelineConfig(
        name="chain",
        detector="boxes",
        steps=[
            {"model": "shapes", "classes": ["square"], "top_k": 2},
            {"model": "regions"},
        ],
    )
    tasks = {"shapes": "classify", "regions": "segment"}
    png = b"\x89PNG not really"
    square = {"label": "square", "class_id": 1, "score": 0.9, "box": [1, 2, 30, 40]}
    square["crop"] = [0, 0, 33, 44]
    square["classify"] = {
        "model": "shapes",
        "version": "1",
        "predictions": [{"label": "square", "class_id": 1, "score": 0.8}],
    }
    star = {"label": "star", "class_id": 3, "score": 0.7, "box": [50, 50, 60, 60]}
    star["crop"] = [49, 49, 61, 61]
    star["segment"] = {"model": "regions", "mask": {"data": base64.b64encode(png).decode()}}
    held = {"label": "star", "class_id": 3, "score": 0.6, "box": [5, 5, 5, 9]}
    held["error"] = "not sent on: the box is empty"
    answer = {"results": [{"detections": [square, star, held]}, {"detections": []}]}

    out = tensors(config, tasks, answer)
    assert set(out) == {name for name, _, _ in tensor_outputs(config, tasks)}
    assert out["num_detections"].tolist() == [3, 0]
    assert out["boxes"].shape == (2, 3, 4) and out["box_class_ids"].shape == (2, 3, 2)
    assert out["labels"][0] == [b"square", b"star", b"star"] and out["labels"][1] == [b""] * 3
    assert out["crop_boxes"][0].tolist() == [[0, 0, 33, 44], [49, 49, 61, 61], [0, 0, 0, 0]]
    assert out["box_models"][0] == [b"shapes", b"regions", b""]
    assert out["box_class_ids"][0].tolist() == [[1, -1], [-1, -1], [-1, -1]]
    assert np.allclose(out["box_scores"][0, 0], [0.8, 0.0])
    assert out["box_labels"][0][0] == [b"square", b""]
    assert out["box_class_maps"][0] == [b"", png, b""]
    assert out["box_errors"][0] == [b"", b"", b"not sent on: the box is empty"]
    assert (out["class_ids"][1] == -1).all()
