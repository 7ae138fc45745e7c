"""`detops deploy watch --kubernetes`: on Kubernetes, the live version is one annotation.

In deploy/k8s/ the version a pod serves is its pod-template annotation `detops.io/model-version`
(the API Rollout's init step imports that registry version; the job workers pin it with
DETOPS_WORKER_MODEL_VERSION). Following `@champion` therefore means patching that annotation of the
Rollout (a new revision: Argo Rollouts starts the preview, runs the smoke and error-rate analyses and
waits for promotion) and of the worker Deployment; no nginx, no colours. Argo Rollouts owns
verification, promotion and abort; the watcher only asks for the version.

The API server is spoken to in plain HTTP (JSON merge patches) with the pod's service-account token,
so nothing beyond the standard library is needed; the RBAC in deploy/k8s/base/watcher.yaml grants
`get` and `patch` on those two named objects and nothing else.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import registry
from pipelines.config.deploy import KubernetesConfig
from pipelines.errors import DetopsError

VERSION_ANNOTATION = "detops.io/model-version"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"
# What each call needs from the Role (deploy/k8s/base/watcher.yaml): (HTTP method -> RBAC verb).
RBAC_VERBS = {"GET": "get", "PATCH": "patch"}


class KubernetesError(DetopsError):
    """The API server refused or could not be reached; the message says which object and why."""


@dataclass(frozen=True)
class Target:
    """One object whose pod template carries the version: its API path and a readable name."""

    kind: str
    name: str
    path: str


class KubernetesApi:
    """The few calls the watcher makes, with a bearer token, over HTTPS (or HTTP for a local stand-in)."""

    def __init__(self, base_url: str, token: str, *, ca_file: Path | None = None, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None

    @classmethod
    def in_cluster(cls, sa_dir: Path = SERVICE_ACCOUNT_DIR) -> tuple[KubernetesApi, str]:
        """The API server and namespace of the pod this runs in (its service account's token and CA)."""
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = sa_dir / "token"
        if not host or not token_file.is_file():
            raise KubernetesError("deploy watch --kubernetes: not inside a Kubernetes pod (no KUBERNETES_SERVICE_HOST "
                                  f"or no {token_file}); set deploy.kubernetes.api_url and token_file to run elsewhere")
        namespace = (sa_dir / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", token_file.read_text().strip(), ca_file=sa_dir / "ca.crt"), namespace

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call; the decoded JSON answer. Raises KubernetesError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = MERGE_PATCH
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s, context=self.context) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            try:
                detail = json.loads(detail).get("message", detail)
            except ValueError:
                pass
            hint = (f" (the Role needs verb {RBAC_VERBS.get(method, method)!r} on it)" if exc.code == 403 else "")
            raise KubernetesError(f"{method} {path}: HTTP {exc.code} {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise KubernetesError(f"{method} {path}: cannot reach the API server {self.base_url}: {exc}") from None


def targets(cfg: KubernetesConfig, namespace: str) -> list[Target]:
    """The API Rollout first (what clients see), then the job workers' Deployment (if configured)."""
    rollouts = f"/apis/argoproj.io/v1alpha1/namespaces/{namespace}/rollouts"
    found = [Target("Rollout", cfg.rollout, f"{rollouts}/{cfg.rollout}")]
    if cfg.worker_deployment:
        found.append(Target("Deployment", cfg.worker_deployment,
                            f"/apis/apps/v1/namespaces/{namespace}/deployments/{cfg.worker_deployment}"))
    return found


def version_patch(version: str) -> dict[str, Any]:
    """The merge patch that sets the version: the pod template's annotation (a new revision) and the
    object's own (the smoke analysis reads it from the Rollout)."""
    note = {VERSION_ANNOTATION: str(version)}
    return {"metadata": {"annotations": note}, "spec": {"template": {"metadata": {"annotations": note}}}}


class KubernetesWatcher:
    """Follows `@champion` by patching the version annotation; `check()` is one step."""

    def __init__(self, api: KubernetesApi, namespace: str, cfg: KubernetesConfig, model_name: str,
                 say: Callable[[str], None] = print) -> None:
        self.api = api
        self.targets = targets(cfg, namespace)
        self.name = model_name
        self.say = say

    def live_version(self, target: Target) -> str | None:
        """The version the object's pod template asks for (None: not annotated)."""
        obj = self.api.request("GET", target.path)
        annotations = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
        return annotations.get(VERSION_ANNOTATION)

    def check(self) -> str:
        """Compare `@champion` with each target's version and patch the ones that differ; one line."""
        champion = registry.alias_version(self.name, registry.CHAMPION)
        if champion is None:
            return f"{self.name} has no @champion: nothing to follow"
        verdict = registry.resolve(self.name, version=champion).tags.get("deploy.verdict")
        if verdict == "refused":
            return f"@champion is v{champion}, which a deployment refused before: left alone"
        patched = []
        for target in self.targets:
            if self.live_version(target) != champion:
                self.api.request("PATCH", target.path, version_patch(champion))
                patched.append(f"{target.kind} {target.name}")
        if not patched:
            return f"v{champion} is @champion and asked for by every target"
        return (f"v{champion}: patched {', '.join(patched)}; Argo Rollouts verifies the preview and waits for "
                f"`kubectl argo rollouts promote {self.targets[0].name}`")

    def run(self, poll_interval_s: float, *, once: bool = False) -> None:
        """Check now, then every `poll_interval_s`, until interrupted; errors are reported, not fatal."""
        import time

        while True:
            try:
                self.say(self.check())
            except DetopsError as exc:
                self.say(f"error: {exc}")
            if once:
                return
            time.sleep(poll_interval_s)


def from_config(cfg: KubernetesConfig, model_name: str, say: Callable[[str], None] = print) -> KubernetesWatcher:
    """In the cluster (service-account token) unless deploy.kubernetes.api_url points elsewhere."""
    if cfg.api_url:
        if cfg.token_file is None or not Path(cfg.token_file).is_file():
            raise KubernetesError(f"deploy.kubernetes.token_file: {cfg.token_file} is not a file (a bearer token "
                                  "for deploy.kubernetes.api_url)")
        if not cfg.namespace:
            raise KubernetesError("deploy.kubernetes.namespace: needed with deploy.kubernetes.api_url")
        api = KubernetesApi(cfg.api_url, Path(cfg.token_file).read_text().strip(),
                            ca_file=Path(cfg.ca_file) if cfg.ca_file else None)
        namespace = cfg.namespace
    else:
        api, namespace = KubernetesApi.in_cluster()
        namespace = cfg.namespace or namespace
    return KubernetesWatcher(api, namespace, cfg, model_name, say=say)
