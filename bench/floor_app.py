"""The floor of `serve_bench.py --floor`: Ray Serve's front end with nothing behind it.

The same Ray settings, HAProxy front and replica layout as `convnext-serve run`, and a
`POST /v1/classify` that reads the whole body and answers a fixed top-5 of the service's shape,
so what a request costs here is what Ray Serve, HAProxy, uvicorn and FastAPI cost before the
service's own code runs: the least CPU a request can take on this stack.

    python -m bench.floor_app --port 8000 --replicas 2
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.config import LOGGING_CONFIG
from service.run import apply_serving_env

api = FastAPI()
ANSWER = {
    "model": "floor",
    "results": [
        {"predictions": [{"label": f"class {i}", "class_id": i, "score": 0.2} for i in range(5)]}
    ],
}


@api.get("/readyz")
async def readyz() -> dict:
    return {"status": "ready"}


@api.post("/v1/classify")
async def classify(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse(ANSWER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    apply_serving_env({"applications": []})  # as `convnext-serve run` sets them up
    # Ray after the environment: its modules read some of it when imported
    import ray
    from ray import serve

    # "bench" / "server": the names serve_bench.py's CPU accounting looks for
    @serve.deployment(
        name="server",
        num_replicas=args.replicas,
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
        logging_config=LOGGING_CONFIG,
    )
    @serve.ingress(api)
    class Floor:
        """No model: the routes of `api` answer at once."""

    ray.init(num_cpus=os.cpu_count())
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Floor.bind(), name="bench", route_prefix="/")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
