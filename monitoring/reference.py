"""The reference profile: the features the prediction log records, computed on the dataset's test
split with the same model runtime, so that drift compares like with like."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from monitoring.logger import make_record
from monitoring.store import PredictionRecord, records_frame
from pipelines.errors import DetopsError
from pipelines.images import read_rgb
from pipelines.types import YoloDataset

if TYPE_CHECKING:
    import pandas as pd

    from serving.runtime import ModelRuntime

BATCH = 16


def featurize_files(runtime: ModelRuntime, paths: Sequence[Path], *, model_version: str = "reference",
                    keep_paths: bool = False) -> list[PredictionRecord]:
    """Predict on image files and featurize each exactly as the prediction logger does. The sha256 is
    the file's bytes, as serving hashes the uploaded bytes."""
    records = []
    for start in range(0, len(paths), BATCH):
        chunk = list(paths[start:start + BATCH])
        images = [read_rgb(p) for p in chunk]
        for path, image, dets in zip(chunk, images, runtime.predict(images)):
            records.append(make_record(
                image, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), request_id=path.name,
                detections=dets, class_names=runtime.class_names, model_name=runtime.card.name,
                model_version=model_version, ts=datetime.now(timezone.utc),
                image_path=str(path) if keep_paths else None))
    return records


def build_reference(model_dir: Path, dataset_root: Path, split: str = "test") -> pd.DataFrame:
    """Per-image features (statistics, prediction summary, embedding) of one split of a YOLO dataset,
    predicted by the model in `model_dir` through the shared `ModelRuntime`."""
    from serving.runtime import ModelRuntime

    dataset = YoloDataset.load(dataset_root)
    paths = dataset.images(split)
    if not paths:
        raise DetopsError(f"{dataset_root}: split {split!r} has no images to build a reference from")
    runtime = ModelRuntime.load(Path(model_dir))
    return records_frame(featurize_files(runtime, paths))


def save_reference(df: pd.DataFrame, path: Path) -> Path:
    """Write the reference profile as parquet (the folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)
    return path


def load_reference(path: Path | None = None, *, model_name: str = "detops-detector",
                   alias: str = "champion") -> pd.DataFrame:
    """The reference profile from `path`, else the one logged with the registry version
    `models:/<name>@<alias>` (its training run's `evaluation/reference.parquet`)."""
    import pandas as pd

    from pipelines import registry

    if path is None:
        version = str(registry.resolve(model_name, alias=alias).version)
        path = registry.download_run_artifact(model_name, version, registry.REFERENCE_ARTIFACT)
    path = Path(path)
    if not path.is_file():
        raise DetopsError(f"{path}: reference profile not found (build it with monitoring.reference)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DetopsError(f"{path}: not a readable parquet reference ({type(exc).__name__}: {exc})") from None
