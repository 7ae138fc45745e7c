"""`training.train`: a real tiny training (the session's `trained_model_dir`), its single MLflow run,
the model folder, and the ONNX export against the torch model it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.config.model import TrainConfig
from pipelines.errors import DetopsError
from pipelines.types import YoloDataset
from serving.runtime import CALIBRATOR_FILE, CARD_FILE, MODEL_FILE, WEIGHTS_FILE, ModelCard, letterbox

# ONNX (fused conv+bn, onnxslim-folded) vs the unfused torch model on the same float32 input.
BOX_ATOL_PX = 1e-2
SCORE_ATOL = 1e-3


def _run(mlflow_uri: str, run_id: str):
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    return mlflow.get_run(run_id)


@pytest.mark.integration
def test_model_folder_and_card(trained_model_dir: Path, yolo_dataset: Path) -> None:
    assert {p.name for p in trained_model_dir.iterdir()} == {WEIGHTS_FILE, MODEL_FILE, CARD_FILE}
    card = ModelCard.load(trained_model_dir / CARD_FILE)
    assert card.classes == YoloDataset.load(yolo_dataset).class_names
    assert card.imgsz == 64 and card.stride == 32 and card.model_yaml == "yolov8n.yaml"
    assert card.run_id and {"torch", "ultralytics", "onnxruntime", "mlflow"} <= set(card.versions)


@pytest.mark.integration
def test_onnx_has_dynamic_batch_and_fixed_size(trained_model_dir: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(trained_model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    batch, channels, height, width = session.get_inputs()[0].shape
    assert isinstance(batch, str) and (channels, height, width) == (3, 64, 64)
    out = session.get_outputs()[0].shape
    assert isinstance(out[0], str) and out[1:] == [4 + 4, 8 * 8 + 4 * 4 + 2 * 2]  # 4 classes, 84 anchors


@pytest.mark.integration
def test_one_mlflow_run_with_params_metrics_tags_artifacts(trained_model_dir: Path, mlflow_uri: str) -> None:
    import mlflow

    card = ModelCard.load(trained_model_dir / CARD_FILE)
    run = _run(mlflow_uri, card.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["imgsz"] == "64" and params["epochs"] == "2" and params["model"] == "yolov8n.yaml"
    client = mlflow.MlflowClient()
    box_loss = client.get_metric_history(run.info.run_id, "train/box_loss")
    assert [m.step for m in box_loss][:2] == [1, 2]  # one point per epoch (+ the final validation)
    assert all(np.isfinite(m.value) and m.value > 0 for m in box_loss)
    assert "metrics/mAP50-95_B" in run.data.metrics and "lr/pg0" in run.data.metrics
    assert "best/metrics/mAP50-95_B" in run.data.metrics
    assert not any("(" in k for k in run.data.metrics)
    tags = run.data.tags
    assert tags["dataset_hash_source"] in {"dvc.lock md5", "content sha256"} and len(tags["dataset_hash"]) >= 32
    assert tags["version.ultralytics"] and tags["version.torch"] and tags["version.onnxruntime"]
    assert len(tags.get("git_sha", "x" * 40)) == 40
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "trained_model")}
    assert artifacts == {f"trained_model/{n}" for n in (WEIGHTS_FILE, MODEL_FILE, CARD_FILE, "classes.json")}
    assert "training/results.png" in {a.path for a in client.list_artifacts(run.info.run_id, "training")}
    # Exactly one run for this training: nothing else (e.g. ultralytics' own MLflow callback) started
    # while it trained. (Its end_time moves when later stages resume the run: use its last metric.)
    trained_until = max(m.timestamp for m in box_loss)
    during = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"attributes.start_time >= {run.info.start_time}")
    assert [r.info.run_id for r in during if r.info.start_time <= trained_until] == [run.info.run_id]


def _letterboxed(dataset: Path, n: int) -> np.ndarray:
    paths = YoloDataset.load(dataset).images("val")[:n]
    assert len(paths) == n
    import cv2

    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return np.stack([letterbox(im, 64)[0] for im in rgb]).transpose(0, 3, 1, 2).astype(np.float32) / 255


@pytest.mark.integration
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch_raw_outputs(trained_model_dir: Path, yolo_dataset: Path, batch: int) -> None:
    import onnxruntime as ort
    import torch
    from ultralytics import YOLO

    x = _letterboxed(yolo_dataset, batch)
    net = YOLO(str(trained_model_dir / WEIGHTS_FILE)).model.float().eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(x))[0].numpy()
    session = ort.InferenceSession(str(trained_model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x})[0]
    assert got.shape == expected.shape == (batch, 8, 84)
    assert np.abs(got[:, :4] - expected[:, :4]).max() < BOX_ATOL_PX
    assert np.abs(got[:, 4:] - expected[:, 4:]).max() < SCORE_ATOL


@pytest.mark.integration
def test_retraining_replaces_the_model_and_drops_a_stale_calibrator(yolo_dataset: Path, mlflow_uri: str,
                                                                     tmp_path: Path) -> None:
    from training.train import train

    out = tmp_path / "models"
    out.mkdir()
    (out / CALIBRATOR_FILE).write_text("{}")  # belongs to a previous model
    (out / "notes.txt").write_text("kept")
    result = train(TrainConfig(dataset=yolo_dataset, out=out, imgsz=32, epochs=1, batch=8, workers=0,
                               experiment="tests", runs=tmp_path / "runs", report=tmp_path / "report"))
    assert not (out / CALIBRATOR_FILE).exists() and (out / "notes.txt").read_text() == "kept"
    assert ModelCard.load(out / CARD_FILE).run_id == result.run_id
    assert not list(out.parent.glob(".train-*"))  # the staging folder is gone
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["run_id"] == result.run_id and "metrics/mAP50-95_B" in metrics
    assert (tmp_path / "report" / "results.csv").is_file()


@pytest.mark.integration
def test_training_uses_every_core_and_its_workers_and_repeats_exactly(yolo_dataset: Path, mlflow_uri: str,
                                                                      tmp_path: Path, monkeypatch) -> None:
    # ultralytics sets torch to cpu_count - 1 threads and forces 0 dataloader workers on CPU; detops
    # undoes both. Twice the same params on the same machine: the same losses and metrics.
    import torch

    import training.train as train_module

    seen: list[tuple[int, int]] = []
    real_setup = train_module._cpu_setup

    def watched(workers: int):
        setup = real_setup(workers)

        def both(trainer) -> None:  # noqa: ANN001
            setup(trainer)
            trainer.add_callback("on_train_epoch_start",
                                 lambda t: seen.append((torch.get_num_threads(), t.train_loader.num_workers)))
        return both

    monkeypatch.setattr(train_module, "_cpu_setup", watched)
    curves = []
    for attempt in range(2):
        run = tmp_path / str(attempt)
        train_module.train(TrainConfig(dataset=yolo_dataset, out=run / "models", imgsz=32, epochs=1, batch=8,
                                       workers=2, experiment="tests", runs=run / "runs", report=run / "report"))
        lines = (run / "report" / "results.csv").read_text().splitlines()
        header = lines[0].split(",")
        curves.append([{k: v for k, v in zip(header, line.split(",")) if "time" not in k} for line in lines[1:]])
    assert seen == [(train_module.usable_cores(), 2)] * 2
    assert curves[0] == curves[1]


@pytest.mark.integration
def test_fine_tuning_starts_from_the_given_weights(trained_model_dir: Path, yolo_dataset: Path, mlflow_uri: str,
                                                   tmp_path: Path) -> None:
    """train.weights: one epoch at a negligible learning rate keeps the convolution weights of the
    model it started from (a fresh start would not: ultralytics rebuilds the model unless told)."""
    import torch

    from training.train import train

    out = tmp_path / "models"
    train(TrainConfig(dataset=yolo_dataset, out=out, imgsz=64, epochs=1, batch=8, workers=0, lr0=1e-9,
                      weights=trained_model_dir / WEIGHTS_FILE, hyp={"warmup_epochs": 0, "weight_decay": 0.0},
                      experiment="tests", runs=tmp_path / "runs", report=tmp_path / "report"))

    def first_conv(path: Path) -> torch.Tensor:
        model = torch.load(path, map_location="cpu", weights_only=False)["model"]
        return next(v for k, v in model.state_dict().items() if k.endswith("conv.weight")).float()

    before, after = first_conv(trained_model_dir / WEIGHTS_FILE), first_conv(out / WEIGHTS_FILE)
    assert torch.allclose(before, after, atol=1e-4), float((before - after).abs().max())


def test_bad_config_fails_before_any_run(yolo_dataset: Path, tmp_path: Path) -> None:
    """Each mistake is a one-line DetopsError naming it, and the model folder is left alone."""
    from training.train import train

    out = tmp_path / "models"
    out.mkdir()
    (out / MODEL_FILE).write_text("previous model")
    bad = [
        (dict(dataset=tmp_path / "missing"), "not a YOLO dataset"),
        (dict(model="yolov8n.pt"), "expected a model YAML"),
        (dict(model="nonexistent-net.yaml"), "no model YAML named"),
        (dict(hyp={"not_an_arg": 1}), "train.hyp.not_an_arg: not an ultralytics train argument"),
        (dict(hyp={"epochs": 3}), "train.hyp.epochs: set by detops"),
        (dict(hyp={"mosaic": 2.0}), "'mosaic=2.0' is an invalid value"),
        (dict(weights=tmp_path / "nope.pt"), "train.weights: "),
    ]
    for change, message in bad:
        cfg = TrainConfig(**{"dataset": yolo_dataset, "out": out, "runs": tmp_path / "runs",
                             "report": tmp_path / "report", **change})
        with pytest.raises(DetopsError, match=message.replace("(", r"\(")) as info:
            train(cfg)
        assert "\n" not in str(info.value)
    assert (out / MODEL_FILE).read_text() == "previous model" and not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(imgsz=100)
    shutil.rmtree(out)
