"""`detops build`: registry model -> BentoML model store -> bento.

The registry alias (serve.alias, default champion) of serve.model_name is resolved to a version, its
pyfunc model's artifact folder (model.onnx, model_card.json, calibrator.json) is copied into a new
BentoML model `<serve.model_name>:<generated version>` labelled with where it came from, and a bento is
built from serving/bentofile.yaml. `--model-dir` imports a local model folder instead, labelled
`source: local-dir` and with no registry version (the service then reports `local:<version>`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config import ServeConfig
from pipelines.environment import PROJECT_ROOT
from pipelines.errors import DetopsError

BENTOFILE = Path(__file__).with_name("bentofile.yaml")
MODEL_FILES = ("model.onnx", "model_card.json", "calibrator.json")  # the calibrator is optional


@dataclass(frozen=True)
class BuildResult:
    """What `build` produced: the BentoML model tag, its labels, and the bento tag (None: not built)."""

    model_tag: str
    labels: dict[str, str]
    bento_tag: str | None


def import_model_dir(model_dir: Path, *, name: str, labels: dict[str, str]) -> str:
    """Copy a model folder into the BentoML model store after checking that the runtime loads it;
    returns the new model's tag."""
    import bentoml

    from serving.runtime import ModelRuntime

    model_dir = Path(model_dir)
    runtime = ModelRuntime.load(model_dir, threads=1)  # refuse a folder the service could not serve
    card = runtime.card
    metadata: dict[str, Any] = {"card_name": card.name, "classes": card.classes, "imgsz": card.imgsz,
                                "run_id": card.run_id or "", "calibration": runtime.calibrator.method}
    with bentoml.models.create(name=name, labels=labels, metadata=metadata) as model:
        for file in MODEL_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, Path(model.path) / file)
    return str(model.tag)


def download_registry_model(name: str, alias: str, dest: Path) -> tuple[Path, str]:
    """The model folder of the registry version `name@alias`, downloaded under `dest`, and that
    version's number."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from evaluation.pyfunc_model import MODEL_DIR_ARTIFACT

    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise DetopsError(f"registry: no version of {name!r} has the alias {alias!r} "
                          f"({exc.error_code}); register and promote a model first") from None
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(dest)))
    model_dir = local / "artifacts" / MODEL_DIR_ARTIFACT
    if not (model_dir / "model.onnx").is_file():
        raise DetopsError(f"models:/{name}/{version.version}: not a detops pyfunc model "
                          f"(no artifacts/{MODEL_DIR_ARTIFACT}/model.onnx)")
    return model_dir, str(version.version)


def build_bento(bentofile: Path = BENTOFILE) -> str:
    """Build the bento (the repository root is the build context); returns its tag."""
    import bentoml

    bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(PROJECT_ROOT))
    return str(bento.tag)


def build(cfg: ServeConfig, *, model_dir: Path | None = None, bento: bool = True) -> BuildResult:
    """Import the model (the registry's `cfg.alias` version, or `model_dir`) and build the bento."""
    import tempfile

    if model_dir is not None:
        labels = {"source": "local-dir", "model_dir": str(Path(model_dir).resolve())}
        tag = import_model_dir(model_dir, name=cfg.model_name, labels=labels)
    else:
        with tempfile.TemporaryDirectory(prefix="detops-build-") as tmp:
            folder, version = download_registry_model(cfg.model_name, cfg.alias, Path(tmp))
            labels = {"source": "registry", "registry_name": cfg.model_name, "registry_version": version,
                      "alias": cfg.alias}
            tag = import_model_dir(folder, name=cfg.model_name, labels=labels)
    return BuildResult(model_tag=tag, labels=labels, bento_tag=build_bento() if bento else None)
