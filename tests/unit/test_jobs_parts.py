"""The small parts of the jobs: webhook signatures and the callback policy, the object stores (a
local folder and an fsspec filesystem), the settings from params.yaml and the environment, the
result formats and the resumable JSON Lines reader of `detops batch run`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipelines.config.jobs import JobsConfig
from pipelines.errors import DetopsError
from serving.jobs import webhooks
from serving.jobs.batch import image_files, read_done, submission_key
from serving.jobs.objects import FsspecObjectStore, LocalObjectStore, get_many, open_object_store
from serving.jobs.results import coco_results, result_line
from serving.jobs.settings import load_jobs_settings


def test_signature_round_trip_and_tampering() -> None:
    body = b'{"job_id": "x"}'
    now = int(time.time())
    headers = {webhooks.TIMESTAMP_HEADER: str(now), webhooks.SIGNATURE_HEADER: webhooks.sign("s3cret", now, body)}
    assert headers[webhooks.SIGNATURE_HEADER].startswith("v1=")
    assert webhooks.verify("s3cret", headers, body)
    assert webhooks.verify("s3cret", {k.lower(): v for k, v in headers.items()}, body)  # header case
    assert not webhooks.verify("other", headers, body)
    assert not webhooks.verify("s3cret", headers, body + b" ")
    assert not webhooks.verify("s3cret", {**headers, webhooks.TIMESTAMP_HEADER: str(now + 1)}, body)
    assert not webhooks.verify("s3cret", headers, body, now=now + 301)  # a replay after the tolerance
    assert not webhooks.verify("s3cret", {}, body)


@pytest.mark.parametrize(("url", "cfg", "reason"), [
    ("http://example.com/hook", {}, "scheme 'http' is not allowed"),
    ("https://127.0.0.1/hook", {}, "private, loopback or reserved"),
    ("https://localhost/hook", {}, "private, loopback or reserved"),
    ("https://10.1.2.3/hook", {}, "private, loopback or reserved"),
    ("https://169.254.169.254/latest/meta-data", {}, "private, loopback or reserved"),  # cloud metadata
    ("https://[::ffff:127.0.0.1]/hook", {}, "private, loopback or reserved"),
    ("https://user:pw@8.8.8.8/hook", {}, "credentials"),
    ("https://8.8.8.8/hook", {"webhook_allowed_hosts": ["*.example.com"]}, "not in jobs.webhook_allowed_hosts"),
    ("https://no-such-host.invalid/hook", {}, "cannot resolve"),
])
def test_callback_policy_refuses(url: str, cfg: dict, reason: str) -> None:
    with pytest.raises(webhooks.CallbackRefused, match=reason):
        webhooks.check_callback_url(url, JobsConfig(**cfg))


def test_callback_policy_allows() -> None:
    assert webhooks.check_callback_url("https://8.8.8.8:8443/hook", JobsConfig()) == ("8.8.8.8", ["8.8.8.8"])
    local = JobsConfig(webhook_schemes=["http", "https"], webhook_allow_private=True)
    assert webhooks.check_callback_url("http://127.0.0.1:9/x", local)[1] == ["127.0.0.1"]


def test_backoff_grows_and_is_capped() -> None:
    cfg = JobsConfig(webhook_backoff_s=2, webhook_backoff_max_s=10)
    waits = [webhooks.backoff_s(n, cfg) for n in (1, 2, 3, 10)]
    assert 1.6 <= waits[0] <= 2.4 and 3.2 <= waits[1] <= 4.8 and 6.4 <= waits[2] <= 9.6 and waits[3] <= 12


@pytest.mark.parametrize("kind", ["local", "fsspec-file", "fsspec-memory"])
def test_object_stores(tmp_path: Path, kind: str) -> None:
    store = {"local": lambda: LocalObjectStore(tmp_path / "objects"),
             "fsspec-file": lambda: FsspecObjectStore(f"file://{tmp_path}/objects"),
             "fsspec-memory": lambda: FsspecObjectStore(f"memory://detops-test-{time.monotonic_ns()}")}[kind]()
    store.put("job1/0", b"abc")
    store.put("job1/0", b"abcd")  # replaced whole
    store.put("job1/1", b"x")
    store.put("job2/0", b"y")
    store.put_many([(f"job3/{i}", bytes([i])) for i in range(20)])
    assert get_many(store, [f"job3/{i}" for i in range(20)] + ["job3/none"]) == [bytes([i]) for i in range(20)] + [None]
    assert store.get("job1/0") == b"abcd"
    store.delete_prefix("job1")
    with pytest.raises(FileNotFoundError):
        store.get("job1/1")
    assert store.get("job2/0") == b"y"
    store.delete_prefix("nothing-here")
    for bad in ("../escape", "/abs", "a//b", ""):
        with pytest.raises(ValueError, match="invalid object key"):
            store.put(bad, b"")
    if kind == "local":
        assert not list((tmp_path / "objects").rglob(".tmp-*"))  # no temporary file left behind


def test_object_store_by_url(tmp_path: Path) -> None:
    assert isinstance(open_object_store(str(tmp_path)), LocalObjectStore)
    assert isinstance(open_object_store(f"file://{tmp_path}"), LocalObjectStore)
    assert isinstance(open_object_store("memory://bucket/prefix"), FsspecObjectStore)


def test_settings_come_from_params_and_the_environment(tmp_path: Path) -> None:
    embedded = load_jobs_settings({"DETOPS_JOBS_DATA_DIR": str(tmp_path)})
    assert embedded.database_url == f"sqlite:///{tmp_path}/jobs.db" and embedded.embedded_broker
    assert embedded.broker_url == f"sqla+sqlite:///{tmp_path}/broker.db"
    assert embedded.object_store_url == f"{tmp_path}/objects" and embedded.webhook_secret is None
    production = load_jobs_settings({"DETOPS_DATABASE_URL": "postgresql+psycopg://u@db/jobs",
                                     "DETOPS_BROKER_URL": "redis://r:6379/0", "DETOPS_WEBHOOK_SECRET": "k",
                                     "DETOPS_JOBS_CHUNK_SIZE": "8", "DETOPS_JOBS_WEBHOOK_SCHEMES": "[http, https]"})
    assert (production.database_url, production.broker_url, production.webhook_secret) == (
        "postgresql+psycopg://u@db/jobs", "redis://r:6379/0", "k")
    assert production.config.chunk_size == 8 and production.config.webhook_schemes == ["http", "https"]
    assert not production.embedded_broker
    with pytest.raises(DetopsError, match=r"jobs.chunk_size \(DETOPS_JOBS_CHUNK_SIZE\)"):
        load_jobs_settings({"DETOPS_JOBS_CHUNK_SIZE": "0"})
    with pytest.raises(DetopsError, match="DETOPS_JOBS_CHUNKS: unknown jobs setting"):
        load_jobs_settings({"DETOPS_JOBS_CHUNKS": "8"})
    with pytest.raises(DetopsError, match="webhook_schemes"):
        load_jobs_settings({"DETOPS_JOBS_WEBHOOK_SCHEMES": "[ftp]"})


def test_result_lines_and_coco() -> None:
    body = {"image": {"width": 10, "height": 8, "sha256": "0" * 64}, "model": {"name": "m", "version": "1"},
            "detections": [{"box": {"x1": 1.0, "y1": 2.0, "x2": 4.0, "y2": 6.0}, "class_id": 2, "class_name": "c",
                            "confidence": 0.9, "raw_confidence": 0.8}]}
    good = result_line({"index": 0, "name": "a.jpg"}, "succeeded", body, None, None)
    bad = result_line({"index": 1, "name": "b.jpg"}, "failed", None, "corrupt_image", "b.jpg: cannot decode")
    assert good["detections"] == body["detections"] and good["name"] == "a.jpg" and "error" not in good
    assert bad == {"index": 1, "name": "b.jpg", "status": "failed", "error": "corrupt_image",
                   "detail": "b.jpg: cannot decode"}
    assert coco_results([(0, good), (1, bad)]) == [{"image_id": 0, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0],
                                                    "score": 0.9}]


def test_batch_output_is_resumable_after_a_torn_write(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"path": "a.jpg", "status": "succeeded"}) + "\n" + '{"path": "b.jp')
    assert list(read_done(out)) == ["a.jpg"]
    assert out.read_text().endswith("}\n")  # the torn line is gone, so appending continues cleanly
    assert read_done(tmp_path / "none.jsonl") == {}


def test_batch_finds_images_recursively_and_keys_submissions_by_content(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.JPG", "d/sub/a.png", "d/notes.txt", "d/c.tiff"):
        (tmp_path / name).write_bytes(name.encode())
    files = image_files(tmp_path / "d")
    assert [f.relative_to(tmp_path / "d").as_posix() for f in files] == ["b.JPG", "c.tiff", "sub/a.png"]
    key = submission_key(tmp_path / "d", files, {"conf": 0.5})
    assert key == submission_key(tmp_path / "d", files, {"conf": 0.5})
    assert key != submission_key(tmp_path / "d", files, {"conf": 0.6})
    (tmp_path / "d" / "b.JPG").write_bytes(b"changed")
    assert key != submission_key(tmp_path / "d", files, {"conf": 0.5})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DetopsError, match="no images"):
        image_files(tmp_path / "empty")
    with pytest.raises(DetopsError, match="not a folder"):
        image_files(tmp_path / "missing")
