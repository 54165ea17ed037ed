"""The naive baseline of `serve_bench.py`: plain FastAPI + uvicorn, one forward pass per request.

Same decode and preprocessing code as the service (so only the serving design differs), the
model run in FastAPI's thread pool, one request (its images in one batch) at a time.
"""

import io
import os

import numpy as np
import torch
from fastapi import FastAPI, File, UploadFile
from PIL import Image

from models.classification import resize_crop
from service.config import ModelConfig
from service.runtime import ClassifyItem, ModelRunner

runner = ModelRunner(
    ModelConfig(
        name="naive",
        checkpoint=os.environ["BENCH_CHECKPOINT"],
        precision=os.environ.get("BENCH_PRECISION", "fp32"),
    )
)
meta = runner.meta
app = FastAPI()


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@app.post("/v1/classify")
def classify(image: list[UploadFile] = File(...)) -> dict:
    views = []
    for upload in image:
        pixels = np.asarray(Image.open(io.BytesIO(upload.file.read())).convert("RGB"))
        view = resize_crop(
            torch.from_numpy(pixels).permute(2, 0, 1), meta.image_size, meta.crop_pct,
            meta.interpolation,
        )  # fmt: skip
        views.append(ClassifyItem(view.numpy(), 5))
    results = runner.run(views)  # the request's images in one forward pass
    return {
        "results": [
            {"predictions": [{"label": meta.labels[c], "score": s} for c, s in top]}
            for top in results
        ]
    }
