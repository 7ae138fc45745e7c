"""`detops deploy watch --kubernetes`: on Kubernetes, the live version is one annotation.

In deploy/k8s/ the version a pod serves is its pod-template annotation `detops.io/model-version`
(the API Rollout's init step imports that registry version; the job workers pin it with
DETOPS_WORKER_MODEL_VERSION). Following `@champion` therefore means patching that annotation of the
Rollout (a new revision: Argo Rollouts starts the preview, runs the smoke and error-rate analyses and
waits for promotion) and of the worker Deployment; no nginx, no colours. Argo Rollouts owns
verification, promotion and abort; the watcher asks for the version, and reads the Rollout's status:
when Argo Rollouts aborted a revision (a failed analysis), the version it asked for is refused like a
refused local rollout (deploy/policy.py): tagged why, `@champion` back to the stable version, both
objects patched back to it. The stable version is the one the Rollout asked for before the watcher's
last patch, recorded on the Rollout (`detops.io/stable-version`) when that revision had completed.

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

from deploy import policy
from pipelines import registry
from pipelines.config.deploy import KubernetesConfig
from pipelines.errors import DetopsError

VERSION_ANNOTATION = "detops.io/model-version"
STABLE_ANNOTATION = "detops.io/stable-version"  # on the Rollout: the version serving before the last patch
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


def version_patch(version: str, stable: str | None = None) -> dict[str, Any]:
    """The merge patch that sets the version: the pod template's annotation (a new revision) and the
    object's own (the smoke analysis reads it from the Rollout); on the Rollout, also `stable`, the
    version serving until the new revision completes (what an abort returns to)."""
    note = {VERSION_ANNOTATION: str(version)}
    own = note if stable is None else {**note, STABLE_ANNOTATION: str(stable)}
    return {"metadata": {"annotations": own}, "spec": {"template": {"metadata": {"annotations": note}}}}


def rollout_versions(obj: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(the version a Rollout asks for, the version it serves, whether Argo Rollouts aborted the revision).
    It serves the asked version once the revision completed (its stable ReplicaSet is the current one,
    no abort), else the stable version recorded with the watcher's last patch."""
    status = obj.get("status") or {}
    aborted = bool(status.get("abort"))
    asked = _template_version(obj)
    completed = not aborted and status.get("stableRS") == status.get("currentPodHash")
    stable = (obj.get("metadata", {}).get("annotations") or {}).get(STABLE_ANNOTATION)
    return asked, asked if completed else stable, aborted


def _template_version(obj: dict[str, Any]) -> str | None:
    annotations = obj.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
    return annotations.get(VERSION_ANNOTATION)


class KubernetesWatcher:
    """Follows `@champion` by patching the version annotation; `check()` is one step."""

    def __init__(self, api: KubernetesApi, namespace: str, cfg: KubernetesConfig, model_name: str,
                 say: Callable[[str], None] = print) -> None:
        self.api = api
        self.targets = targets(cfg, namespace)
        self.name = model_name
        self.say = say

    def check(self) -> str:
        """Refuse a revision Argo Rollouts aborted, keep `@champion` off refused versions, then patch
        the targets whose version differs from it; what happened, one line."""
        champion = registry.alias_version(self.name, registry.CHAMPION)
        if champion is None:
            return f"{self.name} has no @champion: nothing to follow"
        rollout = self.api.request("GET", self.targets[0].path)
        asked, live, aborted = rollout_versions(rollout)
        notes = []
        if aborted and asked not in (None, live) and policy.refused_reason(self.name, asked) is None:
            message = (rollout.get("status") or {}).get("message") or "no message"
            policy.refuse(self.name, asked, live, f"Argo Rollouts aborted its revision: {message}")
            notes.append(f"Argo Rollouts aborted v{asked} ({message}): refused, stable v{live}")
            champion = registry.alias_version(self.name, registry.CHAMPION) or champion
        refused = policy.keep_off_refused(self.name, champion, live)
        if refused is not None:
            notes.append(refused)
            if live is None:
                return "; ".join(notes)
            champion = live
        patched = []
        for target in self.targets:
            current = asked if target is self.targets[0] else _template_version(self.api.request("GET", target.path))
            if current != champion:
                stable = live if target.kind == "Rollout" else None
                self.api.request("PATCH", target.path, version_patch(champion, stable))
                patched.append(f"{target.kind} {target.name}")
        if not patched:
            notes.append(f"v{champion} is @champion and asked for by every target")
        elif champion == live:
            notes.append(f"v{champion}: patched {', '.join(patched)} back to the version that serves")
        else:
            notes.append(f"v{champion}: patched {', '.join(patched)}; Argo Rollouts verifies the preview and waits "
                         f"for `kubectl argo rollouts promote {self.targets[0].name}`")
        return "; ".join(notes)

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
