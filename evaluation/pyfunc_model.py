"""The registry's model: an MLflow pyfunc that wraps the shared `serving.runtime.ModelRuntime`.

Input: a pandas DataFrame with one row per image and a column `image` holding the *encoded* image
bytes (JPEG, PNG, ... as read from a file; EXIF orientation is applied). Over MLflow's REST scoring
server the bytes travel base64-encoded, as MLflow does for every `binary` column.

Params (optional, per call): `conf`, `iou`, `max_det`; their defaults are the model card's thresholds.
`conf` filters on the calibrated confidence.

Output: a DataFrame with one row per detection, columns `OUTPUT_COLUMNS`: `image_index` (the input
row), the box `x1, y1, x2, y2` in pixels of the original image, `class_id`, `class_name`,
`confidence` (calibrated) and `raw_confidence` (the model's score).

The logged model carries its code (this module and every project module it imports, found by
`pipelines.imports`), so `mlflow.pyfunc.load_model` works in an environment with numpy, pandas,
pillow, pydantic, pyyaml, opencv and onnxruntime but without the repository.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from pipelines.registry import MODEL_DIR_ARTIFACT

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ["image_index", "x1", "y1", "x2", "y2", "class_id", "class_name", "confidence",
                  "raw_confidence"]


class DetectorPyfunc(mlflow.pyfunc.PythonModel):
    """Object detector over encoded images; see the module docstring for the input and output."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the shared runtime from the logged model folder."""
        from serving.runtime import ModelRuntime

        self.runtime = ModelRuntime.load(context.artifacts[MODEL_DIR_ARTIFACT])

    # A DataFrame hint gives MLflow no schema to infer (the logged signature stays the explicit one)
    # and stops its "add type hints" warning on every import.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Detections of every image of `model_input` (DataFrame with column `image`), one row each."""
        from pipelines.errors import DetopsError
        from pipelines.images import read_rgb

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if INPUT_COLUMN not in frame.columns:
            raise DetopsError(f"the input needs a column '{INPUT_COLUMN}' (got {list(frame.columns)})")
        images = []
        for i, data in enumerate(frame[INPUT_COLUMN]):
            if not isinstance(data, (bytes, bytearray)):
                raise DetopsError(f"row {i}: column '{INPUT_COLUMN}' must hold encoded image bytes, "
                                  f"got {type(data).__name__}")
            images.append(read_rgb(data, name=f"row {i}"))
        params = params or {}
        detections = self.runtime.predict(images, conf=params.get("conf"), iou=params.get("iou"),
                                          max_det=params.get("max_det"))
        names = self.runtime.class_names
        rows = [(i, d.box.x1, d.box.y1, d.box.x2, d.box.y2, d.class_id, names[d.class_id], d.confidence,
                 d.raw_confidence)
                for i, per_image in enumerate(detections) for d in per_image]
        out = pd.DataFrame(rows, columns=OUTPUT_COLUMNS)
        # Typed even when empty, so the output always matches the logged signature.
        return out.astype({"image_index": "int64", "x1": "float64", "y1": "float64", "x2": "float64",
                           "y2": "float64", "class_id": "int64", "class_name": "str",
                           "confidence": "float64", "raw_confidence": "float64"})


def signature(card: Any) -> Any:
    """The model signature: the `image` bytes column in, the detection columns out, and the
    `conf`/`iou`/`max_det` params with the card's thresholds as defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema([ColSpec("long", "image_index"), *(ColSpec("double", c) for c in ("x1", "y1", "x2", "y2")),
                      ColSpec("long", "class_id"), ColSpec("string", "class_name"),
                      ColSpec("double", "confidence"), ColSpec("double", "raw_confidence")])
    params = ParamSchema([ParamSpec("conf", "double", card.thresholds.conf),
                          ParamSpec("iou", "double", card.thresholds.iou),
                          ParamSpec("max_det", "long", card.thresholds.max_det)])
    return ModelSignature(inputs=Schema([ColSpec("binary", INPUT_COLUMN)]), outputs=outputs, params=params)
