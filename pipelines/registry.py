"""The MLflow model registry as every stage sees it: one place for the artifact layout of a registered
detops model, for resolving an alias or a version, for downloading a version's model folder or one of
its run's artifacts, and for moving the `champion` alias.

A registered version is a pyfunc model (evaluation/pyfunc_model.py) logged under `model` in its
training run; its artifact `model_dir` is the folder the shared runtime loads (`model.onnx`,
`model_card.json`, `calibrator.json`); the run also holds the evaluation report under `evaluation/`
(the drift reference among it). Evaluation registers versions, serving imports them, monitoring reads
their reference and deployment follows `champion`: all of them through the functions here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.errors import DetopsError

CHAMPION = "champion"
CHALLENGER = "challenger"
PYFUNC_NAME = "model"  # the pyfunc model's name in its training run
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact: model.onnx, model_card.json, calibrator.json
EVALUATION_ARTIFACTS = "evaluation"  # evaluate's report folder, logged on the training run
REFERENCE_FILE = "reference.parquet"  # the drift reference profile, in evaluate's report folder
REFERENCE_ARTIFACT = f"{EVALUATION_ARTIFACTS}/{REFERENCE_FILE}"
# The deploy-time smoke reference: sample test images and the detections evaluation recorded for them.
# evaluate writes it to its report folder; register ships it inside the version (a pyfunc artifact), so
# each version carries its own, whatever else its training run holds.
SMOKE_DIR = "smoke"
SMOKE_FILE = "smoke.json"
PREVIOUS_TAG = "previous_champion"  # on a champion: the version it replaced (what rollback returns to)


class RegistryError(DetopsError):
    """The registry has no such model, version, alias or artifact."""


def client() -> Any:
    """An MlflowClient on the project's tracking store (MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def alias_version(name: str, alias: str, mlflow_client: Any = None) -> str | None:
    """The version an alias points at, or None when the alias (or the registered model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return str((mlflow_client or client()).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def resolve(name: str, alias: str | None = None, version: str | None = None, mlflow_client: Any = None) -> Any:
    """The model version `name@alias` or `name/version` (exactly one of them); a RegistryError names
    what is missing."""
    from mlflow.exceptions import MlflowException

    if (alias is None) == (version is None):
        raise ValueError("give exactly one of alias and version")
    mlflow_client = mlflow_client or client()
    if alias is not None:
        try:
            return mlflow_client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise RegistryError(f"registry: no version of {name!r} has the alias {alias!r} ({exc.error_code}); "
                                "register and promote a model first") from None
    if not str(version).isdigit():
        raise RegistryError(f"registry: {name}: version must be a number (got {version!r})")
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registry: {name}: no version {version}") from None


def download_model_dir(name: str, version: str, dest: Path) -> Path:
    """Download version `version` of `name` under `dest` and return its model folder (the one
    `serving.runtime.ModelRuntime.load` opens)."""
    model_dir = _download_version(name, version, dest) / MODEL_DIR_ARTIFACT
    if not (model_dir / "model.onnx").is_file():
        raise RegistryError(f"models:/{name}/{version}: not a detops model "
                            f"(no artifacts/{MODEL_DIR_ARTIFACT}/model.onnx)")
    return model_dir


def download_smoke_reference(name: str, version: str, dest: Path) -> Path:
    """Download version `version` of `name` under `dest` and return its smoke reference folder."""
    smoke = _download_version(name, version, dest) / SMOKE_DIR
    if not (smoke / SMOKE_FILE).is_file():
        raise RegistryError(f"models:/{name}/{version}: no smoke reference (artifacts/{SMOKE_DIR}/{SMOKE_FILE}); "
                            "versions registered before deployments checked them: re-run evaluate and register")
    return smoke


def _download_version(name: str, version: str, dest: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dest))) / "artifacts"


def download_run_artifact(name: str, version: str, artifact: str, dest: Path | None = None) -> Path:
    """One artifact of the training run behind version `version` of `name` (e.g. REFERENCE_ARTIFACT)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = resolve(name, version=version).run_id
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                        dst_path=None if dest is None else str(dest)))
    except (MlflowException, OSError) as exc:
        first = str(getattr(exc, "message", exc)).splitlines()[0]
        raise RegistryError(f"models:/{name}/{version}: no artifact {artifact!r} in run {run_id} ({first})") from None


def set_champion(name: str, version: str, *, reason: str, mlflow_client: Any = None) -> str | None:
    """Point `champion` at `version`, recording the champion it replaces in the version's tag
    `previous_champion` and why it moved in `promoted_by`; returns that previous champion (None
    when there was none)."""
    mlflow_client = mlflow_client or client()
    previous = alias_version(name, CHAMPION, mlflow_client)
    if previous == str(version):
        return previous
    if previous is None:
        if PREVIOUS_TAG in mlflow_client.get_model_version(name, version).tags:
            mlflow_client.delete_model_version_tag(name, version, PREVIOUS_TAG)
    else:
        mlflow_client.set_model_version_tag(name, version, PREVIOUS_TAG, previous)
    mlflow_client.set_model_version_tag(name, version, "promoted_by", reason)
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    return previous


def promote(name: str, version: str) -> str | None:
    """`detops promote VERSION`: make an existing version the champion, whatever its gates said;
    returns the previous champion."""
    mlflow_client = client()
    resolve(name, version=version, mlflow_client=mlflow_client)
    return set_champion(name, str(version), reason="manual", mlflow_client=mlflow_client)


def rollback(name: str, *, reason: str = "manual rollback") -> tuple[str, str]:
    """`detops rollback`: point `champion` back at the current champion's previous champion, tagging
    the current one `rolled_back` with `reason`; returns (from, to)."""
    mlflow_client = client()
    current = alias_version(name, CHAMPION, mlflow_client)
    if current is None:
        raise RegistryError(f"{name}: no {CHAMPION} to roll back")
    previous = mlflow_client.get_model_version(name, current).tags.get(PREVIOUS_TAG)
    if not previous:
        raise RegistryError(f"{name}: v{current} has no previous champion recorded: nothing to roll back to")
    resolve(name, version=previous, mlflow_client=mlflow_client)
    # The previous champion keeps its own `previous_champion` tag, so a second rollback goes further back.
    mlflow_client.set_registered_model_alias(name, CHAMPION, previous)
    mlflow_client.set_model_version_tag(name, current, "rolled_back", reason)
    return current, previous


def tag_version(name: str, version: str, tags: dict[str, str | None], mlflow_client: Any = None) -> None:
    """Set the given tags on a version; a None value deletes that tag (a missing one is fine)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = mlflow_client or client()
    present = mlflow_client.get_model_version(name, version).tags
    for key, value in tags.items():
        if value is not None:
            mlflow_client.set_model_version_tag(name, version, key, value)
        elif key in present:
            try:
                mlflow_client.delete_model_version_tag(name, version, key)
            except MlflowException:
                pass  # deleted meanwhile


def move_champion_back(name: str, to_version: str, *, reason: str, from_version: str | None = None) -> bool:
    """Point `champion` back at `to_version` because the version it names was refused or rolled back,
    tagging that version `rolled_back` with `reason`. With `from_version`, only while the alias still
    names it: a champion chosen meanwhile is someone's newer decision, not the refused version. No
    `previous_champion` tag changes, so it stays a true history of promotions (`to_version` does not
    get the refused version as its predecessor, which a later `detops rollback` would return to).
    Returns whether the alias moved."""
    mlflow_client = client()
    current = alias_version(name, CHAMPION, mlflow_client)
    if current == str(to_version) or (from_version is not None and current != str(from_version)):
        return False
    resolve(name, version=to_version, mlflow_client=mlflow_client)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(to_version))
    if current is not None:
        mlflow_client.set_model_version_tag(name, current, "rolled_back", reason)
    return True
