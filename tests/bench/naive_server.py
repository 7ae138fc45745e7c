"""The baseline the serving benchmark compares with: a naive per-request detection server.

FastAPI + uvicorn with one worker, the ultralytics model loaded once from `best.pt`, and every
POST /detect running `YOLO.predict` on its one image at the model's imgsz: no batching, torch pre- and
post-processing, the pattern of the seed systems. The endpoint is `async` and calls predict directly,
so requests run one at a time (an ultralytics predictor is not safe to share between threads).

`python -m tests.bench.naive_server --weights models/best.pt --imgsz 160 --port 8001` (127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Annotated

# At module level: FastAPI resolves the endpoint's annotations (strings here) in this namespace.
from fastapi import FastAPI, File, UploadFile


def create_app(weights: Path, imgsz: int):
    """The FastAPI app: GET /healthz, POST /detect (multipart field `image`) -> detections JSON."""
    import numpy as np
    from PIL import Image
    from ultralytics import YOLO

    model = YOLO(str(weights))
    model.predict(np.full((imgsz, imgsz, 3), 114, np.uint8), imgsz=imgsz, verbose=False)  # warm up
    app = FastAPI(title="naive detector")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/detect")
    async def detect(image: Annotated[UploadFile, File()]) -> dict:
        with Image.open(io.BytesIO(await image.read())) as im:
            rgb = np.asarray(im.convert("RGB"))
        result = model.predict(rgb[..., ::-1], imgsz=imgsz, verbose=False)[0]  # ultralytics wants BGR arrays
        boxes = result.boxes
        return {"image": {"width": rgb.shape[1], "height": rgb.shape[0]},
                "detections": [{"box": dict(zip(("x1", "y1", "x2", "y2"), map(float, xyxy))),
                                "class_id": int(c), "class_name": result.names[int(c)], "confidence": float(p)}
                               for xyxy, c, p in zip(boxes.xyxy.tolist(), boxes.cls.tolist(), boxes.conf.tolist())]}

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve the naive app on 127.0.0.1 with one uvicorn worker."""
    from pipelines import environment

    environment.configure_ultralytics()  # offline switches; no tracking callbacks
    parser = argparse.ArgumentParser(prog="python -m tests.bench.naive_server", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="ultralytics weights (best.pt)")
    parser.add_argument("--imgsz", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(args.weights, args.imgsz), host="127.0.0.1", port=args.port, workers=1,
                log_level="warning")


if __name__ == "__main__":
    main()
