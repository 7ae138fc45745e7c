"""`detops deploy watch`: keep what is live equal to `serve.model_name@champion`.

Polling the registry every `deploy.watch.poll_interval_s` works with any tracking store (the SQLite
default included). With an MLflow tracking server, the watcher also registers an MLflow registry
webhook (alias created/deleted) pointing at its own small HTTP receiver; a delivery whose HMAC-SHA256
signature verifies (secret in DETOPS_MLFLOW_WEBHOOK_SECRET) wakes it at once, so setting the alias in
the MLflow UI starts a rollout within a second. Polling stays the backstop for lost deliveries.

What the watcher does when `@champion` changes: a new version is rolled out (deploy/rollout.py); the
version whose colour is still warm (the one live before: `@champion` moved back) is switched to at
once. A refused rollout moves `@champion` back to the live version, and so does a version refused
before when someone sets `@champion` to it again (it is not retried: roll it out by hand after fixing
it; deploy/policy.py), so the two never disagree for longer than one check.

After a switch (its own, or a `detops deploy rollout` from another shell), while the previous colour is
warm, the watcher also judges the new live version every `deploy.watch.live_check_s` on its live
traffic (`Deployer.guard`: error rate, p95 against the previous version's) and switches back by itself
when a gate breaks; when the keep-warm time is over, it retires the previous colour.

While it runs, the watcher also answers `detops deploy rollback` on a Unix socket in the state folder
(`watch.sock`, owner only): the command hands the rollback to this process, which has MLflow imported
and its store open (about 2 s of the command's own time otherwise), and prints what it did. Without a
watcher the command does the same work itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from deploy import policy
from deploy.rollout import Deployer, RolloutRefused
from pipelines import registry
from pipelines.config.deploy import DeployConfig
from pipelines.errors import DetopsError

SECRET_ENV = "DETOPS_MLFLOW_WEBHOOK_SECRET"
WEBHOOK_NAME = "detops-deploy-watch"
WEBHOOK_PATH = "/mlflow"
EVENTS = ["model_version_alias.created", "model_version_alias.deleted"]
MAX_SKEW_S = 300  # deliveries older than this are refused (replays)
CONTROL_SOCKET = "watch.sock"  # in deploy.state_dir: `detops deploy rollback` asks the running watcher
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
log = logging.getLogger(__name__)


def control_path(cfg: DeployConfig) -> Path:
    """The watcher's control socket of the deployment `cfg` describes."""
    return Path(cfg.state_dir).resolve() / CONTROL_SOCKET


def ask_watcher(cfg: DeployConfig, request: dict[str, Any], *,
                timeout_s: float = 900.0) -> dict[str, Any] | None:
    """Send `request` to the watcher running for this deployment and return its answer; None when no
    watcher listens (no socket, or one a killed watcher left). A watcher that took the request and
    stopped before answering is an error: what it did is unknown, so the command must not redo it."""
    path = control_path(cfg)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
        except OSError:
            return None
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answers:
            answer = answers.readline()
    if not answer:
        raise DetopsError(f"the watcher ({path}) stopped before answering; see `detops deploy status` "
                          "before trying again")
    return json.loads(answer)


def signature_ok(secret: str, headers: Any, body: bytes, *, now: float | None = None) -> bool:
    """Whether an MLflow webhook delivery is authentic: `X-MLflow-Signature` is `v1,<base64 HMAC-SHA256>`
    of `<delivery id>.<timestamp>.<body>` with the shared secret, and the timestamp is recent."""
    signature = headers.get("X-MLflow-Signature", "")
    timestamp = headers.get("X-MLflow-Timestamp", "")
    delivery = headers.get("X-MLflow-Delivery-Id", "")
    if not signature.startswith("v1,") or not timestamp.isdigit() or not delivery:
        return False
    if abs((now or time.time()) - int(timestamp)) > MAX_SKEW_S:
        return False
    expected = hmac.new(secret.encode(), f"{delivery}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(expected).decode(), signature[3:])


class Watcher:
    """Follows `@champion` for one Deployer; `check()` is one step, `run()` the loop."""

    def __init__(self, deployer: Deployer, say: Callable[[str], None] = print) -> None:
        self.deployer = deployer
        self.cfg = deployer.cfg.watch
        self.name = deployer.serve.model_name
        self.say = say
        self.wake = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.control_server: socketserver.UnixStreamServer | None = None

    def check(self, trigger: str = "watcher") -> str:
        """Compare `@champion` with the live version and act on a difference; what happened, one line."""
        for note in self.deployer.repair():
            self.say(f"repair: {note}")
        champion = registry.alias_version(self.name, registry.CHAMPION)
        stack = self.deployer.state.stack()
        if champion is None:
            return f"{self.name} has no @champion: nothing to follow"
        if stack.live is None:
            self.deployer.up()
            return f"nothing was deployed: v{champion} is live"
        if champion == stack.live_version:
            return f"v{champion} is live and @champion"
        refused = policy.keep_off_refused(self.name, champion, stack.live_version)
        if refused is not None:
            return refused
        try:
            rollout = self.deployer.follow(champion, trigger=trigger)
        except RolloutRefused as exc:
            return str(exc)
        if rollout is None:
            return f"@champion moved off v{champion} while a deploy command ran: compared again at the next check"
        if rollout.figures.get("warm"):
            return f"v{champion} is live: switched to its warm colour in {rollout.figures['switch_s']} s"
        return f"v{champion} rolled out (rollout {rollout.id}), now live"

    def run(self, *, once: bool = False, webhook: bool | None = None) -> None:
        """Check now, then at every poll interval or webhook delivery, until interrupted. `webhook`
        (default: when the tracking store is an MLflow server) starts the receiver and registers it."""
        from pipelines.tracking import tracking_uri

        if webhook is None:
            webhook = tracking_uri().startswith(("http://", "https://"))
        if not once:
            self.start_control()
        if webhook and not once:
            self.start_receiver()
            self.register_webhook()
        trigger = "watcher"
        next_check = 0.0
        try:
            while True:
                try:
                    # The deployment state is looked at every live_check_s (a file read when nothing
                    # is watched), so a switch made by a command in another shell is judged from its
                    # first requests; @champion is compared every poll interval or webhook.
                    outcome, text = self.deployer.guard()
                    if outcome in ("rolled_back", "retired"):
                        self.say(text)
                    if once or trigger == "webhook" or time.monotonic() >= next_check:
                        self.say(self.check(trigger))
                        next_check = time.monotonic() + self.cfg.poll_interval_s
                except DetopsError as exc:
                    self.say(f"error: {exc}")
                if once:
                    return
                wait = min(self.cfg.live_check_s, max(next_check - time.monotonic(), 0.0))
                # A delivery during the check leaves the event set: the next check follows at once.
                trigger = "webhook" if self.wake.wait(wait) else "watcher"
                self.wake.clear()
        finally:
            self.stop_receiver()
            self.stop_control()

    # ------------------------------------------------------------------ commands from other shells
    def start_control(self) -> None:
        """Answer `detops deploy rollback` on the control socket (owner-only), in a background thread.
        Refused when another watcher answers there: one watcher per deployment."""
        path = control_path(self.deployer.cfg)
        if len(str(path)) > MAX_SOCKET_PATH:
            self.say(f"no control socket: {path} is too long for a Unix socket; rollback commands run in "
                     "their own process")
            return
        if ask_watcher(self.deployer.cfg, {"command": "ping"}, timeout_s=5.0) is not None:
            raise DetopsError(f"deploy watch: another watcher already follows this deployment ({path})")
        path.unlink(missing_ok=True)  # left by a killed watcher
        watcher = self

        class Commands(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    answer = watcher.command(json.loads(self.rfile.readline()))
                except ValueError:
                    answer = {"ok": False, "error": "not a JSON request"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        mask = os.umask(0o177)  # the socket is created owner-only: whoever connects may roll back
        try:
            self.control_server = socketserver.ThreadingUnixStreamServer(str(path), Commands)
        finally:
            os.umask(mask)
        threading.Thread(target=self.control_server.serve_forever, name="detops-control", daemon=True).start()

    def stop_control(self) -> None:
        if self.control_server is not None:
            self.control_server.shutdown()
            self.control_server.server_close()
            control_path(self.deployer.cfg).unlink(missing_ok=True)
            self.control_server = None

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request of the control socket: `ping`, or `rollback` with its `reason`; the answer
        carries the rollout record and the repair notes, or the error."""
        if request.get("command") == "ping":
            return {"ok": True}
        if request.get("command") != "rollback":
            return {"ok": False, "error": f"unknown command {request.get('command')!r} (ping, rollback)"}
        deployer = Deployer(self.deployer.cfg, self.deployer.serve)  # its own repair notes
        try:
            rollout = deployer.rollback(reason=str(request.get("reason") or "manual rollback"))
        except DetopsError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the command shows it; the traceback stays in the watcher's log
            log.exception("rollback asked on the control socket failed")
            return {"ok": False, "error": f"the watcher's rollback failed: {type(exc).__name__}: {exc}"}
        self.say(f"rollback (asked by a command): v{rollout.version} is live again")
        return {"ok": True, "rollout": asdict(rollout), "notes": deployer.notes}

    # ------------------------------------------------------------------ webhooks
    @property
    def webhook_url(self) -> str:
        return self.cfg.webhook_url or f"http://{self.cfg.webhook_host}:{self.cfg.webhook_port}{WEBHOOK_PATH}"

    def start_receiver(self) -> None:
        """The HTTP receiver of MLflow's deliveries, in a background thread."""
        secret = _secret()
        watcher = self

        class Receiver(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != WEBHOOK_PATH:
                    return self._answer(404, "not found")
                if not signature_ok(secret, self.headers, body):
                    return self._answer(401, "bad or missing signature")
                try:
                    event = json.loads(body)
                    data = event["data"]
                except (ValueError, KeyError, TypeError):
                    return self._answer(400, "not an MLflow webhook payload")
                if (event.get("entity") == "model_version_alias" and data.get("name") == watcher.name
                        and data.get("alias") == registry.CHAMPION):
                    watcher.wake.set()
                return self._answer(200, "ok")

            def _answer(self, status: int, text: str) -> None:
                payload = json.dumps({"status": text}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self.server = ThreadingHTTPServer((self.cfg.webhook_host, self.cfg.webhook_port), Receiver)
        except OSError as exc:
            raise DetopsError(f"deploy watch: cannot listen on {self.cfg.webhook_host}:{self.cfg.webhook_port} "
                              f"(deploy.watch.webhook_port): {exc}") from None
        threading.Thread(target=self.server.serve_forever, name="detops-webhook", daemon=True).start()
        self.say(f"webhook receiver on {self.webhook_url}")

    def stop_receiver(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def register_webhook(self) -> None:
        """Create (or point again) the MLflow registry webhook that calls this watcher."""
        client = registry.client()
        secret = _secret()
        existing = [w for w in client.list_webhooks() if w.name == WEBHOOK_NAME]
        try:
            if existing:
                client.update_webhook(existing[0].webhook_id, url=self.webhook_url, events=EVENTS, secret=secret,
                                      status="ACTIVE")
            else:
                client.create_webhook(WEBHOOK_NAME, self.webhook_url, EVENTS, secret=secret,
                                      description="detops deploy watch: roll out @champion")
        except Exception as exc:  # MLflow raises its own exception types for refused URLs
            raise DetopsError(f"deploy watch: MLflow refused the webhook {self.webhook_url} "
                              f"({' '.join(str(exc).split())[:300]}); polling still works") from None
        self.say(f"MLflow webhook {WEBHOOK_NAME} -> {self.webhook_url}")


def _secret() -> str:
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        raise DetopsError(f"set {SECRET_ENV} (at least 16 characters) to receive MLflow webhooks; "
                          "the same secret signs every delivery")
    return secret
