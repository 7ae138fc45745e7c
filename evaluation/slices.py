"""Evaluation slices: named extra test sets (`evaluate.slices`) beside the base test split.

Each slice is one split of a YOLO dataset with the model's classes, e.g. the held-out part of a
feedback batch (`ingest.holdout`, whose images never reach training). The evaluate stage predicts every
slice with the same runtime and thresholds as the base split and computes the same COCO metrics
(pycocotools, evaluation/coco.py); `register` predicts the champion on the same slices and gives the
paired-bootstrap mAP delta per slice, which the target-slice gates read (evaluation/gates.py).

Files under `<evaluate.out>/slices/<name>/`: coco_gt.json, coco_dt.json (raw scores, as the base
split's); `<evaluate.out>/slices.png` plots every slice beside the base split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evaluation.coco import coco_detections, coco_ground_truth, coco_metrics
from pipelines.config.model import BASE_SLICE, EvalSlice, EvaluateConfig
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset

SLICES_DIR = "slices"
PLOT_FILE = "slices.png"


def slice_ground_truth(name: str, spec: EvalSlice, class_names: list[str]) -> tuple[YoloDataset, dict]:
    """The slice's dataset and COCO ground truth; its classes must be the model's."""
    dataset = YoloDataset.load(spec.dataset)
    if dataset.class_names != class_names:
        raise DetopsError(f"slice {name!r} ({spec.dataset}): classes {dataset.class_names} differ from the "
                          f"model's {class_names}")
    return dataset, coco_ground_truth(dataset, spec.split)


def predict_slice(runtime: Any, name: str, spec: EvalSlice, cfg: EvaluateConfig) -> tuple[dict, list[dict]]:
    """COCO ground truth and detections (raw scores) of `runtime` on one slice."""
    from evaluation.evaluate import predict_split

    dataset, gt = slice_ground_truth(name, spec, runtime.class_names)
    return gt, coco_detections(predict_split(runtime, dataset, spec.split, gt, cfg), gt)


def evaluate_slices(runtime: Any, cfg: EvaluateConfig, out: Path) -> dict[str, dict[str, Any]]:
    """COCO metrics of every slice of `cfg` (name -> summary + image count); writes each slice's
    coco_gt.json and coco_dt.json under `out/slices/<name>/`."""
    results = {}
    for name, spec in cfg.slices.items():
        gt, dt = predict_slice(runtime, name, spec, cfg)
        folder = out / SLICES_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "coco_gt.json").write_text(json.dumps(gt))
        (folder / "coco_dt.json").write_text(json.dumps(dt))
        results[name] = {**coco_metrics(gt, dt).summary(), "n_images": len(gt["images"]),
                         "dataset": str(spec.dataset), "split": spec.split}
    return results


def slice_mlflow_metrics(base: dict[str, Any], slices: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`map50_95/<slice>` and `map50/<slice>` for the base split and every slice."""
    out = {}
    for name, metrics in {BASE_SLICE: base, **slices}.items():
        for key in ("map50_95", "map50"):
            out[f"{key}/{name}"] = float(metrics[key])
    return out


def plot_slices(series: dict[str, dict[str, float]], path: Path, title: str = "mAP per slice") -> Path:
    """Grouped bars: one group per slice, one bar per series (e.g. {"champion": {"base": 0.8,
    "dark": 0.1}, "challenger": {...}}), values printed on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dict.fromkeys(n for values in series.values() for n in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names) * max(len(series), 1) / 2, 4))
    x = np.arange(len(names))
    for k, (label, values) in enumerate(series.items()):
        heights = [values.get(n, np.nan) for n in names]
        bars = ax.bar(x + (k - (len(series) - 1) / 2) * width, heights, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1.05), ylabel="COCO mAP@.5:.95", title=title)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_slice_coco(evaluation: Path, name: str) -> tuple[dict, list[dict]]:
    """The challenger's ground truth and detections of one slice, as evaluate wrote them."""
    folder = evaluation / SLICES_DIR / name
    try:
        return (json.loads((folder / "coco_gt.json").read_text()),
                json.loads((folder / "coco_dt.json").read_text()))
    except FileNotFoundError:
        raise DetopsError(f"{folder}: slice {name!r} was not evaluated (add it to evaluate.slices and re-run "
                          "`detops evaluate`)") from None
    except json.JSONDecodeError as exc:
        raise DetopsError(f"{folder}: not valid JSON ({exc})") from None
