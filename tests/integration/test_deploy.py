"""Blue/green deployment with real components: nginx (Debian's), `bentoml serve` colours, a real MLflow
registry (SQLite, and a real `mlflow server` for its webhooks).

Registry versions of one tiny trained model: v1 (imgsz 64) and v2 (the same weights exported at 96: a
real second version; the tiny model's detections barely depend on it), v3 with a corrupt ONNX file
(cannot start), two of v1's weights whose recorded smoke detections were moved from what is served by
the smoke thresholds ± ε: v4 every detection just inside both (passes), v5 one just outside the IoU
(refused); v6, v1 with every bias shifted and its own smoke record: it passes the smoke check and
detects otherwise on every image (the shadow window's agreement refuses it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from pipelines import processes, registry
from pipelines.config.deploy import DeployConfig
from pipelines.config.model import EvaluateConfig, Gates, RegisterConfig
from pipelines.config.serving import ServeConfig
from pipelines.environment import PROJECT_ROOT
from pipelines.types import Box
from serving.client import auth_headers
from tests.fixtures import images
from tests.integration.conftest import binary_request, bytes_tensor, detect_rows, run_oip_clients
from tests.mutants.deploy import leave_refused_champion
from tests.serving_process import TEST_PEPPER, mint_key
from tests.unit.test_deploy import EPS_CONF, EPS_IOU, SMOKE_CONF, SMOKE_IOU, box_at_iou

pytestmark = pytest.mark.integration

NAME = "deploy-test"
PERMISSIVE = Gates(min_map50_95=0.0, max_dece_calibrated=1.0, max_latency_ms=10_000.0, max_map_regression=1.0,
                   bootstrap_samples=10)
EVALUATE = EvaluateConfig(latency_batch_sizes=[1], latency_repeats=2, smoke_images=4, experiment="tests")


def _require_nginx() -> None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs it (apt-get install -y nginx)")
        pytest.skip("nginx is not installed (apt-get install -y nginx)")


def _model_variant(source: Path, dest: Path, imgsz: int | None) -> Path:
    """A copy of a trained model folder, its ONNX re-exported at `imgsz` (YOLO is fully convolutional).
    The tiny model's default confidence threshold is lowered so that it serves detections at all: the
    smoke check then compares real boxes."""
    from serving.runtime import CARD_FILE, MODEL_FILE, WEIGHTS_FILE, ModelCard, Thresholds

    folder = Path(shutil.copytree(source, dest))
    card = ModelCard.load(folder / CARD_FILE)
    card.model_copy(update={"thresholds": Thresholds(conf=0.001)}).save(folder / CARD_FILE)
    if imgsz is not None:
        from ultralytics import YOLO

        from training.train import export_onnx

        export_onnx(YOLO(str(folder / WEIGHTS_FILE)), imgsz, folder / MODEL_FILE)
        ModelCard.load(folder / CARD_FILE).model_copy(update={"imgsz": imgsz}).save(folder / CARD_FILE)
    return folder


def _perturb_weights(onnx_path: Path) -> None:
    """Shift every bias of the network: the model still runs, its detections are not v1's."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    for i, tensor in enumerate(model.graph.initializer):
        values = numpy_helper.to_array(tensor)
        if values.ndim == 1 and values.dtype == np.float32 and values.size > 8:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(values + np.float32(0.3), tensor.name))
    onnx.save(model, str(onnx_path))


def _own_smoke_record(model_dir: Path, dataset: Path, evaluation: Path, dest: Path) -> Path:
    """A copy of an evaluation folder with `model_dir`'s own smoke record, written as evaluate writes it."""
    from evaluation.evaluate import write_smoke_sample
    from pipelines.types import YoloDataset
    from serving.runtime import ModelRuntime

    folder = Path(shutil.copytree(evaluation, dest))
    write_smoke_sample(ModelRuntime.load(model_dir), YoloDataset.load(dataset).images("test"), EVALUATE.smoke_images,
                       folder / registry.SMOKE_DIR)
    return folder


def _smoke_record_moved(evaluation: Path, dest: Path, *, one_outside: bool) -> Path:
    """A copy of an evaluation folder whose recorded smoke detections are moved from what the model
    serves just inside both smoke thresholds (box at IoU 0.99 + ε, confidence off by 1e-4 - ε); with
    `one_outside`, the first one's box just outside instead (IoU 0.99 - ε)."""
    folder = Path(shutil.copytree(evaluation, dest))
    file = folder / registry.SMOKE_DIR / registry.SMOKE_FILE
    reference = json.loads(file.read_text())
    recorded = [d for image in reference["images"] for d in image["detections"]]
    assert recorded, "the smoke sample has no detection to move"
    for i, d in enumerate(recorded):
        box = box_at_iou(Box(*d["box"]), SMOKE_IOU + (-EPS_IOU if one_outside and i == 0 else EPS_IOU))
        d["box"], d["confidence"] = [box.x1, box.y1, box.x2, box.y2], d["confidence"] + SMOKE_CONF - EPS_CONF
    file.write_text(json.dumps(reference))
    return folder


def _register(model_dir: Path, dataset: Path, out: Path) -> str:
    from evaluation.evaluate import evaluate

    evaluate(EVALUATE.model_copy(update={"model_dir": model_dir, "dataset": dataset, "out": out}))
    return _register_evaluated(model_dir, dataset, out)


def _register_evaluated(model_dir: Path, dataset: Path, out: Path, gates: Gates = PERMISSIVE) -> str:
    from evaluation.register import register

    cfg = RegisterConfig(model_name=NAME, model_dir=model_dir, evaluation=out, dataset=dataset, gates=gates)
    return str(register(cfg, EVALUATE).version)


@pytest.fixture(scope="module")
def versions(trained_model_dir: Path, yolo_dataset: Path, mlflow_uri: str,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """v1 and v2 (two real versions), v3 (corrupt ONNX), v4 and v5 (v1 with its smoke record moved just
    inside, just outside the thresholds), v6 (other weights, its own smoke record)."""
    from serving.runtime import MODEL_FILE

    root = tmp_path_factory.mktemp("versions")
    good = _model_variant(trained_model_dir, root / "a", None)
    other = _model_variant(trained_model_dir, root / "b", 96)
    found = {"a": _register(good, yolo_dataset, root / "eval-a"), "b": _register(other, yolo_dataset, root / "eval-b")}
    corrupt = _model_variant(good, root / "c", None)
    (corrupt / MODEL_FILE).write_bytes(b"not an onnx model" * 100)
    never_promoted = PERMISSIVE.model_copy(update={"min_map50_95": 1.0})
    found["corrupt"] = _register_evaluated(corrupt, yolo_dataset, root / "eval-a", never_promoted)
    for key, outside in (("inside", False), ("outside", True)):
        moved = _smoke_record_moved(root / "eval-a", root / f"eval-{key}", one_outside=outside)
        found[key] = _register_evaluated(good, yolo_dataset, moved, never_promoted)
    tampered = _model_variant(good, root / "d", None)
    _perturb_weights(tampered / MODEL_FILE)
    own = _own_smoke_record(tampered, yolo_dataset, root / "eval-a", root / "eval-d")
    found["differs"] = _register_evaluated(tampered, yolo_dataset, own, never_promoted)
    registry.promote(NAME, found["a"])
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, versions: dict[str, str]) -> Iterator[Path]:
    """A params.yaml for the deployment (free ports, small verification windows, state in a scratch
    folder), in effect through DETOPS_PARAMS for this module; the stack is taken down at the end."""
    _require_nginx()
    root = tmp_path_factory.mktemp("deploy")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    ports = set()
    while len(ports) < 3:
        ports.add(processes.free_port())
    port, blue, green = sorted(ports)
    params["serve"].update(model_name=NAME, workers=1, prediction_log=str(root / "predictions"), cache_entries=0)
    params["jobs"].update(data_dir=str(root / "jobs"), worker_concurrency=1, model_check_interval_s=1.0)
    params["gateway"].update(requests_per_s=100_000, images_per_s=100_000)  # the load below is one key's
    params["deploy"].update(port=port, blue_port=blue, green_port=green, state_dir=str(root / "state"),
                            reports=str(root / "reports"), keep_previous_s=120.0, drain_s=2.0,
                            shadow={"enabled": True, "max_requests": 40, "max_seconds": 20.0},
                            gates={"max_error_rate": 0.0, "max_p95_ratio": 20.0, "min_agreement": 0.0,
                                   "min_requests": 5})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    previous = os.environ.get("DETOPS_PARAMS")
    os.environ["DETOPS_PARAMS"] = str(root / "params.yaml")
    # Authentication on (the default): both colours, the workers and every stack of this module share one
    # keys database and pepper; the deployment's smoke check and this module's clients send DETOPS_API_KEY.
    access = {"DETOPS_KEY_PEPPER": TEST_PEPPER, "DETOPS_DATABASE_URL": f"sqlite:///{root / 'jobs' / 'jobs.db'}"}
    os.environ.update(access)
    os.environ["DETOPS_API_KEY"] = mint_key(access, tenant="deploy-tests")
    try:
        yield root
    finally:
        assert "stopped" in detops("deploy", "down").output
        for name in (*access, "DETOPS_API_KEY"):
            os.environ.pop(name, None)
        if previous is None:
            os.environ.pop("DETOPS_PARAMS")
        else:
            os.environ["DETOPS_PARAMS"] = previous


def detops(*args: str):  # noqa: ANN201
    """`detops ARGS` through the CLI; exit code 0 expected."""
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def champion_problem(name: str, refused: str, live: str) -> str:
    """The alias check of a refusal: '' when `@champion` names the live version and the refused version
    is tagged so with a reason; else what is wrong."""
    champion = registry.alias_version(name, registry.CHAMPION)
    if champion != live:
        return f"@champion is v{champion}, not the live v{live}"
    tags = registry.resolve(name, version=refused).tags
    if tags.get("deploy.verdict") != "refused" or not tags.get("deploy.reason"):
        return f"v{refused} is not tagged refused with a reason: {tags}"
    return ""


def _production_gates(project: Path) -> Path:
    """This module's params with the repository's own `deploy.gates` (min_agreement 0.95, min_requests
    20, max_error_rate 0.01), but for the p95 ratio: latency on a shared 2-core machine is noise, and
    agreement is what the cases using this file judge."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    production = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["deploy"]["gates"]
    params["deploy"]["gates"] = {**production, "max_p95_ratio": params["deploy"]["gates"]["max_p95_ratio"]}
    path = project / "params-production-gates.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _detops_with(params: Path, *args: str):  # noqa: ANN202
    """`detops --params PARAMS ARGS` through the CLI, any exit code; then this module's params again
    (--params sets DETOPS_PARAMS for the rest of the process)."""
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    try:
        return CliRunner().invoke(app, ["--params", str(params), *args])
    finally:
        os.environ["DETOPS_PARAMS"] = str(params.parent / "params.yaml")


def _deployer():  # noqa: ANN202
    from deploy.rollout import Deployer
    from pipelines.config.base import load_section

    return Deployer(load_section(DeployConfig), load_section(ServeConfig))


def _front_door() -> str:
    return _deployer().front_door


class Clients:
    """Steady traffic on keep-alive connections, no retries: every answer's status and version. The
    last `v2` clients send each image as an Open Inference Protocol infer request (binary tensor data,
    as tritonclient sends it) instead of /detect; `uploads[i]` are client i's images."""

    def __init__(self, url: str, n: int = 3, v2: int = 0) -> None:
        self.url, self.stop, self.v2_from = url, threading.Event(), n - v2
        self.seen: list[list[tuple[int, str | None]]] = [[] for _ in range(n)]
        self.uploads = [[images.jpeg(64 + 7 * k, 48 + 5 * k, seed=1000 * i + k) for k in range(12)] for i in range(n)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _request(self, index: int, data: bytes) -> dict[str, object]:
        """httpx.post arguments sending `data` the way client `index` sends images."""
        if index < self.v2_from:
            return {"url": f"{self.url}/detect", "files": {"image": ("x.jpg", data)}}
        body, headers = binary_request({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                    "parameters": {"binary_data_size": len(data) + 4}}],
                                        "parameters": {"binary_data_output": True}}, bytes_tensor([data]))
        return {"url": f"{self.url}/v2/models/{NAME}/infer", "content": body, "headers": headers}

    def _run(self, index: int) -> None:
        requests = [self._request(index, data) for data in self.uploads[index]]
        with httpx.Client(timeout=60, transport=httpx.HTTPTransport(retries=0), headers=auth_headers()) as client:
            k = 0
            while not self.stop.is_set():
                try:
                    response = client.post(**requests[k % 12])  # type: ignore[arg-type]
                    self.seen[index].append((response.status_code, response.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.seen[index].append((-1, type(exc).__name__))
                k += 1

    @property
    def total(self) -> int:
        return sum(len(s) for s in self.seen)

    def wait_for(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.total < n and time.monotonic() < deadline:
            time.sleep(0.1)


def _job_version(url: str, timeout_s: float = 120) -> str:
    """Submit a one-image job through the front door and return the version its result names."""
    accepted = httpx.post(f"{url}/jobs", files=[("images", ("j.jpg", images.jpeg(80, 64, seed=4)))], timeout=60,
                          headers=auth_headers())
    assert accepted.status_code == 202, accepted.text
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/jobs/{accepted.json()['job_id']}", timeout=30, headers=auth_headers()).json()
        if job["status"] == "succeeded":
            return job["results"][0]["model"]["version"]
        time.sleep(0.5)
    raise AssertionError(f"job not done in {timeout_s} s: {job}")


def _runs(seen: list[tuple[int, str | None]]) -> list[str | None]:
    """The versions one client saw, consecutive repeats collapsed."""
    runs: list[str | None] = []
    for _, version in seen:
        if not runs or runs[-1] != version:
            runs.append(version)
    return runs


def test_rollout_and_rollback_under_load_drop_nothing(project: Path, versions: dict[str, str], clients_python: Path,
                                                      tmp_path: Path) -> None:
    v1, v2 = versions["a"], versions["b"]
    up = detops("deploy", "up")
    assert f"live: v{v1} on blue" in up.output
    with Clients(_front_door(), v2=1) as clients:  # two /detect clients, one Open Inference Protocol client
        clients.wait_for(60)
        assert f"v{v2} is live on green" in detops("deploy", "rollout", v2, "--detach").output
        rollout = _deployer().state.rollouts(1)[0]
        clients.wait_for(clients.total + 100)
        started = time.monotonic()
        assert f"v{v1} is live again on blue (switch" in detops("deploy", "rollback", "--reason", "test: back").output
        rollback_s = time.monotonic() - started
        back = _deployer().state.rollouts(1)[0]
        clients.wait_for(clients.total + 100)
    failures = [s for per in clients.seen for s in per if s[0] != 200]
    assert clients.total >= 300 and not failures, failures[:5]
    for per in clients.seen:  # each client: v1 ... v2 ... v1, never back and forth
        runs = _runs(per)
        assert None not in runs and runs in ([v1, v2, v1], [v1, v2], [v2, v1], [v1]), runs

    assert rollout.verdict == "passed" and rollout.figures["smoke"]["mismatches"] == []
    assert rollout.figures["smoke"]["detections"] > 0  # the check compared real boxes
    shadow = rollout.figures["shadow"]
    assert shadow["idle"]["requests"] >= 5 and shadow["idle"]["errors"] == 0
    assert shadow["agreement"]["images"] >= 5 and shadow["agreement"]["agreement"] is not None
    assert back.figures["warm"] is True and back.figures["switch_s"] < 1.0 and rollback_s < 10
    report = json.loads((project / "reports" / f"rollout-{rollout.id}.json").read_text())
    assert report["verdict"] == "passed" and {c["name"] for c in report["checks"]} >= {"smoke", "agreement"}
    assert (project / "reports" / f"rollout-{rollout.id}.md").read_text().startswith(f"# Rollout {rollout.id}")

    # The registry follows: champion back on v1, v2 recorded as rolled back; shadow traffic stayed out of
    # what drift and push read.
    assert registry.alias_version(NAME, "champion") == v1
    assert registry.resolve(NAME, version=v2).tags["deploy.verdict"] == "rolled_back"
    assert "deployed_at" in registry.resolve(NAME, version=v1).tags
    from monitoring.store import open_store

    store = open_store(project / "predictions")
    assert set(store.read(traffic="shadow")["model_version"]) == {v2}
    assert set(store.read()["traffic"]) == {"live"} and set(store.read(traffic="smoke")["model_version"]) <= {v1, v2}
    status = _deployer().status()
    assert status["live"]["version"] == v1 and status["previous"] == {"version": v2, "warm": True,
                                                                       "retire_at": status["previous"]["retire_at"]}

    # The Open Inference Protocol client's binary requests were mirrored in the shadow window like /detect:
    # the idle colour answered them, the window counted them as model requests, and their images' shadow
    # answers were logged beside the live ones, which is what the agreement joins on.
    from deploy.nginx import ACCESS_LOG
    from deploy.verify import read_access_log, traffic

    mirrored = [e for e in read_access_log(_deployer().prefix / ACCESS_LOG, 0)
                if e["traffic"] == "shadow" and e["uri"].startswith("/v2/")]
    idle_port = getattr(_deployer().cfg, f"{rollout.colour}_port")
    assert mirrored and {e["upstream_status"] for e in mirrored} == {"200"}, mirrored[:3]
    assert traffic(mirrored, idle_port, ("shadow",))["requests"] == len(mirrored)
    v2_images = {hashlib.sha256(data).hexdigest() for data in clients.uploads[-1]}
    shadowed = set(store.read(traffic="shadow", model_version=v2)["image_sha256"]) & v2_images
    assert shadowed and shadowed <= set(store.read(traffic="live", model_version=v1)["image_sha256"])

    # tritonclient (binary and JSON tensors) through the front door with a key: /detect's numbers.
    data = images.jpeg(160, 120, seed=7)
    (tmp_path / "a.jpg").write_bytes(data)
    key = auth_headers()["Authorization"]
    triton = run_oip_clients(clients_python, _front_door(), NAME, v1, [tmp_path / "a.jpg"], "--only", "triton",
                             "--conf", "0.001", "--header", f"Authorization:{key}")["triton"]
    expected = [detect_rows(_front_door(), data, 0.001, auth_headers())]
    assert expected[0] and triton["binary"] == expected and triton["json"] == expected
    assert triton["live"] and triton["ready"] and triton["model_ready"] and triton["version_ready"]
    assert triton["metadata"]["versions"] == [v1] and triton["unknown_model"]["status"] == "404"


def test_a_refused_version_never_stays_champion(project: Path, versions: dict[str, str]) -> None:
    from deploy.watch import Watcher

    live, corrupt = _deployer().status()["live"]["version"], versions["corrupt"]
    # Each bad version is made @champion first (the alias really moves), as the gates or the UI would.
    # By the watcher: a version that cannot start.
    registry.promote(NAME, corrupt)
    said = Watcher(_deployer(), say=lambda _: None).check()
    assert "cannot load ONNX model" in said, said
    assert champion_problem(NAME, corrupt, live) == ""
    # By `detops deploy rollout`: the smoke thresholds ± ε, one recorded box just outside the IoU.
    registry.promote(NAME, versions["outside"])
    refused = _detops_with(project / "params.yaml", "deploy", "rollout", versions["outside"])
    assert refused.exit_code == 4 and "smoke check failed" in refused.output, refused.output
    assert f"box IoU {SMOKE_IOU - EPS_IOU:.3f}" in refused.output, refused.output
    assert champion_problem(NAME, versions["outside"], live) == ""
    answer = httpx.post(f"{_front_door()}/detect", files={"image": ("x.jpg", images.jpeg(90, 70, seed=5))},
                        headers=auth_headers())
    assert answer.status_code == 200 and answer.headers["x-model-version"] == live
    assert [r["verdict"] for r in _deployer().status()["rollouts"][:2]] == ["refused", "refused"]

    # The shadow window at the production gates (min_agreement 0.95): another model, which serves its own
    # smoke record, is refused on live traffic; just inside every smoke threshold passes, and the same
    # weights agree on every live image. Then back to the live version (warm: a switch).
    gated = _production_gates(project)
    registry.promote(NAME, versions["differs"])
    with Clients(_front_door()):
        refused = _detops_with(gated, "deploy", "rollout", versions["differs"])
        assert refused.exit_code == 4 and "agreement check failed" in refused.output, refused.output
        assert champion_problem(NAME, versions["differs"], live) == ""
        passed = _detops_with(gated, "deploy", "rollout", versions["inside"], "--detach")
    assert passed.exit_code == 0 and f"v{versions['inside']} is live" in passed.output, passed.output
    report = project / "reports" / f"rollout-{_deployer().state.rollouts(1)[0].id}.json"
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["smoke"]["passed"] and checks.get("agreement", {}).get("value", 0) >= 0.95, checks
    detops("deploy", "rollback", "--reason", "test: back to the live version")

    # Set again in the MLflow UI: the watcher moves the alias back at its next check, and does not retry.
    registry.promote(NAME, corrupt)
    rollouts = len(_deployer().state.rollouts(100))
    said = Watcher(_deployer(), say=lambda _: None).check()
    assert "refused before" in said and f"back to the live v{live}, not retried" in said, said
    assert champion_problem(NAME, corrupt, live) == ""
    assert len(_deployer().state.rollouts(100)) == rollouts


def test_a_watcher_that_leaves_a_refused_champion_fails_the_alias_check(project: Path,
                                                                         versions: dict[str, str]) -> None:
    from deploy.watch import Watcher

    live, corrupt = _deployer().status()["live"]["version"], versions["corrupt"]
    with leave_refused_champion():
        registry.promote(NAME, corrupt)
        Watcher(_deployer(), say=lambda _: None).check()
    problem = champion_problem(NAME, corrupt, live)
    registry.move_champion_back(NAME, live, reason="test: the mutant's alias undone")
    assert problem.startswith(f"@champion is v{corrupt}"), problem


def test_cli_status_and_watcher_following_champion(project: Path, versions: dict[str, str]) -> None:
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    v1, v2 = versions["a"], versions["b"]
    # This rollout verifies with a canary window instead of a shadow one, under live traffic.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["deploy"].update(shadow={"enabled": False}, canary={"enabled": True, "weight_percent": 30,
                                                              "max_requests": 15, "max_seconds": 20.0})
    canary_params = project / "params-canary.yaml"
    canary_params.write_text(yaml.safe_dump(params, sort_keys=False))
    registry.promote(NAME, v2)  # as the gates or a person in the MLflow UI would
    with Clients(_front_door(), n=2) as clients:
        watched = CliRunner().invoke(app, ["--params", str(canary_params), "deploy", "watch", "--once", "--no-webhook"])
    os.environ["DETOPS_PARAMS"] = str(project / "params.yaml")  # --params set it for the rest of the process
    # The refused rollouts took the idle colour: v2 is started and verified again.
    assert watched.exit_code == 0 and f"v{v2} rolled out" in watched.output, watched.output
    canary = _deployer().state.rollouts(1)[0].figures["canary"]
    assert canary["idle"]["requests"] >= 1 and canary["idle"]["errors"] == 0
    served_by_canary = [v for per in clients.seen for code, v in per if code == 200]
    assert {v1, v2} <= set(served_by_canary)  # clients got both versions during the window
    from monitoring.store import open_store

    assert set(open_store(project / "predictions").read(traffic="canary")["model_version"]) == {v2}
    # The job worker `deploy up` started follows the deployment: a new job runs on the live version.
    assert _job_version(_front_door()) == v2
    registry.promote(NAME, v1)  # moved back, as a person in the UI would: instant while v1 is warm
    watched = CliRunner().invoke(app, ["deploy", "watch", "--once", "--no-webhook"])
    assert f"v{v1} is live: switched to its warm colour" in watched.output, watched.output
    shown = CliRunner().invoke(app, ["deploy", "status", "--json"])
    body = json.loads(shown.output)
    assert body["live"]["version"] == v1 and body["nginx"]["running"] and not body["problems"]
    assert [r["trigger"] for r in body["rollouts"][:2]] == ["watcher", "watcher"]
    refused = CliRunner().invoke(app, ["deploy", "rollout", "999"])
    assert refused.exit_code == 1 and "no version 999" in refused.output
    # The smoke check on its own (on Kubernetes, the pre-promotion analysis Job), through the front door:
    # the live version passes; a version it does not serve is named, before anything is sent.
    smoked = CliRunner().invoke(app, ["deploy", "smoke", "--url", _front_door(), "--version", v1])
    assert smoked.exit_code == 0 and f"serves v{v1}" in smoked.output, smoked.output
    wrong = CliRunner().invoke(app, ["deploy", "smoke", "--url", _front_door(), "--version", v2])
    assert wrong.exit_code == 1 and f"serves version '{v1}', expected '{v2}'" in wrong.output, wrong.output


def _kill(pid: int) -> None:
    """SIGKILL `pid` and wait until it is gone: the signal is delivered asynchronously, and a repair
    that looked a moment too early would still find it running."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_killed_command_nginx_or_colour_is_explained_then_repaired(project: Path, versions: dict[str, str]) -> None:
    v1, v2 = versions["a"], versions["b"]
    env = {**os.environ, "DETOPS_PARAMS": str(project / "params.yaml")}
    with Clients(_front_door(), n=2):  # live traffic, so the shadow window lasts
        command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "deploy", "rollout", v2], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while _deployer().state.stack().rollout_in_progress is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        os.killpg(command.pid, signal.SIGKILL)  # the rollout's own command dies mid-rollout
        command.wait()
        status = _deployer().status()
        assert any("did not finish" in p for p in status["problems"]), status["problems"]
        repaired = _deployer()
        assert repaired.repair() and repaired.status()["problems"] == []
        assert _deployer().state.rollouts(1)[0].verdict == "interrupted"

        stack = _deployer().state.stack()
        _kill(stack.nginx_pid)  # the front door dies (its workers are orphaned)
        assert any("nginx" in p for p in _deployer().status()["problems"])
        notes = _deployer().repair()
        assert any("nginx" in n and "restarted" in n for n in notes)
        with pytest.raises(ProcessLookupError):  # no orphaned worker of the killed nginx is left behind
            os.killpg(stack.nginx_pid, 0)
        live = stack.colours[stack.live]
        _kill(live.pid)  # the live colour's main process dies (its workers live on, orphaned)
        notes = _deployer().repair()
        assert any("live colour" in n for n in notes)
        time.sleep(1)
    after = httpx.post(f"{_front_door()}/detect", files={"image": ("x.jpg", images.jpeg(80, 60, seed=9))},
                       headers=auth_headers())
    assert after.status_code == 200 and after.headers["x-model-version"] == v1
    assert _deployer().status()["problems"] == []


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` that delivers registry webhooks to a loopback receiver (plain http to a
    private address must be allowed for that; production uses https: docs/deployment.md)."""
    from cryptography.fernet import Fernet

    root = tmp_path_factory.mktemp("mlflow-server")
    port = processes.free_port()
    env = {**os.environ, "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(), "MLFLOW_WEBHOOK_CACHE_TTL": "1"}
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", processes.HOST, "--port", str(port)]
    with processes.running(argv, url=f"http://{processes.HOST}:{port}", ready_path="/health", env=env,
                           log=root / "server.log", timeout_s=180) as server:
        yield server.url


def test_setting_champion_on_an_mlflow_server_rolls_out_through_its_webhook(
        project: Path, mlflow_server: str, trained_model_dir: Path, yolo_dataset: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.watch import SECRET_ENV
    from serving.runtime import CARD_FILE, ModelCard

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = registry.client()
    run = client.create_run(client.create_experiment("webhook-test"))
    client.set_terminated(run.info.run_id)
    found = {}
    for key, imgsz in (("a", None), ("b", 96)):  # two real versions in the server's registry
        folder = _model_variant(trained_model_dir, tmp_path / key, imgsz)
        ModelCard.load(folder / CARD_FILE).model_copy(update={"run_id": run.info.run_id}).save(folder / CARD_FILE)
        found[key] = _register(folder, yolo_dataset, tmp_path / f"eval-{key}")
    registry.promote(NAME, found["a"])

    params = yaml.safe_load((project / "params.yaml").read_text())
    ports = {processes.free_port() for _ in range(4)}
    port, blue, green, hook = sorted(ports)[:4]
    params["deploy"].update(port=port, blue_port=blue, green_port=green, state_dir=str(tmp_path / "state"),
                            reports=str(tmp_path / "reports"),
                            shadow={"enabled": False},  # shadow windows are the first test's
                            watch={"poll_interval_s": 600.0, "webhook_port": hook})  # only a webhook is fast
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    secret = "a-shared-webhook-secret-0123456789"
    env = {**os.environ, "DETOPS_PARAMS": str(tmp_path / "params.yaml"), "MLFLOW_TRACKING_URI": mlflow_server,
           SECRET_ENV: secret}
    front_door = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("DETOPS_PARAMS", str(tmp_path / "params.yaml"))  # this test's stack, for _deployer()
    with processes.running([sys.executable, "-m", "pipelines.cli", "deploy", "watch"], url=front_door,
                           ready_path="/readyz", env=env, log=tmp_path / "watch.log", timeout_s=240):
        assert httpx.get(f"{front_door}/readyz").headers["x-model-version"] == found["a"]
        # What the MLflow UI does when a person sets the alias: the registry's REST API.
        answer = httpx.post(f"{mlflow_server}/api/2.0/mlflow/registered-models/alias",
                            json={"name": NAME, "alias": "champion", "version": found["b"]})
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any(r.trigger == "webhook" and r.ended_at
                                                      for r in _deployer().state.rollouts(3)):
            time.sleep(0.5)
        forged = httpx.post(f"http://127.0.0.1:{hook}/mlflow", content=b'{"entity": "model_version_alias"}',
                            headers={"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Timestamp": str(int(time.time())),
                                     "X-MLflow-Delivery-Id": "x"})
        assert forged.status_code == 401
        status = _deployer().status()
        assert status["live"]["version"] == found["b"], (tmp_path / "watch.log").read_text()[-3000:]
        assert status["rollouts"][0]["trigger"] == "webhook" and status["rollouts"][0]["verdict"] == "passed"
        assert httpx.get(f"{front_door}/readyz").headers["x-model-version"] == found["b"]
        _deployer().down()
