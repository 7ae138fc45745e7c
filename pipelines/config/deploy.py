"""Section of the blue/green deployment (`detops deploy`): the front door, the colours, verification."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from pipelines.config.base import Section


class ShadowConfig(Section):
    """Mirror live traffic to the idle colour before the switch (its answers are compared, never sent)."""

    enabled: bool = True
    max_requests: int = Field(200, ge=1)  # stop mirroring after this many live requests ...
    max_seconds: float = Field(30.0, gt=0)  # ... or this long, whichever comes first


class CanaryConfig(Section):
    """Send a share of live traffic to the idle colour before the switch (clients get its answers)."""

    enabled: bool = False
    weight_percent: int = Field(10, ge=1, le=50)
    max_requests: int = Field(200, ge=1)
    max_seconds: float = Field(30.0, gt=0)


class VerificationGates(Section):
    """What the idle colour must show during shadow or canary traffic to be switched to."""

    max_error_rate: float = Field(0.01, ge=0, le=1)  # share of 5xx or failed requests on the idle colour
    max_p95_ratio: float = Field(2.0, gt=0)  # idle p95 latency / live p95 latency
    min_agreement: float = Field(0.95, ge=0, le=1)  # share of images whose detections agree (class, IoU >= 0.5)
    min_requests: int = Field(20, ge=1)  # fewer compared requests: the traffic checks are not conclusive


class WatchConfig(Section):
    """`detops deploy watch`: follow `serve.model_name@champion`."""

    poll_interval_s: float = Field(10.0, gt=0)  # registry polling, the backstop of the webhooks
    # While the previous colour is warm after a switch, the live version's traffic is judged this often
    # (deploy.gates): a version that breaks is switched back within about this long.
    live_check_s: float = Field(1.0, gt=0)
    webhook_host: str = "127.0.0.1"  # where the watcher receives MLflow's registry webhooks
    webhook_port: int = Field(8788, ge=1, le=65535)
    webhook_url: str | None = None  # the URL MLflow calls (default http://<webhook_host>:<webhook_port>/mlflow)


class KubernetesConfig(Section):
    """`detops deploy watch --kubernetes`: the objects whose version annotation it patches
    (deploy/kubernetes.py, deploy/k8s/). In a pod, the API server, token and namespace are the pod's own."""

    rollout: str = "detops-api"  # the API's Argo Rollout
    worker_deployment: str | None = "detops-worker"  # the job workers' Deployment (null: none)
    namespace: str | None = None  # default: the pod's namespace
    api_url: str | None = None  # outside a pod: the API server (with token_file, optional ca_file)
    token_file: Path | None = None
    ca_file: Path | None = None


class DeployConfig(Section):
    """nginx in front of two `bentoml serve` colours, each serving one pinned registry version."""

    section: ClassVar[str] = "deploy"

    host: str = "127.0.0.1"  # the front door's interface
    port: int = Field(8080, ge=1, le=65535)  # the front door: the only address clients use
    blue_port: int = Field(3101, ge=1, le=65535)
    green_port: int = Field(3102, ge=1, le=65535)
    state_dir: Path = Path("deploy_state")  # state database, nginx config and logs, colour logs
    reports: Path = Path("reports/deploy")  # one verification report per rollout
    workers: int | None = Field(None, ge=1)  # BentoML workers per colour (None: serve.workers)
    job_workers: int = Field(1, ge=0)  # `detops worker` pools that up starts and down stops (0: none)
    ready_timeout_s: float = Field(180.0, gt=0)
    keep_previous_s: float = Field(300.0, ge=0)  # the old colour stays warm this long for an instant rollback
    drain_s: float = Field(10.0, ge=0)  # in-flight requests get this long before a colour is stopped
    smoke_iou: float = Field(0.99, gt=0, le=1)  # a served box matches its evaluation record at this IoU ...
    smoke_conf_tolerance: float = Field(1e-4, ge=0)  # ... and this confidence difference
    shadow: ShadowConfig = ShadowConfig()
    canary: CanaryConfig = CanaryConfig()
    gates: VerificationGates = VerificationGates()
    watch: WatchConfig = WatchConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _distinct_ports(self) -> DeployConfig:
        ports = [self.port, self.blue_port, self.green_port]
        if len(set(ports)) != 3:
            raise ValueError(f"port, blue_port and green_port must differ (got {ports})")
        return self
