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
