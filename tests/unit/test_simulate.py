"""`detops simulate` against a real HTTP server on 127.0.0.1 that decodes the multipart upload."""

from __future__ import annotations

import threading
import time
from email.parser import BytesParser
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from monitoring.simulate import simulate
from pipelines.cli.main import app
from pipelines.config.data import SynthesizeConfig
from pipelines.errors import DetopsError


@pytest.fixture()
def server():
    """A loopback server: 200 when the `image` field decodes as an image, 400 otherwise."""
    received: list[np.ndarray] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            msg = BytesParser(policy=default).parsebytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + body)
            parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True)
                     for p in msg.iter_parts()}
            image = cv2.imdecode(np.frombuffer(parts.get("image", b""), np.uint8), cv2.IMREAD_COLOR)
            ok = self.path == "/detect" and image is not None
            if ok:
                received.append(image)
            self.send_response(200 if ok else 400)
            self.end_headers()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()


def test_simulate_sends_rate_limited_shifted_images(server) -> None:  # noqa: ANN001
    url, received = server
    synth = SynthesizeConfig(min_side=96, max_side=128)
    t0 = time.monotonic()
    result = simulate(url, 6, shift="dark", rate=20.0, seed=5, synth=synth)
    assert result.status_codes == {"200": 6} and result.sent == 6
    assert time.monotonic() - t0 >= 5 / 20  # rate limit respected
    assert len(received) == 6 and all(96 <= max(im.shape[:2]) <= 128 for im in received)
    assert np.mean([im.mean() for im in received]) < 90  # the dark shift reached the server


def test_simulate_counts_transport_errors_and_stops_at_timeout() -> None:
    result = simulate("http://127.0.0.1:9", 50, rate=100.0, timeout_s=0.3,
                      synth=SynthesizeConfig(min_side=64, max_side=64))
    assert 1 <= result.sent < 50 and all(code.startswith("error:") for code in result.status_codes)


def test_simulate_cli_fails_when_no_request_succeeds() -> None:
    result = CliRunner().invoke(app, ["simulate", "--url", "http://127.0.0.1:9", "--n", "2", "--rate", "50"])
    assert result.exit_code == 1 and "no request to http://127.0.0.1:9 succeeded" in result.output


def test_simulate_cli_and_bad_input(server) -> None:  # noqa: ANN001
    url, _ = server
    result = CliRunner().invoke(app, ["simulate", "--url", url, "--n", "3", "--rate", "50"])
    assert result.exit_code == 0 and "sent 3 images" in result.output and "200: 3" in result.output
    result = CliRunner().invoke(app, ["simulate", "--url", url, "--shift", "fog"])
    assert result.exit_code == 1 and "synthesize.shift" in result.output
    with pytest.raises(DetopsError, match="--rate"):
        simulate(url, 1, rate=0)
