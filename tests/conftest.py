"""Shared fixtures: a tiny synthetic project, its YOLO dataset and a tiny trained model, each built
once per session with the project's own stage functions; an MLflow store private to the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before anything imports MLflow or ultralytics: the tests never touch the project's own store.
os.environ["DETOPS_CACHE_DIR"] = str(Path(__file__).resolve().parents[1] / ".cache")

from pipelines import environment  # noqa: E402

# Every test process gets ultralytics as the pipeline configures it (offline, no own MLflow run, PIL's
# own errors), whichever test happens to import it first.
environment.configure_ultralytics()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite MLflow store for the whole session, exported as MLFLOW_TRACKING_URI."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def raw_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Label Studio project (export.json, images/, labeling_config.xml), 48 images."""
    from labeling.synthetic import synthesize
    from pipelines.config.data import SynthesizeConfig

    out = tmp_path_factory.mktemp("raw")
    synthesize(SynthesizeConfig(out=out, n_images=48, seed=1, min_side=96, max_side=160))
    return out


@pytest.fixture(scope="session")
def yolo_dataset(raw_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The raw project ingested into a split YOLO dataset."""
    from labeling.ingest import ingest
    from pipelines.config.data import IngestConfig

    out = tmp_path_factory.mktemp("dataset") / "dataset"
    ingest(IngestConfig(export=raw_project / "export.json",
                        labeling_config=raw_project / "labeling_config.xml", out=out))
    return out


@pytest.fixture(scope="session")
def trained_model_dir(yolo_dataset: Path, mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for real (imgsz 64, 2 epochs): best.pt, model.onnx, model_card.json."""
    from pipelines.config.model import TrainConfig
    from training.train import train

    out = tmp_path_factory.mktemp("models")
    side = tmp_path_factory.mktemp("train")  # ultralytics' run folder and the DVC report, out of the checkout
    train(TrainConfig(dataset=yolo_dataset, out=out, imgsz=64, epochs=2, batch=8, workers=0,
                      experiment="tests", runs=side / "runs", report=side / "report"))
    return out


REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coco128-train"


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 128 real photos of ../shared/realdata/coco128-train (README there: sources, licences) as a
    writable tree of symlinks: the folder is read-only and ultralytics writes labels.cache beside
    labels/. Never copied into the repository. Missing: a failure under CI=true, else a skip saying so."""
    if not (REAL_PHOTOS / "export.json").is_file():
        message = f"the real photos are missing: {REAL_PHOTOS} (the shared realdata folder) is not there"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("real_photos")
    for entry in REAL_PHOTOS.iterdir():
        if entry.is_dir():
            (root / entry.name).mkdir()
            for item in entry.iterdir():
                (root / entry.name / item.name).symlink_to(item)
        else:
            (root / entry.name).symlink_to(entry)
    return root


@pytest.fixture(scope="session")
def loop_base(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The feedback loop's starting point, trained once per session: an easy synthetic project (2
    classes, 120 images of 96-160 px, no label noise) and a model trained 40 epochs at imgsz 64 that
    reaches COCO mAP@.5:.95 >= 0.3 on its test split (measured 2026-12-05: 0.42 on 19 test images). Its
    `night` slice goes from 0.075 to 0.29 with 26 training labels (95% CI of the gain [+0.14, +0.32]) and
    to 0.21 with 3; the base split's interval is too wide here for the 0.01 lower-end gate. Returns (LoopConfig at the test's tiny sizes, monitoring.loop.Base)."""
    from monitoring.loop import prepare_base
    from pipelines.config.monitoring import LoopConfig

    root = tmp_path_factory.mktemp("loop")
    cfg = LoopConfig(work=root / "work", out=root / "out", classes=["square", "circle"], base_images=120, imgsz=64,
                     base_epochs=40, batch=8, traffic=60, labels=40, few_labels=3, finetune_epochs=10,
                     min_target_improvement=0.03, min_window=30, min_reference=10, bootstrap_samples=200,
                     experiment="tests-loop")
    return cfg, prepare_base(cfg, root / "base", say=lambda _: None)
