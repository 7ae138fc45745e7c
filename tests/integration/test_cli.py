"""Every `detops` verb through the CLI, in the order of the lifecycle, on the repository's own params.yaml
(run from a scratch working directory holding a copy of it, so relative paths land there; options only
shrink the work: fewer images, one epoch, one trial), and each on one bad input, which must end in a
one-line error and a non-zero exit. Then the serving half the way users start it: `detops build`, plain
`bentoml models list` and `bentoml serve` from the repository root with no BENTOML_HOME set (BentoML's
default home, under a private HOME), the built bento served by its tag, and the monitoring verbs
against that service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from pipelines.cli.main import app
from pipelines.environment import PROJECT_ROOT
from pipelines.processes import HOST, free_port, running
from serving.client import auth_headers

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Iterator[Path]:
    """A scratch working directory with the repository's params.yaml; the CLI runs in it."""
    root = tmp_path_factory.mktemp("cli")
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(previous)


def detops(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def ok(*args: str) -> Result:
    result = detops(*args)
    assert result.exit_code == 0, f"detops {' '.join(args)}:\n{result.output}"
    return result


def refused(*args: str, match: str) -> None:
    """A bad input: exit code 1 and one line naming the problem, no traceback."""
    result = detops(*args)
    assert result.exit_code == 1, f"detops {' '.join(args)} exited {result.exit_code}:\n{result.output}"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.output


def test_data_verbs(workdir: Path) -> None:
    ok("synthesize", "--n-images", "260")  # drift needs 50 reference images: 20 % of them are test
    assert len(list((workdir / "data" / "raw" / "images").glob("*.jpg"))) == 260
    refused("synthesize", "--shift", "foggy", match="synthesize.shift")

    ok("ingest")  # the labeling config beside the export, as params.yaml's null means
    report = json.loads((workdir / "data" / "dataset" / "ingest_report.json").read_text())
    assert report["class_order"] == "labeling_config"
    refused("ingest", "--export", "nowhere.json", match="nowhere.json")

    ok("validate")
    assert json.loads((workdir / "reports" / "validate" / "summary.json").read_text())["success"] is True
    refused("validate", "--dataset", "nowhere", match="nowhere")

    ok("augment")
    assert (workdir / "reports" / "augment" / "preview.png").is_file()
    refused("augment", "--dataset", "nowhere", match="nowhere")


def test_model_verbs(workdir: Path) -> None:
    ok("train", "--epochs", "1", "--imgsz", "64")
    assert (workdir / "models" / "model.onnx").is_file()
    refused("train", "--imgsz", "100", match="train.imgsz")

    ok("evaluate")
    assert 0 <= json.loads((workdir / "reports" / "evaluate" / "metrics.json").read_text())["map50_95"] <= 1
    refused("evaluate", "--model-dir", "nowhere", match="nowhere")

    ok("quantize")  # the int8 copy, then its evaluation as dvc.yaml's evaluate_int8 runs it
    import onnx

    ops = {n.op_type for n in onnx.load(str(workdir / "models" / "int8" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ok("evaluate", "--model-dir", "models/int8", "--out", "reports/evaluate/int8", "--variant", "int8")
    assert json.loads((workdir / "reports" / "evaluate" / "int8" / "metrics.json").read_text())["variant"] == "int8"
    refused("quantize", "--model-dir", "nowhere", match="nowhere")
    refused("evaluate", "--variant", "int4", match="evaluate.variant")

    ok("tune", "--n-trials", "1", "--epochs", "1")
    assert (workdir / "reports" / "tune" / "best_params.yaml").is_file()
    refused("tune", "--n-trials", "0", match="tune.n_trials")


def test_registry_verbs(workdir: Path) -> None:
    first = ok("register")  # params.yaml's gates are for the default model: a one-epoch model fails them
    assert "not promoted" in first.output
    # The variant gate decided between fp32 and its int8 copy; the version says which and why.
    variant = json.loads((workdir / "reports" / "evaluate" / "gates.json").read_text())["variant"]
    assert variant["chosen"] in ("fp32", "int8") and variant["reason"] and variant["fp32"] and variant["int8"]
    from pipelines import registry

    tags = registry.client().get_model_version("detops-detector", "1").tags
    assert tags["detops.precision"] == variant["chosen"] and tags["detops.precision_reason"] == variant["reason"]
    ok("promote", "1")
    second = ok("register")
    assert "v2" in second.output and "not promoted" in second.output
    ok("promote", "2")
    assert "@champion -> v1 (rolled back from v2)" in ok("rollback").output
    refused("rollback", match="v1 has no previous champion")
    refused("promote", "latest", match="version must be a number")
    refused("register", "--evaluation", "nowhere", match="nowhere")

    port = free_port()
    with running([str(BIN / "detops"), "mlflow-ui", "--port", str(port)], url=f"http://{HOST}:{port}",
                 ready_path="/health", log=workdir / "mlflow-ui.log", timeout_s=120) as ui:
        models = httpx.get(f"{ui.url}/api/2.0/mlflow/registered-models/get", params={"name": "detops-detector"})
        assert {a["alias"]: a["version"] for a in models.json()["registered_model"]["aliases"]} == {
            "champion": "1", "challenger": "2"}
    refused("mlflow-ui", "--port", "99999", match="port")


@pytest.fixture(scope="module")
def user_env(workdir: Path, mlflow_uri: str) -> dict[str, str]:
    """A shell's environment with no BENTOML_HOME: BentoML's default home, ~/bentoml, under a private
    HOME; the service's prediction log (with kept images, as `detops push` needs) in the workdir."""
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    return {**env, "HOME": str(workdir / "home"), "MLFLOW_TRACKING_URI": mlflow_uri,
            "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "DETOPS_SERVE_WORKERS": "1",
            "DETOPS_SERVE_PREDICTION_LOG": str(workdir / "monitoring_store"), "DETOPS_SERVE_KEEP_IMAGES": "true",
            "DETOPS_JOBS_DATA_DIR": str(workdir / "jobs_store"),  # the embedded job store, broker and images
            "DETOPS_KEY_PEPPER": "cli-test-pepper-0123456789"}  # authentication is on by default


def shell(env: dict[str, str], *argv: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_build_then_plain_bentoml_serve_and_monitoring_verbs(workdir: Path, user_env: dict[str, str]) -> None:
    built = shell(user_env, "detops", "build")  # from the repository root, as the README says
    assert built.returncode == 0, built.stderr[-3000:]
    assert "detops-detector@champion v1" in built.stdout and "bento detops-detector:" in built.stdout
    stored = next((workdir / "home" / "bentoml" / "models" / "detops-detector").glob("*/model.yaml")).parent
    # The registry's files, as evaluated: the variant the gate chose (fp32 models/ or int8 models/int8).
    served = workdir / json.loads((workdir / "reports" / "evaluate" / "variant.json").read_text())["model_dir"]
    for file in ("model.onnx", "model_card.json", "calibrator.json"):
        assert (stored / file).read_bytes() == (served / file).read_bytes(), file
    listed = shell(user_env, "bentoml", "models", "list")
    assert listed.returncode == 0 and "detops-detector" in listed.stdout, listed.stderr[-2000:]
    missing = shell(user_env, "detops", "build", "--alias", "nobody", "--no-bento")
    assert missing.returncode == 1 and "no version of 'detops-detector' has the alias 'nobody'" in missing.stderr

    # A key as a user makes one (the last line), for the clients below: they read DETOPS_API_KEY.
    made = shell(user_env, "detops", "keys", "create", "--tenant", "cli-user")
    assert made.returncode == 0, made.stderr[-2000:]
    key = made.stdout.strip().splitlines()[-1]
    os.environ["DETOPS_API_KEY"] = key
    try:
        with bentoml_serve(user_env, "serving.service:Detector", cwd=PROJECT_ROOT, log=workdir / "serve.log") as url:
            ok("simulate", "--url", url, "--n", "110", "--rate", "100")
            refused("simulate", "--url", "ftp://nowhere", match="--url")
            batch_verbs(workdir, user_env, url)
    finally:
        os.environ.pop("DETOPS_API_KEY")
    access = [json.loads(line) for line in (workdir / "serve.log").read_text().splitlines() if line.startswith('{"ts"')]
    assert access and all(r["tenant"] == "cli-user" for r in access)  # simulate and batch submit carried the key

    # The drift window and the push read what the service logged (params.yaml: monitoring_store).
    drift = detops("drift")
    assert drift.exit_code in (0, 3), drift.output  # 3: drift found, a verdict as valid as none
    assert (workdir / "reports" / "monitoring" / "drift.html").is_file()
    refused("drift", "--since", "yesterday", match="yesterday")
    pushed = ok("push", "--drifted")  # no LABEL_STUDIO_URL: the tasks go to an import file
    tasks = json.loads((workdir / "reports" / "monitoring" / "labelstudio_import.json").read_text())
    assert len(tasks) == 50 and "50 tasks" in pushed.output  # push.max_per_run
    refused("push", "--labeling-config", "nowhere.xml", match="nowhere.xml")
    assert "purged 0 records" in ok("purge", "--older-than", "30d").output
    refused("purge", "--image", "../etc/passwd", match="not a sha256")

    # The bento `detops build` made, served by its tag.
    os.environ["DETOPS_API_KEY"] = key
    try:
        with bentoml_serve(user_env, "detops-detector:latest", cwd=workdir, log=workdir / "serve-bento.log"):
            pass
    finally:
        os.environ.pop("DETOPS_API_KEY")


def batch_verbs(workdir: Path, user_env: dict[str, str], url: str) -> None:
    """`detops worker` on the embedded default (no server URL set), `detops batch submit` through
    /jobs and `detops batch run` in process on the same folder: the same records."""
    from tests.jobs_services import start_worker

    folder = workdir / "batch"
    (folder / "nested").mkdir(parents=True)
    for i, image in enumerate(sorted((workdir / "data" / "raw" / "images").glob("*.jpg"))[:12]):
        shutil.copy(image, folder / ("nested" if i % 3 == 0 else "") / image.name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    worker = start_worker(user_env, workdir / "worker.log",
                          store_url=f"sqlite:///{workdir / 'jobs_store' / 'jobs.db'}")
    try:
        submitted = ok("batch", "submit", str(folder), "--url", url, "--out", str(workdir / "submitted.jsonl"),
                       "--conf", "0.01", "--poll", "0.3", "--timeout", "180")
    finally:
        worker.stop()
    assert "broken.png: not_an_image" in submitted.output
    assert "12 succeeded, 1 failed of 13 (model v1)" in submitted.output
    refused("batch", "submit", str(folder), "--url", "ftp://nowhere", match="--url")
    refused("worker", "--concurrency", "0", match="--concurrency")

    run = shell(user_env, "detops", "batch", "run", str(folder), "--out", str(workdir / "run.jsonl"), "--conf", "0.01")
    assert run.returncode == 0 and "13 images detected (1 failed)" in run.stdout, run.stderr[-2000:]
    again = shell(user_env, "detops", "batch", "run", str(folder), "--out", str(workdir / "run.jsonl"))
    assert "0 images detected (0 failed), 13 already" in again.stdout, again.stderr[-2000:]
    records = {}
    for name in ("submitted", "run"):
        lines = [json.loads(line) for line in (workdir / f"{name}.jsonl").read_text().splitlines()]
        records[name] = {r["path"]: (r["status"], r.get("detections"), r.get("error")) for r in lines}
    assert records["run"] == records["submitted"] and len(records["run"]) == 13  # through the queue = in process
    assert "nested/" in "".join(records["run"])
    coco = json.loads((workdir / "run.coco.json").read_text())
    assert coco == json.loads((workdir / "submitted.coco.json").read_text())
    refused("batch", "run", "nowhere", "--out", "x.jsonl", match="nowhere")


@contextmanager
def bentoml_serve(env: dict[str, str], target: str, *, cwd: Path, log: Path) -> Iterator[str]:
    """`bentoml serve TARGET` as a user types it; yields its URL once it answered a /detect with the
    registry version `detops build` imported (v1, the champion)."""
    port = free_port()
    argv = ["bentoml", "serve", target, "--host", HOST, "--port", str(port)]
    with running(argv, url=f"http://{HOST}:{port}", ready_path="/readyz", env=env, cwd=cwd, log=log,
                 timeout_s=180) as server:
        answer = httpx.post(f"{server.url}/detect", files={"image": ("a.jpg", _jpeg())}, timeout=60,
                            headers=auth_headers())  # DETOPS_API_KEY: authentication is on by default
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1", answer.text
        yield server.url


def test_pull_without_a_server_says_what_is_missing(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    refused("pull", "--project", "1", "--out", "pulled", match="LABEL_STUDIO_URL")
    # Its happy path runs against a real Label Studio in the feedback loop test (loop_demo.py).


def _jpeg() -> bytes:
    from tests.fixtures import images

    return images.jpeg(200, 150, seed=11)


def test_access_verbs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """detops keys create|list|revoke and purge --tenant|--expired on an embedded jobs database."""
    monkeypatch.setenv("DETOPS_DATABASE_URL", f"sqlite:///{workdir / 'access' / 'jobs.db'}")
    monkeypatch.setenv("DETOPS_KEY_PEPPER", "cli-test-pepper-0123456789")
    created = ok("keys", "create", "--tenant", "acme", "--scopes", "detect,jobs:read").output.strip().splitlines()
    key = created[-1]
    assert key.startswith("dtk_") and " " not in key
    key_id = key.split("_")[1]
    listed = ok("keys", "list").output
    assert key_id in listed and "acme" in listed and key.split("_", 2)[2] not in listed
    assert f"revoked {key_id}" in ok("keys", "revoke", key_id).output
    refused("keys", "create", "--tenant", "acme", "--scopes", "detect,root", match="unknown ['root']")
    refused("keys", "revoke", "000000000000", match="no key")
    store = str(workdir / "access" / "predictions")
    assert "tenant acme: purged 0 jobs and 0 prediction records" in ok("purge", "--tenant", "acme",
                                                                        "--store", store).output
    ok("purge", "--expired", "--store", store)
    refused("purge", "--tenant", "acme", "--expired", match="--tenant T")
    monkeypatch.delenv("DETOPS_KEY_PEPPER")
    refused("keys", "list", match="DETOPS_KEY_PEPPER")
