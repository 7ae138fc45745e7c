"""labeling.studio: export schema, labeling config, image references (local http.server for URLs), pull."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from typer.testing import CliRunner

from labeling.studio import (
    image_name,
    load_export,
    media_url,
    parse_labeling_config,
    pull,
    resolve_image,
    studio_env,
)
from pipelines.cli.main import app
from pipelines.errors import DetopsError

CONFIG = """<View>
  <Image name="img" value="$photo"/>
  <Choices name="quality" toName="img"><Choice value="good"/></Choices>
  <RectangleLabels name="boxes" toName="img">
    <Label value="truck"/><Label value="bus"/><Label value="car"/>
  </RectangleLabels>
  <RectangleLabels name="more" toName="img"><Label value="bus"/><Label value="ant"/></RectangleLabels>
</View>"""


@contextmanager
def http_server(handler):
    """A real HTTP server on 127.0.0.1 (free port) for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- labeling config
def test_labeling_config_keeps_xml_order_across_tags_and_finds_the_image_key():
    config = parse_labeling_config(CONFIG)
    assert config.class_names == ["truck", "bus", "car", "ant"]
    assert config.image_key == "photo"
    assert config.rectangle_tags == ["boxes", "more"]


@pytest.mark.parametrize("xml, fragment", [
    ("<View><Image name='i' value='$image'", "not a valid labeling config"),
    ("<View><Image name='i' value='$image'/></View>", "no <RectangleLabels>"),
    ("<View><Image name='i' value='$image'/><RectangleLabels name='l' toName='i'/></View>", "no <Label>"),
])
def test_bad_labeling_configs_are_named(xml, fragment):
    with pytest.raises(DetopsError, match=fragment):
        parse_labeling_config(xml, "cfg.xml")


# --------------------------------------------------------------------------- export schema
def test_export_schema_reads_tasks_and_legacy_completions(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps([
        {"id": 3, "data": {"image": "a.jpg"}, "annotations": [
            {"id": 9, "result": [{"type": "rectanglelabels", "value": {"x": 1}, "original_width": 10,
                                  "original_height": 5}], "updated_at": "2024-05-06T09:00:00.000000Z",
             "lead_time": 3.2}], "meta": {}},
        {"id": 4, "data": {"image": "b.jpg"}, "completions": [{"id": 1, "result": [], "was_cancelled": True}]},
    ]))
    tasks = load_export(path)
    assert [t.id for t in tasks] == [3, 4]
    assert tasks[0].annotations[0].touched_at.year == 2024
    assert tasks[0].annotations[0].result[0].original_width == 10
    assert tasks[1].annotations[0].was_cancelled


@pytest.mark.parametrize("content, fragment", [
    ("[{", "not valid JSON"),
    ('"hello"', "expected a list of tasks"),
    ('[{"id": 7}]', "task 7: data: Field required"),
    ('[{"data": {"image": "x"}}]', "task #0: id: Field required"),
    ('[{"id": 8, "data": {}, "annotations": [{"result": [{"value": {}}]}]}]', "task 8: annotations.0.result.0.type"),
    ('[{"id": 9, "data": {}, "annotations": [{"result": [{"type": "rectanglelabels", "original_width": -3}]}]}]',
     "task 9: annotations.0.result.0.original_width"),
])
def test_malformed_exports_name_the_task_and_field(tmp_path, content, fragment):
    path = tmp_path / "export.json"
    path.write_text(content)
    with pytest.raises(DetopsError) as info:
        load_export(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_missing_export_file(tmp_path):
    with pytest.raises(DetopsError, match="export file not found"):
        load_export(tmp_path / "nope.json")


# --------------------------------------------------------------------------- image references
@pytest.fixture()
def media(tmp_path):
    root = tmp_path / "root"
    for rel in ["upload/4/u1.jpg", "images/u2.jpg", "u3.jpg", "images/sub dir/l 1.jpg", "images/l2.jpg",
                "rel/r.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    return root


@pytest.mark.parametrize("ref, expected", [
    ("/data/upload/4/u1.jpg", "upload/4/u1.jpg"),  # Label Studio's media folder layout
    ("/data/upload/4/u2.jpg", "images/u2.jpg"),  # pulled or synthetic: images/<name>
    ("/data/upload/4/u3.jpg", "u3.jpg"),  # flat folder
    ("/data/local-files/?d=images/sub%20dir/l%201.jpg", "images/sub dir/l 1.jpg"),  # URL-decoded
    ("/data/local-files/?d=elsewhere/l2.jpg", "images/l2.jpg"),  # pulled: the server's files land in images/
    ("rel/r.jpg", "rel/r.jpg"),
])
def test_label_studio_references_resolve_under_the_root(media, tmp_path, ref, expected):
    assert resolve_image(ref, media, tmp_path / "cache") == media / expected


def test_absolute_paths_and_missing_files(media, tmp_path):
    absolute = media / "u3.jpg"
    assert resolve_image(str(absolute), tmp_path / "other", tmp_path / "cache") == absolute
    with pytest.raises(DetopsError) as info:
        resolve_image("/data/upload/4/gone.jpg", media, tmp_path / "cache")
    message = str(info.value)
    assert "'/data/upload/4/gone.jpg' not found" in message and str(media / "upload" / "4" / "gone.jpg") in message
    with pytest.raises(DetopsError, match="without \\?d="):
        resolve_image("/data/local-files/?x=1", media, tmp_path / "cache")


def test_http_images_are_fetched_once_into_the_cache(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "pic.jpg").write_bytes(b"jpeg bytes")
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(served))
    cache = tmp_path / "cache"
    with http_server(handler) as base:
        got = resolve_image(f"{base}/pic.jpg", tmp_path, cache)
        assert got.parent == cache and got.name.endswith("_pic.jpg") and got.read_bytes() == b"jpeg bytes"
        with pytest.raises(DetopsError, match="download failed.*404"):
            resolve_image(f"{base}/missing.jpg", tmp_path, cache)
    # The server is gone: the cached copy is used, no network needed.
    assert resolve_image(f"{base}/pic.jpg", tmp_path, cache) == got
    with pytest.raises(DetopsError, match="download failed"):
        resolve_image(f"{base}/other.jpg", tmp_path, cache, timeout_s=1)


def test_image_name():
    assert image_name("/data/local-files/?d=a/b%20c.jpg") == "b c.jpg"
    assert image_name("/data/upload/1/x-y.png") == "x-y.png"
    assert image_name("https://h/p/q.jpg?sig=1") == "q.jpg"


# --------------------------------------------------------------------------- pull: env and URLs
def test_studio_env(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    with pytest.raises(DetopsError, match="set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY"):
        studio_env()
    monkeypatch.setenv("LABEL_STUDIO_URL", "localhost:8080")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "k")
    with pytest.raises(DetopsError, match="expected an http\\(s\\) URL"):
        studio_env()
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:8080/ ")
    assert studio_env() == ("http://127.0.0.1:8080", "k")


def test_media_url():
    assert media_url("http://ls:8080/", "/data/upload/3/a.jpg") == "http://ls:8080/data/upload/3/a.jpg"
    assert media_url("http://ls/sub", "/data/local-files/?d=x/a.jpg") == "http://ls/sub/data/local-files/?d=x/a.jpg"
    assert media_url("http://ls", "https://cdn/a.jpg") is None
    assert media_url("http://ls", "images/a.jpg") is None


def test_pull_cli_without_environment_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["pull", "--project", "3", "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to reach "
                                                  "Label Studio"]


# --------------------------------------------------------------------------- pull over HTTP
LS_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="b"/><Label value="a"/></RectangleLabels></View>"""


def stand_in_server(tasks: list[dict], files: dict[str, bytes], token: str, seen: list[str]):
    """The four Label Studio endpoints pull uses (the real server runs in the integration test)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            seen.append(url.path)
            if self.headers.get("Authorization") != f"Token {token}":
                return self._send(401, b'{"detail": "auth"}')
            if url.path == "/api/version/":
                return self._send(200, json.dumps({"release": "1.23.2", "edition": "Community"}).encode())
            if url.path == "/api/projects/5/":
                return self._send(200, json.dumps({"id": 5, "title": "p", "label_config": LS_CONFIG}).encode())
            if url.path == "/api/projects/5/export":
                assert parse_qs(url.query).get("export_type") == ["JSON"]
                return self._send(200, json.dumps(tasks).encode())
            key = url.path + (f"?{url.query}" if url.query else "")
            if key in files:
                return self._send(200, files[key], "image/jpeg")
            return self._send(404, b'{"detail": "not found"}')

    return Handler


def test_pull_writes_export_config_and_images(monkeypatch, tmp_path):
    tasks = [{"id": 1, "data": {"image": "/data/upload/5/ab12-one.jpg"}, "annotations": []},
             {"id": 2, "data": {"image": "/data/local-files/?d=shots/two.jpg"}, "annotations": []},
             {"id": 3, "data": {"image": "https://cdn.example/three.jpg"}, "annotations": []}]
    files = {"/data/upload/5/ab12-one.jpg": b"one", "/data/local-files/?d=shots/two.jpg": b"two"}
    seen: list[str] = []
    with http_server(stand_in_server(tasks, files, "tok", seen)) as base:
        monkeypatch.setenv("LABEL_STUDIO_URL", base)
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "tok")
        export = pull(5, tmp_path / "pulled")
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "wrong")
        result = CliRunner().invoke(app, ["pull", "--project", "5", "--out", str(tmp_path / "denied")])
    out = tmp_path / "pulled"
    assert json.loads(export.read_text()) == tasks  # references are not rewritten
    assert (out / "labeling_config.xml").read_text() == LS_CONFIG
    assert (out / "images" / "ab12-one.jpg").read_bytes() == b"one"
    assert (out / "images" / "two.jpg").read_bytes() == b"two"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["ab12-one.jpg", "two.jpg"]
    assert "/data/upload/5/ab12-one.jpg" in seen
    # ingest finds the pulled files by the resolution rules
    assert resolve_image(tasks[0]["data"]["image"], out, tmp_path / "c") == out / "images" / "ab12-one.jpg"
    assert resolve_image(tasks[1]["data"]["image"], out, tmp_path / "c") == out / "images" / "two.jpg"
    assert result.exit_code == 1 and "HTTP 401" in result.output and "Traceback" not in result.output
