"""training.importer on hand-built ONNX graphs carrying ultralytics' metadata: classes checked or mapped
by name, what the runtime cannot decode refused with one line, provenance on the card and the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.config.model import ImportConfig
from pipelines.errors import DetopsError
from serving.runtime import MODEL_FILE, ModelRuntime
from tests.unit.test_runtime import KNOWN, _write_model_dir
from training.importer import import_model

CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '{}</RectangleLabels></View>')


def _export(tmp_path: Path, batch: int | str = 1, known: np.ndarray = KNOWN, **meta: str) -> Path:
    """An ONNX file like `yolo export` writes (static batch 1 by default), classes a and b."""
    import onnx

    folder = _write_model_dir(tmp_path / "src", batch=batch, known=known)
    model = onnx.load(str(folder / MODEL_FILE))
    props = {"names": "{0: 'a', 1: 'b'}", "imgsz": "[64, 64]", "stride": "32", "task": "detect",
             "end2end": "False", "description": "hand-built", **meta}
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "exported.onnx"
    onnx.save(model, str(path))
    return path


def _config(tmp_path: Path, *names: str) -> Path:
    path = tmp_path / "labeling_config.xml"
    path.write_text(CONFIG.format("".join(f'<Label value="{n}"/>' for n in names)))
    return path


def test_classes_are_checked_or_mapped_by_name(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    source = _export(tmp_path)
    with pytest.raises(DetopsError, match="model classes differ .*same names in another order.*map picks"):
        import_model(ImportConfig(source=source, out=tmp_path / "m", labeling_config=_config(tmp_path, "b", "a")))
    with pytest.raises(DetopsError, match="not in the model: zebra"):
        import_model(ImportConfig(source=source, out=tmp_path / "m", classes="map",
                                  labeling_config=_config(tmp_path, "b", "zebra")))
    result = import_model(ImportConfig(source=source, out=tmp_path / "m", classes="map", experiment="tests",
                                       labeling_config=_config(tmp_path, "b", "a")))
    assert result.card.classes == ["b", "a"] and result.card.source["batch"] == "1"
    mapped = ModelRuntime.load(tmp_path / "m").predict([np.zeros((64, 64, 3), np.uint8)] * 3, conf=0.1)
    plain = ModelRuntime.load(tmp_path / "src").predict([np.zeros((64, 64, 3), np.uint8)], conf=0.1)[0]
    for dets in mapped:  # same boxes and scores, class ids in the config's order
        assert [(d.box, d.raw_confidence, 1 - d.class_id) for d in dets] == \
            [(d.box, d.raw_confidence, d.class_id) for d in plain]
    tags = mlflow.get_run(result.run_id).data.tags
    assert tags["detops.source.kind"] == "import" and tags["detops.source.file"] == "exported.onnx"
    assert tags["detops.source.format"] == "ultralytics-onnx" and len(tags["detops.source.sha256"]) == 64


@pytest.mark.parametrize(("meta", "known", "message"), [
    ({"end2end": "True"}, KNOWN, "end-to-end"),
    ({"task": "segment"}, KNOWN, "a segment model"),
    ({"imgsz": "[64, 96]"}, KNOWN, "not square"),
    ({}, np.zeros((300, 6), np.float32), "not the detection head"),
])
def test_what_the_runtime_cannot_run_is_refused_at_import(tmp_path: Path, meta, known, message) -> None:
    with pytest.raises(DetopsError, match=message):
        import_model(ImportConfig(source=_export(tmp_path, known=known, **meta), out=tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DetopsError, match="not found"):
        import_model(ImportConfig(source=tmp_path / "nope.onnx", out=tmp_path / "m"))
    (tmp_path / "x.h5").write_text("")
    with pytest.raises(DetopsError, match="expected an ultralytics .pt or .onnx"):
        import_model(ImportConfig(source=tmp_path / "x.h5", out=tmp_path / "m"))
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(DetopsError, match="bad.onnx: not an ONNX model"):
        import_model(ImportConfig(source=tmp_path / "bad.onnx", out=tmp_path / "m"))
