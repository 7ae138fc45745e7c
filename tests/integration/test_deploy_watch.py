"""The deployment after the switch, and as the README shows it: real nginx, colours and MLflow.

- A version that fails only on traffic its smoke set lacks (its ONNX graph raises on near-white
  images, which the evaluation sample does not hold) passes its rollout; after the switch
  `detops deploy watch` switches back by itself, with the failed requests bounded (`BOUND`). A
  watcher that never judges the live version (tests/mutants/deploy_watch.py `blind`) fails that check.
- `detops deploy rollback` while the previous colour is warm: 5 runs in fresh processes, the wall time
  printed (not asserted); `@champion` and the tags have moved when each returns.
- The README's deployment block run as written in a fresh shell, with only a scratch params file,
  store and ports, and no DETOPS_API_KEY: the deployment's smoke check uses a key of its own.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
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
from pipelines.config.serving import ServeConfig
from pipelines.environment import PROJECT_ROOT
from tests.integration.test_deploy import EVALUATE, PERMISSIVE, _model_variant, _require_nginx
from tests.serving_process import TEST_PEPPER, mint_key

pytestmark = pytest.mark.integration

NAME = "deploy-watch-test"
CLIENTS, PAUSE_S = 2, 0.1  # paced clients: at most CLIENTS / PAUSE_S = 20 requests per second
LIVE_CHECK_S = 0.5  # deploy.watch.live_check_s of this module
# The bound on failed requests after the switch. The gate (max_error_rate 0, judged from the first
# request) breaks at the first failure; the watcher sees it within one live_check_s, then switches
# back (a flag file, a second at most on this machine, 2.5 s allowed for a loaded CI runner): every
# failure a client can get falls in that time, at the clients' rate.
SWITCH_ALLOWANCE_S = 2.5
BOUND = math.ceil(CLIENTS / PAUSE_S * (LIVE_CHECK_S + SWITCH_ALLOWANCE_S))


def _fail_on_bright_images(onnx_path: Path) -> None:
    """Make the graph raise (a Gather out of bounds) when its input's mean is above 0.9 (a near-white
    image) and answer exactly as before otherwise: the smoke check passes, such live traffic fails."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    images_in, out = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    graph.initializer.extend([helper.make_tensor("bright_at", TensorProto.FLOAT, [], [0.9]),
                              helper.make_tensor("far", TensorProto.INT64, [], [1_000_000]),
                              helper.make_tensor("zero", TensorProto.INT64, [], [0]),
                              helper.make_tensor("one", TensorProto.INT64, [], [1])])
    graph.node.extend([
        helper.make_node("ReduceMean", [images_in], ["mean"], keepdims=0),
        helper.make_node("Greater", ["mean", "bright_at"], ["bright"]),
        helper.make_node("Cast", ["bright"], ["bright_int"], to=TensorProto.INT64),
        helper.make_node("Mul", ["bright_int", "far"], ["offset"]),
        helper.make_node("Shape", [f"{out}_raw"], ["raw_shape"]),
        helper.make_node("Gather", ["raw_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Range", ["zero", "batch", "one"], ["rows"]),
        helper.make_node("Add", ["rows", "offset"], ["picked"]),
        helper.make_node("Gather", [f"{out}_raw", "picked"], [out], axis=0),
    ])
    onnx.checker.check_model(model)
    onnx.save(model, str(onnx_path))


def _register(model_dir: Path, dataset: Path, evaluation: Path, promoted: bool) -> str:
    from evaluation.register import register
    from pipelines.config.model import RegisterConfig

    gates = PERMISSIVE if promoted else PERMISSIVE.model_copy(update={"min_map50_95": 1.0})
    cfg = RegisterConfig(model_name=NAME, model_dir=model_dir, evaluation=evaluation, dataset=dataset, gates=gates)
    return str(register(cfg, EVALUATE).version)


@pytest.fixture(scope="module")
def versions(trained_model_dir: Path, yolo_dataset: Path, mlflow_uri: str,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`good` (@champion), `same` (the same model, a second version) and `bright` (fails on near-white
    images only), all registered with good's one evaluation."""
    from evaluation.evaluate import evaluate
    from serving.runtime import MODEL_FILE

    root = tmp_path_factory.mktemp("watch-versions")
    good = _model_variant(trained_model_dir, root / "good", None)
    evaluate(EVALUATE.model_copy(update={"model_dir": good, "dataset": yolo_dataset, "out": root / "eval"}))
    found = {"good": _register(good, yolo_dataset, root / "eval", True),
             "same": _register(good, yolo_dataset, root / "eval", False)}
    bright = _model_variant(good, root / "bright", None)
    _fail_on_bright_images(bright / MODEL_FILE)
    found["bright"] = _register(bright, yolo_dataset, root / "eval", False)
    registry.promote(NAME, found["good"])
    return found


def _params(root: Path, **deploy: object) -> Path:
    """A scratch params.yaml: this module's model, free ports, state under `root`, short windows."""
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    ports = set()
    while len(ports) < 3:
        ports.add(processes.free_port())
    port, blue, green = sorted(ports)
    params["serve"].update(model_name=NAME, workers=1, prediction_log=str(root / "predictions"), cache_entries=0)
    params["jobs"].update(data_dir=str(root / "jobs"))
    params["gateway"].update(requests_per_s=100_000, images_per_s=100_000)
    params["deploy"].update(port=port, blue_port=blue, green_port=green, state_dir=str(root / "state"),
                            reports=str(root / "reports"), job_workers=0, drain_s=1.0, shadow={"enabled": False},
                            **deploy)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _deployer():  # noqa: ANN202
    from deploy.rollout import Deployer
    from pipelines.config.base import load_section

    return Deployer(load_section(DeployConfig), load_section(ServeConfig))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, versions: dict[str, str]) -> Iterator[dict[str, object]]:
    """`good` live behind the front door, judged after a switch every LIVE_CHECK_S with the
    production gates made strict (no failure allowed); the clients' key is theirs only (no
    DETOPS_API_KEY: the deployment's smoke check brings its own)."""
    _require_nginx()
    root = tmp_path_factory.mktemp("deploy-watch")
    params = _params(root, keep_previous_s=120.0,
                     watch={"poll_interval_s": 30.0, "live_check_s": LIVE_CHECK_S},
                     gates={"max_error_rate": 0.0, "max_p95_ratio": 20.0, "min_agreement": 0.95, "min_requests": 5})
    saved = {k: os.environ.get(k) for k in ("DETOPS_PARAMS", "DETOPS_KEY_PEPPER", "DETOPS_DATABASE_URL",
                                            "DETOPS_API_KEY")}
    access = {"DETOPS_KEY_PEPPER": TEST_PEPPER, "DETOPS_DATABASE_URL": f"sqlite:///{root / 'jobs' / 'jobs.db'}"}
    os.environ.update(DETOPS_PARAMS=str(params), **access)
    os.environ.pop("DETOPS_API_KEY", None)
    (root / "jobs").mkdir()
    key = mint_key(access, tenant="watch-tests", scopes="detect")
    try:
        _deployer().up()
        yield {"root": root, "key": key, "env": {**os.environ}}
    finally:
        _deployer().down()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _white_jpeg(side: int = 64) -> bytes:
    """A near-white square image: the bright version fails on it; no evaluation image looks like it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (255, 255, 255)).save(buffer, "JPEG")
    return buffer.getvalue()


class PacedClients:
    """CLIENTS threads posting near-white images to the front door, each pausing PAUSE_S between
    requests: every answer's status and version."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key, self.stop = url, key, threading.Event()
        self.seen: list[tuple[int, str | None]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> PacedClients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self) -> None:
        white = _white_jpeg()
        with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {self.key}"}) as client:
            while not self.stop.is_set():
                try:
                    answer = client.post(f"{self.url}/detect", files={"image": ("w.jpg", white)})
                    self.seen.append((answer.status_code, answer.headers.get("x-model-version")))
                except httpx.HTTPError as exc:
                    self.seen.append((-1, type(exc).__name__))
                self.stop.wait(PAUSE_S)

    def failures(self) -> int:
        return sum(1 for code, _ in list(self.seen) if code != 200)


def check_switched_back(clients: PacedClients, bad: str, good: str, *, timeout_s: float = 60.0) -> int:
    """The guarantee: `bad` (live after a passed rollout) is switched back to `good` by itself after it
    starts failing, with at most BOUND failed requests; the registry and the report say why. Returns
    the failed requests. Waits until the rollback or more than BOUND failures (or `timeout_s`)."""
    deployer = _deployer()
    deadline = time.monotonic() + timeout_s
    rollout = None
    while time.monotonic() < deadline and clients.failures() <= BOUND:
        rollout = next((r for r in deployer.state.rollouts(5) if r.version == bad and r.trigger == "command"), None)
        if rollout is not None and rollout.verdict == "rolled_back":
            break
        time.sleep(0.2)
    time.sleep(1.0)  # answers in flight at the switch back are counted too
    failures = clients.failures()
    assert rollout is not None and rollout.verdict == "rolled_back", (
        f"v{bad} was not rolled back: {failures} failed requests, rollout {rollout}")
    assert 0 < failures <= BOUND, f"{failures} failed requests after the switch (bound {BOUND})"
    assert "after_switch_error_rate check failed" in rollout.reason, rollout.reason
    assert rollout.figures["after_switch"]["errors"] >= 1
    back = deployer.state.rollouts(5)[0]
    assert back.version == good and back.trigger == "guard" and back.reason.startswith("automatic rollback")
    assert deployer.status()["live"]["version"] == good
    answer = httpx.get(f"{deployer.front_door}/readyz", timeout=10)
    assert answer.headers["x-model-version"] == good
    assert registry.alias_version(NAME, "champion") == good
    tags = registry.resolve(NAME, version=bad).tags
    assert tags["deploy.verdict"] == "rolled_back" and "after the switch" in tags["deploy.reason"]
    report = json.loads((Path(deployer.cfg.reports) / f"rollout-{rollout.id}.json").read_text())
    assert report["verdict"] == "rolled_back" and any(c["name"] == "after_switch_error_rate" and not c["passed"]
                                                      for c in report["checks"])
    return failures


def _watcher(stack: dict[str, object], log: Path, *mutant: str) -> subprocess.Popen:
    prefix = ["-m", "tests.mutants.deploy_watch", *mutant, "--"] if mutant else ["-m", "pipelines.cli"]
    return processes.spawn([sys.executable, *prefix, "deploy", "watch", "--no-webhook"], log=log,
                           env=stack["env"], cwd=PROJECT_ROOT)


def _wait_first_check(process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    """Until the watcher has compared @champion with the live version once: a rollout started after it is
    one the watcher learns of from the deployment state, not from its first look (it then waits up to
    poll_interval_s, 30 s here, before comparing @champion again)."""
    deadline = time.monotonic() + timeout_s
    while "is live and @champion" not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    processes.stop(process.pid, timeout_s=10)
    process.wait(timeout=10)


def test_a_version_that_breaks_after_the_switch_is_rolled_back_by_the_watcher(
        stack: dict[str, object], versions: dict[str, str]) -> None:
    good, bad = versions["good"], versions["bright"]
    log = stack["root"] / "watch.log"
    watcher = _watcher(stack, log)
    try:
        _wait_first_check(watcher, log)
        with PacedClients(_deployer().front_door, stack["key"]) as clients:
            while len(clients.seen) < 10:  # the live version answers these images
                time.sleep(0.1)
            assert clients.failures() == 0, clients.seen[:5]
            rollout = _deployer().rollout(bad)  # what `detops deploy rollout --detach` runs
            assert rollout.verdict == "passed" and rollout.figures["smoke"]["mismatches"] == []
            failures = check_switched_back(clients, bad, good)
    finally:
        _stop(watcher)
    print(f"\nfailed requests after the switch: {failures} (bound {BOUND})")
    assert "broke after the switch" in log.read_text(), log.read_text()[-2000:]


def test_a_blind_watcher_fails_the_rollback_check(stack: dict[str, object], versions: dict[str, str]) -> None:
    good, bad = versions["good"], versions["bright"]
    log = stack["root"] / "watch-blind.log"
    watcher = _watcher(stack, log, "blind")
    try:
        _wait_first_check(watcher, log)
        with PacedClients(_deployer().front_door, stack["key"]) as clients:
            assert _deployer().rollout(bad).verdict == "passed"  # its colour is still warm: no new start
            with pytest.raises(AssertionError, match="was not rolled back"):
                check_switched_back(clients, bad, good)
    finally:
        _stop(watcher)
    _deployer().rollback(reason="test: after the blind watcher")
    assert _deployer().status()["live"]["version"] == good


def test_rollback_while_warm_returns_with_the_registry_moved(stack: dict[str, object],
                                                             versions: dict[str, str]) -> None:
    """`detops deploy rollback` in fresh processes, back and forth between the two warm colours: 5
    handed to the running watcher (which has the registry open), then 2 with no watcher (the command
    does it all); the wall times are printed (figures to report, not a test). A second watcher of the
    same deployment is refused."""
    env = {k: v for k, v in stack["env"].items() if k != "DETOPS_API_KEY"}

    def rollback(by_watcher: bool) -> float:
        live = _deployer().status()["live"]["version"]
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "deploy", "rollback", "--reason", "timing"],
                              env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)
        took = time.monotonic() - started
        assert done.returncode == 0 and "(switch" in done.stdout, done.stdout + done.stderr
        assert ("by the running watcher" in done.stdout) == by_watcher, done.stdout
        now_live = _deployer().status()["live"]["version"]
        assert now_live != live and registry.alias_version(NAME, "champion") == now_live
        assert registry.resolve(NAME, version=live).tags["deploy.verdict"] == "rolled_back"
        return took

    log = stack["root"] / "watch-rollback.log"
    watcher = _watcher(stack, log)
    try:
        _wait_first_check(watcher, log)
        second = subprocess.run([sys.executable, "-m", "pipelines.cli", "deploy", "watch", "--no-webhook"], env=env,
                                cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 1 and "another watcher already follows" in second.stdout + second.stderr
        with_watcher = [rollback(True) for _ in range(5)]
    finally:
        _stop(watcher)
    assert "rollback (asked by a command)" in log.read_text()
    alone = [rollback(False) for _ in range(2)]
    print(f"\ndetops deploy rollback wall time, handed to the watcher: "
          f"{', '.join(f'{t:.2f}' for t in with_watcher)} s, median {statistics.median(with_watcher):.2f} s; "
          f"without a watcher: {', '.join(f'{t:.2f}' for t in alone)} s")


def _readme_deployment_block() -> list[str]:
    """The command lines of the README's deployment block (the fenced bash block of its Deployment section)."""
    text = (PROJECT_ROOT / "README.md").read_text()
    section = text[text.index("## Deployment"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no bash block in the Deployment section"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_deployment_commands_work_as_written(versions: dict[str, str],
                                                        tmp_path: Path) -> None:
    """The README block in a fresh `bash -e` with a clean environment: only a scratch params file, the
    MLflow store and PATH/HOME are given; the install line is checked instead of run, and the
    example version (8) is this registry's second version."""
    _require_nginx()
    good, other = versions["good"], versions["same"]
    registry.promote(NAME, good)
    lines = _readme_deployment_block()
    assert lines[0].startswith("sudo apt-get install -y nginx")
    script = [re.sub(r"deploy rollout \d+", f"deploy rollout {other}", line) for line in lines[1:]]
    assert any(f"deploy rollout {other}" in line for line in script)
    params = _params(tmp_path, keep_previous_s=120.0)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ["HOME"],
           "LANG": "C.UTF-8", "DETOPS_PARAMS": str(params), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    shell = subprocess.Popen(["bash", "-e", "-c", "\n".join(script)], env=env, cwd=PROJECT_ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = shell.communicate(timeout=400)
    finally:
        processes.stop(shell.pid, timeout_s=10)  # the block's background watcher too, whatever happened
    assert shell.returncode == 0, output[-4000:]
    assert f"live: v{good} on blue" in output and f"v{other} is live on green" in output, output[-4000:]
    assert f"v{good} is live again on blue (switch" in output and "stopped: front door and colours" in output
    assert "dtk_" not in output  # the deployment's own key is never printed
    assert registry.alias_version(NAME, "champion") == good
    assert registry.resolve(NAME, version=other).tags["deploy.verdict"] == "rolled_back"
    from serving.gateway.keys import KeyStore
    from serving.jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs' / 'jobs.db'}")
    try:
        keys = KeyStore(store, b"unused: listing needs no pepper").list("detops.deploy")
    finally:
        store.close()
    assert len(keys) >= 2 and all(k.revoked_at is not None and k.scopes == {"detect"} for k in keys)
