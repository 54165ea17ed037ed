"""The naive baseline of `serve_bench.py`: plain FastAPI + uvicorn, one forward pass per request.

Same decode and preprocessing code as the service (so only the serving design differs), the
model run in FastAPI's thread pool, one request (its images in one batch) at a time.
"""

import os

from fastapi import FastAPI, File, UploadFile

from service.config import ModelConfig
from service.runtime import BatchItem, ModelRunner
from service.tasks import ClassifyOptions

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
    entries = [BatchItem(upload.file.read(), ClassifyOptions(5)) for upload in image]
    results = runner.run_batch(entries)  # the request's images in one forward pass
    return {
        "results": [
            {"predictions": [{"label": meta.labels[c], "score": s} for c, s in top]}
            for top in results
        ]
    }
