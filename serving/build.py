"""`detops build`: registry model -> BentoML model store -> bento.

A registry version of serve.model_name (pinned with `--version`, else the one serve.alias points at,
default champion) is downloaded and its model folder (model.onnx, model_card.json, calibrator.json)
copied into a new BentoML model `<serve.model_name>:<generated version>` labelled with where it came
from; a bento is built from serving/bentofile.yaml. `--model-dir` imports a local model folder instead,
labelled `source: local-dir` and with no registry version (the service then reports `local:<version>`).
The store is BentoML's own home (~/bentoml, or $BENTOML_HOME), where a plain `bentoml serve` looks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.config.serving import ServeConfig
from pipelines.environment import PROJECT_ROOT

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


def build_bento(bentofile: Path = BENTOFILE) -> str:
    """Build the bento (the repository root is the build context); returns its tag."""
    import bentoml

    bento = bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(PROJECT_ROOT))
    return str(bento.tag)


def import_registry_version(name: str, *, alias: str | None = None, version: str | None = None) -> tuple[str, dict]:
    """Import the registry version `name@alias` or `name/version` into the BentoML store; returns
    the new model's tag and its labels."""
    import tempfile

    from pipelines import registry

    found = str(registry.resolve(name, alias=alias, version=version).version)
    labels = {"source": "registry", "registry_name": name, "registry_version": found}
    if alias is not None:
        labels["alias"] = alias
    with tempfile.TemporaryDirectory(prefix="detops-build-") as tmp:
        tag = import_model_dir(registry.download_model_dir(name, found, Path(tmp)), name=name, labels=labels)
    return tag, labels


def build(cfg: ServeConfig, *, model_dir: Path | None = None, version: str | None = None,
          bento: bool = True) -> BuildResult:
    """Import the model (`model_dir`, registry `version`, or the registry's `cfg.alias` version) and
    build the bento."""
    if model_dir is not None:
        labels = {"source": "local-dir", "model_dir": str(Path(model_dir).resolve())}
        tag = import_model_dir(model_dir, name=cfg.model_name, labels=labels)
    elif version is not None:
        tag, labels = import_registry_version(cfg.model_name, version=version)
    else:
        tag, labels = import_registry_version(cfg.model_name, alias=cfg.alias)
    return BuildResult(model_tag=tag, labels=labels, bento_tag=build_bento() if bento else None)
