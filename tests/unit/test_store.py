"""Prediction store, logger (including a failing store) and the `detops purge` verb."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from monitoring.logger import LOG_FAILURES, PredictionLogger, make_record
from monitoring.store import SQLiteStore, open_store, parse_age
from pipelines.cli.main import app
from pipelines.errors import DetopsError
from pipelines.types import Box, Detection

CLASSES = ["square", "circle"]


def _image(seed: int, h: int = 48, w: int = 64) -> tuple[np.ndarray, str]:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return img, hashlib.sha256(img.tobytes()).hexdigest()


def _dets() -> list[Detection]:
    return [Detection(Box(1, 2, 21, 12), 0, 0.9, 0.8), Detection(Box(5, 5, 15, 25), 1, 0.3, 0.35)]


def _record(seed: int, ts: datetime):
    img, sha = _image(seed)
    return make_record(img, sha256=sha, request_id=f"r{seed}", detections=_dets(), class_names=CLASSES,
                       model_name="m", model_version="1", ts=ts)


def test_append_read_roundtrip_and_windows(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    now = datetime.now(timezone.utc)
    store.append([_record(i, now - timedelta(minutes=10 - i)) for i in range(10)])
    df = store.read()
    assert len(df) == 10 and list(df["request_id"]) == [f"r{i}" for i in range(10)]  # oldest first
    assert {"brightness", "sharpness", "n_detections", "class_share_square", "emb_0"} <= set(df.columns)
    assert df["n_detections"].tolist() == [2.0] * 10
    assert df["class_share_circle"].iloc[0] == pytest.approx(0.5)
    assert df["max_confidence"].iloc[0] == pytest.approx(0.9)
    assert list(store.read(last_n=3)["request_id"]) == ["r7", "r8", "r9"]
    assert list(store.read(since=now - timedelta(minutes=2, seconds=30))["request_id"]) == ["r8", "r9"]
    assert store.read(last_n=1)["detections"].iloc[0] == "[[1,2,21,12,0,0.9],[5,5,15,25,1,0.3]]"
    assert (tmp_path / "store" / "predictions.db").exists()
    mode = sqlite3.connect(tmp_path / "store" / "predictions.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)

    def writer(k: int) -> None:
        store = SQLiteStore(tmp_path)  # a separate store object per writer, as separate workers have
        for i in range(20):
            store.append([_record(k * 100 + i, now)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(open_store(tmp_path).read()) == 80


def test_purge_by_age_and_image_remove_records_and_files(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    now = datetime.now(timezone.utc)
    old = _record(1, now - timedelta(days=40))
    new = _record(2, now)
    for rec, seed in ((old, 1), (new, 2)):
        rec.image_path = store.save_image(rec.image_sha256, _image(seed)[0])
    store.append([old, new])
    assert store.purge_older_than(parse_age("30d")) == 1
    assert not Path(old.image_path).exists() and Path(new.image_path).exists()
    assert store.delete_image(new.image_sha256) == 1
    assert not Path(new.image_path).exists() and store.read().empty


def test_purge_cli(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    now = datetime.now(timezone.utc)
    store.append([_record(1, now - timedelta(hours=13)), _record(2, now - timedelta(hours=1)), _record(3, now)])
    runner = CliRunner()
    result = runner.invoke(app, ["purge", "--store", str(tmp_path), "--older-than", "12h"])
    assert result.exit_code == 0 and "purged 1 records" in result.output
    sha = _image(3)[1]
    result = runner.invoke(app, ["purge", "--store", str(tmp_path), "--image", sha])
    assert result.exit_code == 0 and "deleted 1 records" in result.output
    assert list(store.read()["request_id"]) == ["r2"]
    result = runner.invoke(app, ["purge", "--store", str(tmp_path), "--older-than", "soon"])
    assert result.exit_code == 1 and "expected a non-negative number and a unit" in result.output
    result = runner.invoke(app, ["purge", "--store", str(tmp_path)])
    assert result.exit_code == 1 and "exactly one of" in result.output


@pytest.mark.parametrize("text,expected", [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
                                           ("90m", timedelta(minutes=90)), ("1.5h", timedelta(minutes=90))])
def test_parse_age(text: str, expected: timedelta) -> None:
    assert parse_age(text) == expected


@pytest.mark.parametrize("bad", ["30", "d", "-1d", "3y", "", "nand", "infd", "1e9d", "1000000d"])
def test_parse_age_rejects(bad: str) -> None:
    with pytest.raises(DetopsError, match="expected a non-negative number and a unit"):
        parse_age(bad)


@pytest.mark.parametrize("bad", ["../../escape", "", "A" * 64])
def test_delete_image_takes_only_a_digest(tmp_path: Path, bad: str) -> None:
    victim = tmp_path / "escape.png"
    victim.write_bytes(b"keep me")
    store = open_store(tmp_path / "store" / "a")
    with pytest.raises(DetopsError, match="not a sha256 hex digest"):
        store.delete_image(bad)
    assert victim.read_bytes() == b"keep me"


def test_open_store_rejects_unknown_locations() -> None:
    with pytest.raises(DetopsError, match="PostgreSQL"):
        open_store("postgresql://127.0.0.1/test")
    with pytest.raises(DetopsError, match="unsupported"):
        open_store("s3://bucket/x")


def test_logger_writes_features_and_keeps_images(tmp_path: Path) -> None:
    logger = PredictionLogger(tmp_path, class_names=CLASSES, keep_images=True)
    shas = []
    for i in range(5):
        img, sha = _image(i)
        shas.append(sha)
        assert logger.log(img, sha256=sha, request_id=f"q{i}", detections=_dets(), model_name="m",
                          model_version="3")
    logger.close()
    df = open_store(tmp_path).read()
    assert list(df["image_sha256"]) == shas and set(df["model_version"]) == {"3"}
    assert all(Path(p).exists() and Path(p).stem == s for p, s in zip(df["image_path"], shas))
    assert df["width"].tolist() == [64] * 5 and df["height"].tolist() == [48] * 5


class _BrokenStore(SQLiteStore):
    def append(self, records):  # noqa: ANN001
        raise sqlite3.OperationalError("disk I/O error")


def test_logger_with_failing_store_never_raises_and_counts(tmp_path: Path) -> None:
    before = LOG_FAILURES._value.get()
    logger = PredictionLogger(_BrokenStore(tmp_path), class_names=CLASSES)
    img, sha = _image(0)
    t0 = time.perf_counter()
    for i in range(10):
        logger.log(img, sha256=sha, request_id=str(i), detections=_dets(), model_name="m", model_version="1")
    assert time.perf_counter() - t0 < 0.5  # the request path only enqueues
    logger.close()
    assert logger.failures == 10 and logger.written == 0
    assert LOG_FAILURES._value.get() - before == 10


def test_logger_survives_store_folder_removed(tmp_path: Path) -> None:
    # The store's folder vanishing under a running server (disk cleaned, volume gone) is a real failure.
    import shutil

    logger = PredictionLogger(tmp_path / "s", class_names=CLASSES, keep_images=True)
    shutil.rmtree(tmp_path / "s")
    (tmp_path / "s").write_text("not a folder any more")
    img, sha = _image(0)
    logger.log(img, sha256=sha, request_id="x", detections=[], model_name="m", model_version="1")
    logger.close()
    assert logger.failures == 1 and logger.written == 0


class _GatedStore(SQLiteStore):
    """Appends only once the file `<root>/open` exists (a store that stalls, across processes)."""

    def append(self, records):  # noqa: ANN001
        deadline = time.monotonic() + 30
        while not (self.root / "open").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        super().append(records)


def test_logger_drops_when_queue_full(tmp_path: Path) -> None:
    logger = PredictionLogger(_GatedStore(tmp_path), class_names=CLASSES, max_queue=2, batch_size=1)
    img, sha = _image(0)
    results = [logger.log(img, sha256=sha, request_id=str(i), detections=[], model_name="m", model_version="1")
               for i in range(10)]
    (tmp_path / "open").touch()
    logger.close()
    # At most the queue (2) and the featurizer's batch (1, stalled in append) get in, give or take timing.
    assert results.count(False) == logger.dropped >= 6
    assert logger.written == results.count(True)


def test_logger_backlog_is_the_deferred_work_until_written(tmp_path: Path) -> None:
    # The gauge a bench waits on before its next phase: records answered but not yet featurized.
    from prometheus_client import REGISTRY

    logger = PredictionLogger(_GatedStore(tmp_path), class_names=CLASSES, batch_size=1, flush_interval_s=0.05)
    img, sha = _image(0)
    for i in range(3):
        assert logger.log(img, sha256=sha, request_id=str(i), detections=[], model_name="m", model_version="1")
    time.sleep(0.3)  # the reporting thread runs while no request comes
    assert logger.backlog == 3 and REGISTRY.get_sample_value("detops_prediction_log_backlog") == 3
    (tmp_path / "open").touch()
    logger.flush()
    time.sleep(0.3)
    assert logger.backlog == 0 and logger.written == 3
    assert REGISTRY.get_sample_value("detops_prediction_log_backlog") == 0
    assert REGISTRY.get_sample_value("detops_prediction_log_written_total") >= 3
    logger.close()


def _decode_counted(pixels: np.ndarray, calls: Path) -> np.ndarray:
    """A picklable 'decode': returns the pixels and appends a line to `calls` (in the featurizer)."""
    with calls.open("a") as f:
        f.write("decoded\n")
    return pixels


def test_logger_reuses_features_of_a_known_image_and_decodes_lazily(tmp_path: Path) -> None:
    # A cache hit is logged without pixels: the features are those the first request of the same
    # image produced (identical values), and the decode function runs (in the featurizer process)
    # only for a forgotten image.
    import functools

    logger = PredictionLogger(tmp_path, class_names=CLASSES, remember=1)
    img, sha = _image(0)
    other, other_sha = _image(1)
    calls = tmp_path / "calls.txt"
    decode = functools.partial(_decode_counted, img, calls)

    logger.log(img, sha256=sha, request_id="first", detections=_dets(), model_name="m", model_version="1")
    logger.log(decode, sha256=sha, request_id="hit", detections=_dets(), model_name="m", model_version="1")
    logger.flush()
    assert not calls.exists()
    logger.log(other, sha256=other_sha, request_id="other", detections=[], model_name="m", model_version="1")
    logger.log(decode, sha256=sha, request_id="forgotten", detections=[], model_name="m", model_version="1")
    logger.close()
    assert calls.read_text() == "decoded\n"
    df = open_store(tmp_path).read().set_index("request_id")
    direct = make_record(img, sha256=sha, request_id="x", detections=_dets(), class_names=CLASSES,
                         model_name="m", model_version="1")
    for request in ("first", "hit", "forgotten"):
        row = df.loc[request]
        assert {k: row[k] for k in direct.statistics} == direct.statistics
        embedding = [row[f"emb_{i}"] for i in range(len(direct.embedding))]
        assert np.array_equal(np.asarray(embedding, dtype=np.float32), direct.embedding)


def test_a_record_written_by_the_featurizer_process_equals_make_record(tmp_path: Path) -> None:
    # The featurizer is another process (another interpreter): what it writes must be exactly what
    # make_record computes here, or the live window would drift from the reference by construction.
    img, sha = _image(7, h=300, w=420)  # above the statistics' 256 px: the downscaling runs too
    ts = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    logger = PredictionLogger(tmp_path / "live", class_names=CLASSES)
    assert logger._process.pid != __import__("os").getpid() and logger._process.is_alive()
    logger.log(img, sha256=sha, request_id="r", detections=_dets(), model_name="m", model_version="2",
               traffic="shadow", tenant="acme")
    logger.flush()
    assert logger.written == 1  # flush returned after the write, not merely after the enqueue
    logger.close()
    assert not logger._process.is_alive()
    direct = make_record(img, sha256=sha, request_id="r", detections=_dets(), class_names=CLASSES,
                         model_name="m", model_version="2", ts=ts, traffic="shadow", tenant="acme")
    reference = open_store(tmp_path / "direct")
    reference.append([direct])
    live = open_store(tmp_path / "live").read().drop(columns=["ts"]).reset_index(drop=True)
    expected = reference.read().drop(columns=["ts"]).reset_index(drop=True)
    import pandas as pd

    pd.testing.assert_frame_equal(live, expected, check_exact=True)


def test_logger_counts_an_item_it_cannot_send(tmp_path: Path) -> None:
    # A callable that cannot be pickled never reaches the featurizer: counted, and flush does not hang.
    logger = PredictionLogger(tmp_path, class_names=CLASSES)
    img, sha = _image(0)
    assert logger.log(lambda: img, sha256=sha, request_id="x", detections=[], model_name="m", model_version="1")
    logger.log(img, sha256=sha, request_id="y", detections=[], model_name="m", model_version="1")
    logger.flush()
    logger.close()
    assert logger.failures == 1 and logger.written == 1


def test_the_featurizer_exits_when_its_worker_is_killed(tmp_path: Path) -> None:
    # A serving worker killed outright (SIGKILL, OOM killer) cannot close its logger: the featurizer
    # must notice and exit rather than stay behind as an orphan.
    import os
    import subprocess
    import sys

    import psutil

    script = (f"import os, signal, sys\nfrom monitoring.logger import PredictionLogger\n"
              f"logger = PredictionLogger({str(tmp_path)!r}, class_names=['a'])\n"
              f"print(logger._process.pid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    worker = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert worker.returncode == -9, worker.stderr
    featurizer = int(worker.stdout.split()[0])
    try:
        psutil.Process(featurizer).wait(timeout=60)  # it checks every flush interval (0.5 s)
    except psutil.NoSuchProcess:
        pass
    assert not psutil.pid_exists(featurizer) or psutil.Process(featurizer).status() == psutil.STATUS_ZOMBIE
