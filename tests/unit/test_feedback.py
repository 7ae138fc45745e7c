"""`push` selection, limits, idempotence and the import file written when no server is configured
(the server path is exercised by tests/integration/test_feedback_loop.py)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from labeling.synthetic import labeling_config_xml
from monitoring.feedback import push, select
from monitoring.logger import make_record
from monitoring.store import open_store
from pipelines.config.monitoring import PushConfig
from pipelines.errors import DetopsError
from pipelines.types import Box, Detection

CLASSES = ["square", "circle"]


def _store(tmp_path: Path, keep: bool = True) -> Path:
    store = open_store(tmp_path / "store")
    records = []
    confs = [None, 0.9, 0.2, 0.95, 0.35, 0.8]  # None: no detection
    for i, conf in enumerate(confs):
        img = np.full((40, 50, 3), 20 * i, np.uint8)
        sha = f"{i:064x}"
        dets = [] if conf is None else [Detection(Box(5, 4, 25, 24), i % 2, conf, conf)]
        rec = make_record(img, sha256=sha, request_id=str(i), detections=dets, class_names=CLASSES,
                          model_name="m", model_version="7", ts=datetime.now(timezone.utc))
        if keep:
            rec.image_path = store.save_image(sha, img)
        records.append(rec)
    store.append(records + records[:1])  # the same image twice: one task
    return tmp_path / "store"


def _cfg(tmp_path: Path, **kw) -> PushConfig:
    return PushConfig(out=tmp_path / "import.json", state=tmp_path / "state.json",
                      document_root=tmp_path / "store", **kw)


def test_select_reasons_and_order(tmp_path: Path) -> None:
    df = open_store(_store(tmp_path)).read()
    chosen = select(df, PushConfig(low_conf=0.4))
    assert list(chosen["request_id"]) == ["0", "2", "4"]  # no detection, then lowest confidence first
    assert list(chosen["reason"]) == ["no detection", "low confidence", "low confidence"]
    assert len(select(df, PushConfig(), drifted=True)) == 6  # a drifted window: every distinct image


def test_push_writes_import_file_with_predictions_and_is_idempotent(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    window = open_store(_store(tmp_path)).read()
    cfg = _cfg(tmp_path, max_per_run=2)
    result = push(window, cfg, labeling_config=labeling_config_xml(CLASSES), drifted=True, batch_id="b1")
    assert result.created == 2 and result.project_id is None
    tasks = json.loads(cfg.out.read_text())
    assert [t["data"]["sha256"] for t in tasks] == [f"{0:064x}", f"{2:064x}"]
    assert tasks[0]["data"]["image"] == f"/data/local-files/?d=images/{0:064x}.png"
    pred = tasks[1]["predictions"][0]
    assert pred["model_version"] == "m:7" and pred["score"] == pytest.approx(0.2)
    region = pred["result"][0]
    assert region["value"]["x"] == pytest.approx(10.0) and region["value"]["height"] == pytest.approx(50.0)
    assert region["value"]["rectanglelabels"] == ["square"] and region["from_name"] == "label"
    again = push(window, cfg, labeling_config=labeling_config_xml(CLASSES), drifted=True)
    assert again.created == 2 and {t["data"]["sha256"] for t in json.loads(cfg.out.read_text())}.isdisjoint(
        {t["data"]["sha256"] for t in tasks})  # already pushed hashes are not pushed again


def test_push_respects_the_daily_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    window = open_store(_store(tmp_path)).read()
    cfg = _cfg(tmp_path, max_per_run=5, max_per_day=3)
    assert push(window, cfg, labeling_config=labeling_config_xml(CLASSES), drifted=True).created == 3
    assert push(window, cfg, labeling_config=labeling_config_xml(CLASSES), drifted=True).created == 0


def test_push_without_images_says_how_to_keep_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    window = open_store(_store(tmp_path, keep=False)).read()
    with pytest.raises(DetopsError, match="serve.keep_images: true"):
        push(window, _cfg(tmp_path), labeling_config=labeling_config_xml(CLASSES), drifted=True)


def test_push_to_an_unreachable_server_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "token")
    window = open_store(_store(tmp_path)).read()
    with pytest.raises(DetopsError, match=r"Label Studio at http://127.0.0.1:9, project 'detops feedback': Connect"):
        push(window, _cfg(tmp_path), labeling_config=labeling_config_xml(CLASSES), drifted=True)


def test_push_refuses_a_labeling_config_with_fewer_labels_than_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    window = open_store(_store(tmp_path)).read()
    with pytest.raises(DetopsError, match="predicted class id .* but the labeling config has 1 labels"):
        push(window, _cfg(tmp_path), labeling_config=labeling_config_xml(CLASSES[:1]), drifted=True)
