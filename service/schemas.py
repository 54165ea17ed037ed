"""The HTTP API's response bodies as pydantic models, with examples (docs/serving-api.md).

Used as the routes' `response_model`, so `/docs` and `/openapi.json` show the real schemas. The
handlers build plain dicts and answer `JSONResponse`s (FastAPI then skips re-validating every
response, a cost each request would pay); the service tests validate real answers against
these models, so the schemas cannot drift from what is sent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import PipelineConfig


def _example(example: dict) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": [example]})


class ErrorBody(BaseModel):
    code: str = Field(description="snake_case error code, e.g. invalid_image")
    message: str = Field(description="what went wrong, for people")


class ErrorResponse(BaseModel):
    model_config = _example(
        {"error": {"code": "invalid_image", "message": "image 0: not a decodable image"}}
    )
    error: ErrorBody


class Prediction(BaseModel):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)


class ClassifyResult(BaseModel):
    predictions: list[Prediction] = Field(description="top_k classes, best first")


class ClassifyResponse(BaseModel):
    model_config = _example(
        {
            "model": "shapes-classifier",
            "version": "1",
            "results": [{"predictions": [{"label": "circle", "class_id": 0, "score": 0.97}]}],
        }
    )
    model: str
    version: str = Field(description="the model version that answered (also `X-Model-Version`)")
    results: list[ClassifyResult] = Field(description="one per input image, in input order")


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (pycocotools)")


class Detection(BaseModel):
    label: str
    class_id: int
    score: float = Field(ge=0, le=1)
    box: list[float] = Field(description="[x1, y1, x2, y2] in the input image's pixels")
    mask: RLE | None = Field(None, description="absent with masks=false")


class DetectResult(BaseModel):
    width: int
    height: int
    detections: list[Detection]


class DetectResponse(BaseModel):
    model_config = _example(
        {
            "model": "shapes-detector",
            "version": "1",
            "results": [
                {
                    "width": 640,
                    "height": 480,
                    "detections": [
                        {
                            "label": "circle",
                            "class_id": 0,
                            "score": 0.97,
                            "box": [12.5, 40.0, 210.0, 230.5],
                            "mask": {"size": [480, 640], "counts": "<COCO RLE>"},
                        }
                    ],
                }
            ],
        }
    )
    model: str
    version: str = Field(description="the model version that answered (also `X-Model-Version`)")
    results: list[DetectResult]


class ModelVersion(BaseModel):
    model: str
    version: str


class PipelineClassify(ClassifyResult):
    model: str
    version: str


class PipelineDetection(Detection):
    crop: list[int] | None = Field(
        None,
        description="the pixels sent on (left, top, right, bottom): the box with its margin, "
        "where a segment step's map goes",
    )
    classify: PipelineClassify | None = Field(None, description="a classify step's answer")
    segment: dict[str, Any] | None = Field(
        None, description="a segment step's answer (as /v1/segment's, for the crop)"
    )
    error: str | None = Field(None, description="why the box has no second model's answer")


class PipelineResult(BaseModel):
    width: int
    height: int
    detections: list[PipelineDetection]


class PipelineResponse(BaseModel):
    model_config = _example(
        {
            "pipeline": "shapes-inside-boxes",
            "detector": {"model": "shapes-detector", "version": "1"},
            "results": [
                {
                    "width": 640,
                    "height": 480,
                    "detections": [
                        {
                            "label": "star",
                            "class_id": 3,
                            "score": 0.97,
                            "box": [12.5, 40.0, 210.0, 230.5],
                            "crop": [0, 21, 230, 250],
                            "classify": {
                                "model": "shapes-classifier",
                                "version": "1",
                                "predictions": [{"label": "star", "class_id": 2, "score": 0.9}],
                            },
                        }
                    ],
                }
            ],
        }
    )
    pipeline: str
    detector: ModelVersion
    results: list[PipelineResult] = Field(description="one per input image, in input order")


class SegmentClass(BaseModel):
    class_id: int
    label: str
    pixel_fraction: float = Field(ge=0, le=1)


class ClassMap(BaseModel):
    format: Literal["png"] = "png"
    data: str = Field(description="base64 PNG, one class id per pixel (8 or 16 bit)")


class SegmentResult(BaseModel):
    width: int
    height: int
    classes: list[SegmentClass] = Field(description="the classes present, by class id")
    mask: ClassMap


class SegmentResponse(BaseModel):
    model_config = _example(
        {
            "model": "shapes-segmenter",
            "version": "1",
            "results": [
                {
                    "width": 640,
                    "height": 480,
                    "classes": [{"class_id": 2, "label": "square", "pixel_fraction": 0.21}],
                    "mask": {"format": "png", "data": "<base64 PNG>"},
                }
            ],
        }
    )
    model: str
    version: str = Field(description="the model version that answered (also `X-Model-Version`)")
    results: list[SegmentResult]


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="one entry per version of a model")
    weight: float = Field(description="its share of the requests that name no version")
    task: Literal["classify", "detect", "segment"]
    ready: bool = Field(description="loaded and warmed up")
    device: str | None = Field(description="cpu or cuda; null until loaded")
    precision: str
    metadata: dict[str, Any] = Field(description="the checkpoint's metadata (docs/checkpoints.md)")
    serving: dict[str, Any] = Field(description="batching and scaling settings")


class TrainingProgress(BaseModel):
    model_config = _example(
        {
            "name": "shapes-detector",
            "task": "detect",
            "state": "training",
            "epoch": 1,
            "epochs": 2,
            "fraction": 0.31,
            "eta_s": 540,
        }
    )
    name: str
    task: Literal["classify", "detect", "segment"]
    state: Literal["waiting", "synthesising", "training", "done", "failed"] = Field(
        description="done: trained, joining the served models"
    )
    epoch: int | None = None
    epochs: int | None = None
    fraction: float | None = Field(None, ge=0, le=1, description="of the whole training")
    eta_s: float | None = Field(None, description="seconds it expects to need still")
    error: str | None = Field(None, description="why it failed")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    training: list[TrainingProgress] = Field(
        default_factory=list, description="models still training: served once trained"
    )
    update_errors: dict[str, str] = Field(
        default_factory=dict,
        description="by model: why its last update could not be served (it serves as before)",
    )
    pipelines: list[PipelineConfig] = Field(
        default_factory=list, description="the pipelines served (`/v1/pipelines/{name}`)"
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    model_config = _example({"status": "starting", "waiting_for": ["shapes-detector"]})
    status: Literal["ready", "starting"]
    models: list[str] | None = None
    waiting_for: list[str] | None = None
    training: list[TrainingProgress] | None = Field(
        None, description="models still training, not waited for: served once trained"
    )
