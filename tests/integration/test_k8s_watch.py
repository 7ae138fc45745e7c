"""`detops deploy watch --kubernetes` against a local stand-in for the Kubernetes API server: a real
HTTP server holding the Rollout and worker Deployment rendered from deploy/k8s, that applies JSON
merge patches, checks the bearer token and allows only what the rendered watcher Role grants (RBAC
verb per HTTP method, resource and resourceName), and on which a test sets the status Argo Rollouts
writes when it aborts a revision. The registry is a real MLflow store."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.kubernetes import RBAC_VERBS, STABLE_ANNOTATION, VERSION_ANNOTATION, version_patch
from pipelines import registry
from pipelines.processes import HOST
from tests.integration.test_deploy import champion_problem
from tests.mutants.deploy import leave_refused_champion
from tests.unit.test_k8s import rendered

pytestmark = pytest.mark.integration

NAME = "detops-k8s-watch"
NAMESPACE = "detops"
TOKEN = "stand-in-service-account-token"
PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)"
                  r"/(?P<resource>[^/]+)/(?P<name>[^/]+)$")


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


@dataclass
class StandIn:
    """The API server's object endpoints for the objects it holds, with RBAC from a Role's rules."""

    objects: dict[str, dict[str, Any]]
    rules: list[dict[str, Any]]
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)

    def allowed(self, method: str, group: str, resource: str, name: str) -> bool:
        verb = RBAC_VERBS.get(method)
        return any(verb in r["verbs"] and resource in r["resources"] and group in r["apiGroups"]
                   and name in r.get("resourceNames", [name]) for r in self.rules)

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        self.requests.append({"method": method, "path": path, "auth": headers.get("Authorization"),
                              "content_type": headers.get("Content-Type"), "body": json.loads(body) if body else None})
        if headers.get("Authorization") != f"Bearer {TOKEN}":
            return 401, {"kind": "Status", "message": "Unauthorized"}
        match = PATH.match(path)
        if match is None or match["ns"] != NAMESPACE or path not in self.objects:
            return 404, {"kind": "Status", "message": f"{path} not found"}
        if not self.allowed(method, match["group"], match["resource"], match["name"]):
            return 403, {"kind": "Status", "message": f"{method} {match['resource']}/{match['name']} is forbidden"}
        if method == "PATCH":
            if headers.get("Content-Type") != "application/merge-patch+json":
                return 415, {"kind": "Status", "message": "unsupported patch type"}
            _merge(self.objects[path], json.loads(body))
        return 200, self.objects[path]


@pytest.fixture
def api_server() -> Iterator[StandIn]:
    objects = {o["kind"]: o for o in rendered("production")}
    role = next(o for o in rendered("production") if o["kind"] == "Role" and o["metadata"]["name"] == "detops-watcher")
    stand_in = StandIn(objects={
        f"/apis/argoproj.io/v1alpha1/namespaces/{NAMESPACE}/rollouts/detops-api": json.loads(json.dumps(objects["Rollout"])),
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/detops-worker": json.loads(json.dumps(
            next(o for o in rendered("production") if o["kind"] == "Deployment"
                 and o["metadata"]["name"] == "detops-worker")))}, rules=role["rules"])

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = stand_in.handle(self.command, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815 (http.server's names)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    stand_in.url = f"http://{HOST}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def versions(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two registered versions of NAME (the watcher only reads aliases and tags: no model files)."""
    client = registry.client()
    client.create_registered_model(NAME)
    source = tmp_path_factory.mktemp("k8s-watch-source")
    return [str(client.create_model_version(NAME, source=str(source)).version) for _ in (1, 2)]


def _params(tmp_path: Path, api_url: str, token: str = TOKEN) -> Path:
    root = Path(__file__).resolve().parents[2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    (tmp_path / "token").write_text(token + "\n")
    params["serve"]["model_name"] = NAME
    params["deploy"]["kubernetes"].update(api_url=api_url, token_file=str(tmp_path / "token"), namespace=NAMESPACE)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path / "params.yaml"


def _watch(params: Path, *extra: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    previous = os.environ.get("DETOPS_PARAMS")
    try:
        return CliRunner().invoke(app, ["--params", str(params), "deploy", "watch", "--kubernetes", "--once", *extra])
    finally:  # --params sets DETOPS_PARAMS for the rest of the process
        if previous is None:
            os.environ.pop("DETOPS_PARAMS", None)
        else:
            os.environ["DETOPS_PARAMS"] = previous


def _template_version(obj: dict[str, Any]) -> str:
    return obj["spec"]["template"]["metadata"]["annotations"][VERSION_ANNOTATION]


def test_a_new_champion_patches_the_rollout_and_workers_with_only_the_roles_verbs(
        api_server: StandIn, versions: list[str], tmp_path: Path) -> None:
    v1, v2 = versions
    params = _params(tmp_path, api_url=api_server.url)
    rollout, workers = api_server.objects.values()
    before = json.loads(json.dumps(rollout))
    registry.promote(NAME, v2)

    result = _watch(params)
    assert result.exit_code == 0 and f"v{v2}: patched Rollout detops-api, Deployment detops-worker" in result.output, \
        result.output
    # What it sent: a GET then a merge PATCH per object, with the service account's token, nothing else.
    assert [(r["method"], r["path"].rsplit("/", 2)[-2]) for r in api_server.requests] == [
        ("GET", "rollouts"), ("PATCH", "rollouts"), ("GET", "deployments"), ("PATCH", "deployments")]
    assert {r["auth"] for r in api_server.requests} == {f"Bearer {TOKEN}"}
    patches = [r for r in api_server.requests if r["method"] == "PATCH"]
    assert all(r["content_type"] == "application/merge-patch+json" for r in patches)
    # The Rollout also records the version serving until the new revision completes (what an abort returns to).
    assert [r["body"] for r in patches] == [version_patch(v2, stable=_template_version(before)), version_patch(v2)]
    role_verbs = {v for rule in api_server.rules for v in rule["verbs"]}
    assert {RBAC_VERBS[r["method"]] for r in api_server.requests} == role_verbs == {"get", "patch"}
    # The pod templates now ask for v2 (a new Rollout revision); nothing else of the Rollout changed.
    assert _template_version(rollout) == _template_version(workers) == v2
    assert rollout["metadata"]["annotations"][VERSION_ANNOTATION] == v2
    assert rollout["spec"]["template"]["spec"] == before["spec"]["template"]["spec"]

    api_server.requests.clear()
    result = _watch(params)  # nothing changed: reads only
    assert f"v{v2} is @champion and asked for by every target" in result.output
    assert [r["method"] for r in api_server.requests] == ["GET", "GET"]

    registry.promote(NAME, v1)  # moved back: the previous version is asked for again
    assert f"v{v1}: patched" in _watch(params).output
    assert _template_version(rollout) == v1


def test_refusals_are_one_line_errors(api_server: StandIn, versions: list[str], tmp_path: Path) -> None:
    registry.promote(NAME, versions[1])
    # A Role without `patch`: the API server's 403 names the verb the Role lacks.
    api_server.rules = [{**rule, "verbs": ["get"]} for rule in api_server.rules]
    result = _watch(_params(tmp_path, api_url=api_server.url))
    assert "HTTP 403" in result.output and "needs verb 'patch'" in result.output, result.output
    # A wrong token.
    result = _watch(_params(tmp_path, api_url=api_server.url, token="not-the-token"))
    assert "HTTP 401" in result.output, result.output
    # Webhooks are the nginx mode's: refused with one line.
    result = _watch(_params(tmp_path, api_url=api_server.url), "--webhook")
    assert result.exit_code == 1 and "--webhook is for the nginx mode" in result.output


# An aborted revision: what Argo Rollouts writes in the Rollout's status when an analysis fails (the
# active Service stays on the stable ReplicaSet; the status stays so until the template changes).
ABORTED = {"abort": True, "phase": "Degraded", "stableRS": "5d8f7b9c4", "currentPodHash": "7c6b5d4f8",
           "message": 'RolloutAborted: Rollout aborted update to revision 2: Metric "smoke" assessed Failed due '
                      "to failed (1) > failureLimit (0)"}
HEALTHY = {"phase": "Healthy", "stableRS": "5d8f7b9c4", "currentPodHash": "5d8f7b9c4"}


def _aborted_revision(api_server: StandIn, params: Path) -> tuple[str, str]:
    """A fresh version made `@champion` and patched in, then aborted by Argo Rollouts and checked once by
    the watcher; (the stable version, the aborted one)."""
    rollout = api_server.objects[next(iter(api_server.objects))]
    stable = _template_version(rollout)
    rollout["status"] = HEALTHY  # the manifest's revision completed
    bad = str(registry.client().create_model_version(NAME, source=str(params.parent)).version)
    registry.promote(NAME, bad)  # the alias really moves to it
    assert f"v{bad}: patched" in _watch(params).output
    assert rollout["metadata"]["annotations"][STABLE_ANNOTATION] == stable
    rollout["status"] = ABORTED
    _watch(params)
    return stable, bad


def test_an_aborted_revision_is_refused_and_champion_goes_back_to_the_stable_version(
        api_server: StandIn, versions: list[str], tmp_path: Path) -> None:
    params = _params(tmp_path, api_url=api_server.url)
    rollout, workers = api_server.objects.values()
    stable, bad = _aborted_revision(api_server, params)
    assert champion_problem(NAME, bad, stable) == ""
    assert "Metric \"smoke\" assessed Failed" in registry.resolve(NAME, version=bad).tags["deploy.reason"]
    assert _template_version(rollout) == _template_version(workers) == stable  # both asked back
    rollout["status"] = HEALTHY  # the template is the stable one again: Argo clears the abort

    # Set again in the MLflow UI: the alias goes back at the next check, and nothing is patched (no retry).
    registry.promote(NAME, bad)
    api_server.requests.clear()
    result = _watch(params)
    assert "refused before" in result.output and f"back to the live v{stable}" in result.output, result.output
    assert champion_problem(NAME, bad, stable) == ""
    assert [r["method"] for r in api_server.requests] == ["GET", "GET"]


def test_a_policy_that_leaves_the_alias_on_an_aborted_version_fails_the_alias_check(
        api_server: StandIn, versions: list[str], tmp_path: Path) -> None:
    params = _params(tmp_path, api_url=api_server.url)
    with leave_refused_champion():
        stable, bad = _aborted_revision(api_server, params)
    problem = champion_problem(NAME, bad, stable)
    registry.promote(NAME, stable)
    assert problem.startswith(f"@champion is v{bad}"), problem
