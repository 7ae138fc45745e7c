"""The one place that makes every library here work offline and quietly.

The CLI, the DVC stages (which call the CLI), the BentoML service and the test suite all call
`configure()` before they import a heavy library. It only sets variables that are not set already, so a
user can still point MLflow at a server or ultralytics at another settings folder.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Project-local folder for tool state (ultralytics settings and font, matplotlib's cache).
    BentoML's model and bento store is not here: it stays in BentoML's own home (~/bentoml, or
    $BENTOML_HOME), the only place a plain `bentoml serve` looks, since BentoML reads that variable
    when it is imported, before any project code runs."""
    return Path(os.environ.get("DETOPS_CACHE_DIR", PROJECT_ROOT / ".cache"))


def default_tracking_uri() -> str:
    """The MLflow store used when MLFLOW_TRACKING_URI is not set: a SQLite file in the project."""
    return f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


_OFFLINE_SWITCHES = {
    # ultralytics: never download weights, fonts or packages at run time.
    "YOLO_OFFLINE": "true",
    "YOLO_AUTOINSTALL": "false",
    # Telemetry of each tool, off (each one reads its own variable).
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    # Downloads from the registry print no progress bar into the CLI's one-line answers.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # MLflow logs git info itself; it must not fail or warn when git is missing.
    "GIT_PYTHON_REFRESH": "quiet",
}


# OpenMP threads that sleep instead of spinning while they wait (read once, when torch loads its OpenMP
# runtime: set before torch is imported). Measured on a busy 2-core machine (docs/performance.md): a
# training step on 2 threads took 8-11 s with the default spinning vs 0.4-0.7 s passive (1 thread:
# 0.3-1.0 s); spinning threads burn the core the other thread waits for.
_THREADING = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure() -> None:
    """Set the offline switches, the OpenMP wait policy and the project-local tool folders
    (idempotent, cheap)."""
    for key, value in {**_OFFLINE_SWITCHES, **_THREADING}.items():
        os.environ.setdefault(key, value)
    root = cache_dir()
    os.environ.setdefault("YOLO_CONFIG_DIR", str(root / "ultralytics"))
    os.environ.setdefault("MPLCONFIGDIR", str(root / "matplotlib"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", default_tracking_uri())


def _install_local_font(folder: Path) -> None:
    """ultralytics checks for Arial fonts before plotting and downloads them when absent: give it
    matplotlib's DejaVuSans under those names so nothing is fetched."""
    targets = [folder / "Arial.ttf", folder / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    source = _dejavu_font()
    folder.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if not target.exists():
            shutil.copyfile(source, target)


@cache
def _dejavu_font() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("matplotlib is required (its DejaVuSans font stands in for Arial)")
    return Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"


def configure_ultralytics() -> None:
    """Turn off ultralytics' own MLflow/DVC/HUB callbacks: one training must give one MLflow run,
    logged by us; and give it a local font. Call before training or plotting with ultralytics."""
    configure()
    _install_local_font(Path(os.environ["YOLO_CONFIG_DIR"]) / "Ultralytics")
    from ultralytics import settings

    integrations = ("mlflow", "dvc", "sync", "hub", "wandb", "tensorboard", "clearml", "comet", "neptune",
                    "raytune")
    # Only the keys this ultralytics release knows: `update` refuses unknown ones.
    wanted = {k: False for k in integrations if k in settings.defaults}
    current = {k: settings.get(k) for k in wanted}
    if current != wanted:
        settings.update(wanted)
    # ultralytics patches PIL's Image.open to pip-install a HEIF plugin when a file cannot be
    # identified; offline that turns every "not an image" into an ImportError. Keep PIL's own error.
    from ultralytics.utils import patches

    patches._pil_plugins_registered = True
