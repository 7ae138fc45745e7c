"""`detops evaluate`: the served artifact (ONNX + serving's pre/post-processing) on the val and test
splits and on the named slices (evaluation/slices.py) -> COCO metrics, a calibrator fitted on val
(written next to the model), D-ECE before/after on test, latency, plots and plot data for DVC, all
logged to the training run in MLflow."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.calibration import (
    NotEnoughCalibrationData,
    assign_detections,
    calibrated,
    calibration_set,
    dece,
    ece,
    fit_calibrator,
    ground_truth_boxes,
    plot_reliability,
    reliability,
)
from evaluation.coco import (
    CocoMetrics,
    background_detections,
    coco_detections,
    coco_ground_truth,
    coco_metrics,
    image_ids,
)
from evaluation.slices import PLOT_FILE, evaluate_slices, plot_slices, slice_mlflow_metrics
from monitoring.reference import build_reference, save_reference
from pipelines.config.model import EvaluateConfig
from pipelines.errors import DetopsError
from pipelines.images import read_rgb
from pipelines.registry import EVALUATION_ARTIFACTS, REFERENCE_FILE, SMOKE_DIR, SMOKE_FILE
from pipelines.types import Detection, YoloDataset

CONFUSION_IOU = 0.5


def predict_split(runtime: Any, dataset: YoloDataset, split: str, gt: dict,
                  cfg: EvaluateConfig) -> dict[int, list[Detection]]:
    """Detections per image id of `gt` for every image of `split`, in batches of `cfg.batch`."""
    from rich.progress import Progress

    ids = image_ids(gt)
    paths = dataset.images(split)
    predictions: dict[int, list[Detection]] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"predicting {split}", total=len(paths))
        for start in range(0, len(paths), cfg.batch):
            chunk = paths[start:start + cfg.batch]
            results = runtime.predict([read_rgb(p) for p in chunk], conf=cfg.conf, iou=cfg.iou,
                                      max_det=cfg.max_det)
            for path, detections in zip(chunk, results):
                predictions[ids[path.name]] = detections
            progress.advance(task, len(chunk))
    return predictions


def measure_latency(runtime: Any, images: list[np.ndarray], batch_sizes: list[int],
                    repeats: int) -> dict[str, Any]:
    """Median wall time of preprocess + infer + postprocess (runtime.predict at the card's default
    thresholds, as served): for one image, and per image at the fastest of `batch_sizes`."""

    def median_ms(batch: list[np.ndarray]) -> float:
        runtime.predict(batch)  # warm-up: first-call allocations are not steady-state latency
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.predict(batch)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    single = median_ms(images[:1])
    per_image = {b: median_ms([images[i % len(images)] for i in range(b)]) / b for b in batch_sizes}
    best = min(per_image, key=per_image.__getitem__)
    return {"latency_ms_batch1": single, "latency_ms_per_image_best_batch": per_image[best],
            "best_batch": best,
            "latency_ms_per_image_by_batch": {str(b): v for b, v in per_image.items()}}


def served_single_request_ms(model_dir: Path, files: list[Path], repeats: int) -> float:
    """Median single-request latency through the service's own path (serving/latency.py) at the
    serving settings' ONNX Runtime threads, on these image files as uploaded."""
    from serving.latency import single_request_ms
    from serving.settings import load_serve_config, ort_threads

    serve = load_serve_config()
    return single_request_ms(model_dir, [f.read_bytes() for f in files], threads=ort_threads(serve),
                             repeats=repeats, max_upload_bytes=serve.max_upload_bytes, max_pixels=serve.max_pixels)


def confusion_matrix(predictions: dict[int, list[Detection]], gt: dict, n_classes: int, conf: float,
                     iou_threshold: float = CONFUSION_IOU) -> np.ndarray:
    """(n+1) x (n+1) counts, rows = true class, columns = predicted class, index n = background.
    Detections with confidence > `conf` are matched class-agnostically (greedy by confidence) at
    IoU >= `iou_threshold`; unmatched detections are background rows, missed objects background columns."""
    matrix = np.zeros((n_classes + 1, n_classes + 1), dtype=int)
    truths = ground_truth_boxes(gt)
    for image_id, detections in predictions.items():
        kept = [d for d in detections if d.confidence > conf]
        assigned = assign_detections(kept, truths[image_id], iou_threshold, class_aware=False)
        for det, g in zip(kept, assigned):
            matrix[truths[image_id][g][0] if g >= 0 else n_classes, det.class_id] += 1
        for g in set(range(len(truths[image_id]))) - set(assigned.tolist()):
            matrix[truths[image_id][g][0], n_classes] += 1
    return matrix


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the whole evaluation stage and return the metrics written to `cfg.out/metrics.json`."""
    from serving.calibrator import Calibrator
    from serving.runtime import CALIBRATOR_FILE, ModelRuntime

    dataset = YoloDataset.load(cfg.dataset)
    runtime = ModelRuntime.load(cfg.model_dir, calibrated=False)
    if runtime.class_names != dataset.class_names:
        raise DetopsError(f"{cfg.model_dir}: model classes {runtime.class_names} differ from the dataset's "
                          f"{dataset.class_names} ({cfg.dataset})")
    gts = {split: coco_ground_truth(dataset, split) for split in ("val", "test")}
    preds = {split: predict_split(runtime, dataset, split, gts[split], cfg) for split in ("val", "test")}
    dt_test = coco_detections(preds["test"], gts["test"])
    coco = coco_metrics(gts["test"], dt_test)

    # Calibrator: fitted on val, judged on test, shipped next to the model for serving to apply.
    val_set, test_set = (calibration_set(preds[s], gts[s], iou_threshold=cfg.calibration_iou,
                                         min_conf=cfg.calibration_min_conf) for s in ("val", "test"))
    try:
        calibrator = fit_calibrator(val_set, cfg.calibration_method)
    except NotEnoughCalibrationData as exc:
        warnings.warn(f"{exc}; shipping the identity calibrator", stacklevel=2)
        calibrator = Calibrator()
    calibrator.save(Path(cfg.model_dir) / CALIBRATOR_FILE)
    conf_after = calibrated(calibrator, test_set)
    box = test_set.box_features()
    bins = {"conf_bins": cfg.dece_bins, "box_bins": cfg.dece_box_bins}

    sizes = {image["id"]: (image["width"], image["height"]) for image in gts["test"]["images"]}
    served = {i: _recalibrate(calibrator, dets, *sizes[i]) for i, dets in preds["test"].items()}
    n_classes = len(dataset.class_names)
    matrix = confusion_matrix(served, gts["test"], n_classes, runtime.card.thresholds.conf)
    test_images = [read_rgb(p) for p in dataset.images("test")[:max(cfg.latency_batch_sizes)]]
    latency = measure_latency(runtime, test_images, cfg.latency_batch_sizes, cfg.latency_repeats)
    latency["latency_ms_served_single"] = served_single_request_ms(cfg.model_dir, dataset.images("test")[:16],
                                                                   cfg.latency_repeats)

    metrics = {
        **coco.summary(),
        "dece": dece(test_set.raw_conf, test_set.labels, box, **bins),
        "dece_calibrated": dece(conf_after, test_set.labels, box, **bins),
        "ece": ece(test_set.raw_conf, test_set.labels, cfg.dece_bins),
        "ece_calibrated": ece(conf_after, test_set.labels, cfg.dece_bins),
        "calibration": {"method": calibrator.method, "n_val_detections": len(val_set),
                        "n_test_detections": len(test_set), "min_conf": cfg.calibration_min_conf},
        **latency,
        "n_test_images": len(gts["test"]["images"]),
        "n_val_images": len(gts["val"]["images"]),
        "n_test_detections": len(dt_test),
        # False positives on the test split's background images: at the evaluation's conf (raw
        # scores, as mAP sees them) and as served (calibrated, the card's default conf).
        "background": {"at_eval_conf": background_detections(preds["test"], gts["test"], cfg.conf),
                       "as_served": background_detections(served, gts["test"], runtime.card.thresholds.conf)},
        "variant": cfg.variant,  # fp32, or int8 for the quantized copy (evaluation/quantize.py)
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "coco_gt.json").write_text(json.dumps(gts["test"]))
    (out / "coco_dt.json").write_text(json.dumps(dt_test))
    _write_pr_curves(coco, out)
    plot_reliability({"raw": (test_set.raw_conf, test_set.labels),
                      f"calibrated ({calibrator.method})": (conf_after, test_set.labels)},
                     out / "reliability.png", cfg.dece_bins)
    _write_reliability_csv(test_set.raw_conf, conf_after, test_set.labels, cfg.dece_bins,
                           out / "reliability.csv")
    _write_confusion(matrix, [*dataset.class_names, "background"], out, runtime.card.thresholds.conf)
    # What production traffic is compared with: the test split seen by the served (calibrated) model.
    save_reference(build_reference(cfg.model_dir, cfg.dataset, "test"), out / REFERENCE_FILE)
    write_smoke_sample(ModelRuntime.load(cfg.model_dir), dataset.images("test"), cfg.smoke_images, out / SMOKE_DIR)
    # Slices: the same COCO metrics on each named extra test set, beside the base split.
    slices = evaluate_slices(runtime, cfg, out)
    by_slice = slice_mlflow_metrics(metrics, slices)
    if slices:
        metrics["slices"] = slices
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plot_slices({"model": {k.split("/", 1)[1]: v for k, v in by_slice.items() if k.startswith("map50_95/")}},
                    out / PLOT_FILE, title="COCO mAP@.5:.95: base test split and slices")
    metrics["mlflow_run_id"] = _log_to_mlflow(runtime.card.run_id, metrics, out,
                                              Path(cfg.model_dir) / CALIBRATOR_FILE, cfg.experiment, by_slice,
                                              cfg.variant)
    return metrics


def write_smoke_sample(runtime: Any, paths: list[Path], n: int, out: Path) -> Path:
    """A deployment's reference of what this model serves: `n` test images (evenly spaced by name) as
    files, and the calibrated detections the served runtime gives them at the card's thresholds (the
    service's defaults), in `out/smoke.json`. A rollout sends the same bytes with the same thresholds
    to the new colour and expects the same detections."""
    import shutil

    chosen = sorted(paths, key=lambda p: p.name)
    chosen = [chosen[round(i * (len(chosen) - 1) / max(n - 1, 1))] for i in range(min(n, len(chosen)))]
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    t = runtime.card.thresholds
    records = []
    for path in dict.fromkeys(chosen):  # a small split may repeat an index
        shutil.copy2(path, out / "images" / path.name)
        detections = runtime.predict([read_rgb(path)], conf=t.conf, iou=t.iou, max_det=t.max_det)[0]
        records.append({"file": f"images/{path.name}", "detections": [
            {"class_id": d.class_id, "box": [d.box.x1, d.box.y1, d.box.x2, d.box.y2], "confidence": d.confidence}
            for d in detections]})
    (out / SMOKE_FILE).write_text(json.dumps({"thresholds": t.model_dump(), "images": records}, indent=1) + "\n")
    return out


def _recalibrate(calibrator: Any, detections: list[Detection], width: int, height: int) -> list[Detection]:
    """The detections with the confidence serving reports (the calibrator applied to the raw one)."""
    if not detections:
        return []
    boxes = np.array([[d.box.x1, d.box.y1, d.box.x2, d.box.y2] for d in detections])
    conf = calibrator.apply(np.array([d.raw_confidence for d in detections]), boxes, width, height)
    return [dataclasses.replace(d, confidence=float(c)) for d, c in zip(detections, conf)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write_pr_curves(coco: CocoMetrics, out: Path) -> None:
    """pr_curves.png (per class, IoU .5 and mean over .5:.95) and pr_curve.csv (IoU .5) from
    COCOeval's interpolated precision at its 101 recall thresholds."""
    plt = _pyplot()
    recall = coco.recall_thresholds
    i50 = int(np.argmin(np.abs(coco.iou_thresholds - 0.5)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    rows = []
    for k, name in enumerate(coco.class_names):
        p = coco.precision[:, :, k]
        if (p < 0).all():
            continue  # no ground truth of this class in the split
        axes[0].plot(recall, p[i50], label=f"{name} AP50 {p[i50].mean():.3f}")
        axes[1].plot(recall, p.mean(axis=0), label=f"{name} AP {p.mean():.3f}")
        rows += [(name, float(r), float(v)) for r, v in zip(recall, p[i50])]
    for ax, title in zip(axes, ("IoU 0.5", "IoU 0.5:0.95 (mean)")):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"PR curves, {title}")
        ax.legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "pr_curves.png", dpi=100)
    plt.close(fig)
    _write_csv(out / "pr_curve.csv", ("class", "recall", "precision"), rows)


def _write_reliability_csv(raw: np.ndarray, after: np.ndarray, labels: np.ndarray, bins: int,
                           path: Path) -> None:
    rows = []
    for name, conf in (("raw", raw), ("calibrated", after)):
        r = reliability(conf, labels, bins)
        rows += [(name, float(c), float(a), int(n))
                 for c, a, n in zip(r["confidence"], r["accuracy"], r["count"]) if n > 0]
    _write_csv(path, ("calibration", "confidence", "accuracy", "count"), rows)


def _write_confusion(matrix: np.ndarray, names: list[str], out: Path, conf: float) -> None:
    """confusion_matrix.png, and confusion.csv with one (actual, predicted) row per instance, the
    layout of DVC's confusion template."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=f"Confusion at IoU {CONFUSION_IOU}, confidence > {conf:g}")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=100)
    plt.close(fig)
    rows = [(names[r], names[c]) for (r, c), v in np.ndenumerate(matrix) for _ in range(v)]
    _write_csv(out / "confusion.csv", ("actual", "predicted"), rows)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _flat_numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as `a_b_c` keys (None and strings skipped)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_numbers(value, f"{name}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _log_to_mlflow(run_id: str | None, metrics: dict[str, Any], out: Path, calibrator_path: Path,
                   experiment: str, by_slice: dict[str, float] | None = None, variant: str = "fp32") -> str:
    """Log `test_`-prefixed metrics and the report folder (under `evaluation/`) to the training run;
    when that run is not in the current store, to a new run of `experiment`, with a warning. Another
    variant of the same model (int8) logs `test_<variant>_` metrics under `evaluation/<variant>/`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import ensure_experiment, metric_name, resume_run, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    exists = False
    if run_id:
        try:
            mlflow.MlflowClient().get_run(run_id)
            exists = True
        except MlflowException:
            pass
    if exists:
        context = resume_run(run_id)
    else:
        warnings.warn(f"training run {run_id!r} of the model card is not in {tracking_uri()}: logging the "
                      f"evaluation to a new run of experiment {experiment!r}", stacklevel=3)
        ensure_experiment(experiment)
        context = mlflow.start_run(run_name="evaluate")
    # Class names become parts of metric names: keep to the characters MLflow accepts.
    # Slices are logged once, as `map50_95/<slice>` (by_slice), not flattened with every per-class AP.
    safe = {metric_name(k): v for k, v in _flat_numbers({k: v for k, v in metrics.items() if k != "slices"}).items()}
    prefix, artifacts = ("test_", EVALUATION_ARTIFACTS) if variant == "fp32" else (
        f"test_{variant}_", f"{EVALUATION_ARTIFACTS}/{variant}")
    slice_prefix = "" if variant == "fp32" else f"{variant}/"
    with context as run:
        mlflow.log_metrics({f"{prefix}{k}": v for k, v in safe.items()})
        mlflow.log_metrics({metric_name(f"{slice_prefix}{k}"): v for k, v in (by_slice or {}).items()})
        mlflow.log_artifacts(str(out), artifact_path=artifacts)
        mlflow.log_artifact(str(calibrator_path), artifact_path=artifacts)
        return run.info.run_id
