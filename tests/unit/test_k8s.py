"""deploy/k8s checked offline, with no cluster: every overlay renders with the machine's kubectl
(kustomize); the core objects validate strictly against the Kubernetes 1.32 schemas, pinned here
(kubernetes-validate), not whatever the machine's kubectl reports; the Argo Rollouts, KEDA and Prometheus Operator objects against the
schemas @kubernetes-models/* generated from their CRDs (deploy/k8s/validate, `make k8s-schemas`), with
unknown fields reported; and every reference resolves (selectors, port names, ConfigMaps, Secrets,
volumes, service accounts, analysis templates, probe paths among the service's routes). Each check is
also shown to fail on a manifest with one misspelled field."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VALIDATOR = K8S / "validate"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
CRD_GROUPS = ("argoproj.io/", "keda.sh/", "monitoring.coreos.com/")
WORKLOADS = {"Deployment", "Rollout", "StatefulSet", "DaemonSet"}
Obj = dict[str, Any]


# --------------------------------------------------------------------------- rendering
def render(path: Path) -> list[Obj]:
    """`kubectl kustomize PATH` as a list of objects; AssertionError with kustomize's message on failure."""
    done = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kubectl kustomize {path}: {done.stderr.strip()[-1500:]}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@functools.cache
def rendered(overlay: str) -> tuple[Obj, ...]:
    return tuple(render(K8S / "overlays" / overlay))


KUBERNETES_VERSION = "1.32.0"  # the schema set the manifests target (kubernetes-validate names it so)


def name(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def is_crd(obj: Obj) -> bool:
    return obj["apiVersion"].startswith(CRD_GROUPS)


# --------------------------------------------------------------------------- core schemas
def core_problems(objects: list[Obj]) -> list[str]:
    """Strict validation (unknown fields are errors) of every core object, and of the core parts of the
    custom resources: a Rollout's pod template, an AnalysisTemplate's Job."""
    import kubernetes_validate

    version = KUBERNETES_VERSION
    problems = []
    for obj in objects:
        checks = [] if is_crd(obj) else [(name(obj), obj)]
        if obj["kind"] == "Rollout":
            checks.append((f"{name(obj)} template", {"apiVersion": "v1", "kind": "PodTemplate",
                                                     "metadata": {"name": "t"}, "template": obj["spec"]["template"]}))
        if obj["kind"] == "AnalysisTemplate":
            for metric in obj["spec"]["metrics"]:
                if "job" in metric.get("provider", {}):
                    job = metric["provider"]["job"]
                    checks.append((f"{name(obj)} job", {"apiVersion": "batch/v1", "kind": "Job",
                                                        "metadata": {"name": "j", **job.get("metadata", {})},
                                                        "spec": job["spec"]}))
        for label, body in checks:
            try:
                kubernetes_validate.validate(body, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                problems.append(f"{label}: {where}: {exc.message}")
    return problems


# --------------------------------------------------------------------------- CRD schemas
def crd_problems(objects: list[Obj]) -> list[str]:
    """The custom resources against the CRD schemas of @kubernetes-models (node): schema errors,
    unknown fields, and any custom kind the validator has no schema for."""
    if not (VALIDATOR / "node_modules").is_dir() or shutil.which("node") is None:
        message = "CRD schemas not installed: run `make k8s-schemas` (node + npm ci in deploy/k8s/validate)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    custom = [o for o in objects if is_crd(o)]
    done = subprocess.run(["node", str(VALIDATOR / "validate.mjs")], input=json.dumps(custom), capture_output=True,
                          text=True, timeout=60, check=False, cwd=VALIDATOR)
    assert done.returncode == 0, done.stderr[-2000:]
    problems = []
    for entry in json.loads(done.stdout):
        label = f"{entry['kind']}/{entry['name']}"
        if not entry["checked"]:
            problems.append(f"{label}: no schema for this kind in deploy/k8s/validate")
        problems += [f"{label}: {e}" for e in entry["errors"]]
        problems += [f"{label}: {path}: unknown field" for path in entry["unknown"]]
    return problems


# --------------------------------------------------------------------------- references
def service_routes() -> set[str]:
    """The paths a probe may use: BentoML's system routes of the served app (the service's own API
    routes are POST-only)."""
    from types import SimpleNamespace

    from bentoml._internal.server.base_app import BaseAppFactory

    def noop(*_: object) -> None:
        return None

    return {r.path for r in BaseAppFactory.get_system_routes(SimpleNamespace(livez=noop, readyz=noop, metrics=noop))}


def pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(owner, pod template) of every workload, CronJob and analysis Job."""
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            yield name(obj), obj["spec"]["template"]
        elif obj["kind"] == "CronJob":
            yield name(obj), obj["spec"]["jobTemplate"]["spec"]["template"]
        elif obj["kind"] == "Job":
            yield name(obj), obj["spec"]["template"]
        elif obj["kind"] == "AnalysisTemplate":
            for metric in obj["spec"]["metrics"]:
                if "job" in metric.get("provider", {}):
                    yield name(obj), metric["provider"]["job"]["spec"]["template"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def reference_problems(objects: list[Obj], routes: set[str]) -> list[str]:
    """Everything one object names in another resolves within the rendered set."""
    by_kind: dict[str, dict[str, Obj]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    pods = list(pod_templates(objects))
    problems = []

    def need(kind: str, ref: str | None, where: str, key: str | None = None) -> None:
        target = by_kind.get(kind, {}).get(ref or "")
        if target is None:
            problems.append(f"{where}: {kind} {ref!r} does not exist")
        elif key is not None and key not in {**target.get("data", {}), **target.get("stringData", {})}:
            problems.append(f"{where}: {kind} {ref!r} has no key {key!r}")

    for owner, template in pods:
        spec = template["spec"]
        if spec.get("serviceAccountName"):
            need("ServiceAccount", spec["serviceAccountName"], owner)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                need("ConfigMap", volume["configMap"]["name"], f"{owner} volume {volume['name']}")
            if "secret" in volume:
                need("Secret", volume["secret"]["secretName"], f"{owner} volume {volume['name']}")
            if "persistentVolumeClaim" in volume:
                need("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], owner)
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner} container {container['name']}"
            ports = {p["name"] for p in container.get("ports", []) if "name" in p}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    need("ConfigMap", source["configMapRef"]["name"], where)
                if "secretRef" in source:
                    need("Secret", source["secretRef"]["name"], where)
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    need("ConfigMap", ref["configMapKeyRef"]["name"], where, ref["configMapKeyRef"]["key"])
                if "secretKeyRef" in ref:
                    need("Secret", ref["secretKeyRef"]["name"], where, ref["secretKeyRef"]["key"])
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    problems.append(f"{where}: volumeMount {mount['name']!r} names no volume")
            for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
                http = container.get(probe_name, {}).get("httpGet")
                if http is None:
                    continue
                if isinstance(http["port"], str) and http["port"] not in ports:
                    problems.append(f"{where} {probe_name}: port {http['port']!r} is not a container port name")
                if owner.startswith("Rollout/") and http["path"] not in routes:
                    problems.append(f"{where} {probe_name}: path {http['path']!r} is not a route of the service "
                                    f"({sorted(routes)})")

    for svc in by_kind.get("Service", {}).values():
        selector = svc["spec"].get("selector", {})
        selected = [(o, t) for o, t in pods if matches(selector, t["metadata"].get("labels", {}))]
        if not selected:
            problems.append(f"{name(svc)}: selector {svc['spec'].get('selector')} matches no pod template")
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for owner, template in selected:
                declared = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
                if isinstance(target, str) and target not in {p.get("name") for p in declared}:
                    problems.append(f"{name(svc)} port {port.get('name')}: targetPort {target!r} is no port name "
                                    f"of {owner}")
    for kind in ("PodDisruptionBudget",):
        for obj in by_kind.get(kind, {}).values():
            selector = obj["spec"]["selector"]["matchLabels"]
            if not any(matches(selector, t["metadata"].get("labels", {})) for _, t in pods):
                problems.append(f"{name(obj)}: selector matches no pod template")
    for obj in by_kind.get("Rollout", {}).values():
        template_labels = obj["spec"]["template"]["metadata"]["labels"]
        if not matches(obj["spec"]["selector"]["matchLabels"], template_labels):
            problems.append(f"{name(obj)}: selector does not match its own template")
        strategy = obj["spec"]["strategy"].get("blueGreen", {})
        for key in ("activeService", "previewService"):
            need("Service", strategy.get(key), f"{name(obj)} {key}")
        for phase in ("prePromotionAnalysis", "postPromotionAnalysis"):
            analysis = strategy.get(phase, {})
            given = {a["name"] for a in analysis.get("args", [])}
            for ref in analysis.get("templates", []):
                need("AnalysisTemplate", ref["templateName"], f"{name(obj)} {phase}")
                template = by_kind.get("AnalysisTemplate", {}).get(ref["templateName"])
                for arg in (template or {}).get("spec", {}).get("args", []):
                    if "value" not in arg and arg["name"] not in given:
                        problems.append(f"{name(obj)} {phase}: {ref['templateName']} needs arg {arg['name']!r}")
    for obj in by_kind.get("HorizontalPodAutoscaler", {}).values():
        need(obj["spec"]["scaleTargetRef"]["kind"], obj["spec"]["scaleTargetRef"]["name"], name(obj))
    for obj in by_kind.get("ScaledObject", {}).values():
        need(obj["spec"]["scaleTargetRef"].get("kind", "Deployment"), obj["spec"]["scaleTargetRef"]["name"], name(obj))
        for trigger in obj["spec"]["triggers"]:
            if "authenticationRef" in trigger:
                need("TriggerAuthentication", trigger["authenticationRef"]["name"], name(obj))
    for obj in by_kind.get("TriggerAuthentication", {}).values():
        for ref in obj["spec"].get("secretTargetRef", []):
            need("Secret", ref["name"], name(obj), ref["key"])
    for obj in by_kind.get("RoleBinding", {}).values():
        need(obj["roleRef"]["kind"], obj["roleRef"]["name"], name(obj))
        for subject in obj["subjects"]:
            need(subject["kind"], subject["name"], name(obj))
    for obj in by_kind.get("Role", {}).values():
        kinds = {"rollouts": "Rollout", "deployments": "Deployment"}
        for rule in obj["rules"]:
            for resource in rule["resources"]:
                for ref in rule.get("resourceNames", []):
                    need(kinds.get(resource, resource), ref, f"{name(obj)} resourceNames")
    for obj in by_kind.get("ServiceMonitor", {}).values():
        services = [s for s in by_kind.get("Service", {}).values()
                    if matches(obj["spec"]["selector"]["matchLabels"], s["metadata"].get("labels", {}))]
        if not services:
            problems.append(f"{name(obj)}: selector matches no Service")
        for endpoint in obj["spec"]["endpoints"]:
            for svc in services:
                if endpoint.get("port") not in {p.get("name") for p in svc["spec"]["ports"]}:
                    problems.append(f"{name(obj)}: port {endpoint.get('port')!r} is no port name of {name(svc)}")
    for obj in by_kind.get("Ingress", {}).values():
        for rule in obj["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                need("Service", backend["name"], name(obj))
                svc = by_kind.get("Service", {}).get(backend["name"])
                port = backend["port"].get("name")
                if svc and port and port not in {p.get("name") for p in svc["spec"]["ports"]}:
                    problems.append(f"{name(obj)}: port {port!r} is no port name of {name(svc)}")
    return problems


CHECKS: dict[str, Callable[[list[Obj]], list[str]]] = {
    "core": core_problems,
    "crd": crd_problems,
    "references": lambda objects: reference_problems(objects, service_routes()),
}


# --------------------------------------------------------------------------- the manifests
@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("check", list(CHECKS))
def test_every_overlay_renders_and_passes(overlay: str, check: str) -> None:
    assert OVERLAYS and {"production"} <= set(OVERLAYS)
    objects = list(rendered(overlay))
    assert CHECKS[check](objects) == []


def test_the_objects_the_issue_asks_for_are_there() -> None:
    objects = rendered("production")
    kinds = {o["kind"] for o in objects}
    assert {"Rollout", "AnalysisTemplate", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ServiceMonitor", "PrometheusRule", "ScaledObject", "CronJob", "NetworkPolicy", "Role", "RoleBinding",
            "ServiceAccount", "Secret", "Ingress"} <= kinds
    rollout = next(o for o in objects if o["kind"] == "Rollout")
    blue_green = rollout["spec"]["strategy"]["blueGreen"]
    assert blue_green["autoPromotionEnabled"] is False
    assert blue_green["prePromotionAnalysis"]["templates"] and blue_green["postPromotionAnalysis"]["templates"]
    # The model version is one pod-template annotation; the init step pulls exactly that version.
    template = rollout["spec"]["template"]
    version = template["metadata"]["annotations"]["detops.io/model-version"]
    init = template["spec"]["initContainers"][0]
    assert init["command"][:3] == ["detops", "build", "--version"]
    assert init["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.annotations['detops.io/model-version']"
    assert rollout["metadata"]["annotations"]["detops.io/model-version"] == version
    # The smoke analysis is a Job running the CLI's smoke verb against the preview Service.
    smoke = next(o for o in objects if o["kind"] == "AnalysisTemplate" and o["metadata"]["name"] == "detops-smoke")
    command = smoke["spec"]["metrics"][0]["provider"]["job"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["detops", "deploy", "smoke"] and "http://detops-api-preview" in json.dumps(smoke)
    # The watcher may only get and patch the two objects it follows.
    role = next(o for o in objects if o["kind"] == "Role")
    assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]} == {
        (("rollouts",), ("get", "patch")), (("deployments",), ("get", "patch"))}


def test_the_secret_example_holds_placeholders_with_the_names_the_code_reads() -> None:
    from deploy.watch import SECRET_ENV
    from serving.jobs import settings

    secret = next(o for o in rendered("production") if o["kind"] == "Secret" and o["metadata"]["name"] == "detops-urls")
    values = secret["stringData"]
    assert {settings.DATABASE_URL_ENV, settings.BROKER_URL_ENV, settings.OBJECT_STORE_URL_ENV,
            settings.WEBHOOK_SECRET_ENV, SECRET_ENV} <= set(values)
    assert all("REPLACE_ME" in v for v in values.values()), values


def test_the_jobs_queue_keda_watches_is_the_one_the_workers_consume() -> None:
    from pipelines.config.base import load_section
    from pipelines.config.jobs import JobsConfig

    scaled = next(o for o in rendered("production") if o["kind"] == "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == load_section(JobsConfig).queue


def test_the_cli_commands_in_the_manifests_exist() -> None:
    """Every `detops ...` command line the manifests run parses with the real CLI (--help on the verb)."""
    from typer.testing import CliRunner

    from pipelines.cli.main import app

    commands = set()
    for obj in rendered("production"):
        for _, template in pod_templates([obj]):
            for container in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                text = " ".join(container.get("command", []))
                commands |= {tuple(m.split()) for m in re.findall(r"(?:exec )?detops ((?:[a-z]+ ?){1,2})", text)}
    assert {("build",), ("worker",), ("deploy", "smoke"), ("deploy", "watch"), ("drift",), ("push",), ("purge",)} <= {
        c[:2] if c[0] == "deploy" else c[:1] for c in commands}
    for command in commands:
        verb = list(command[:2] if command[0] == "deploy" else command[:1])
        result = CliRunner().invoke(app, [*verb, "--help"])
        assert result.exit_code == 0, (verb, result.output)


def test_the_job_metrics_queries_run_on_the_real_job_store_schema() -> None:
    """The sql_exporter queries behind the queue-age and dead-letter alerts, on PostgreSQL with the
    job store's own schema: one queued job created 2 minutes ago and one dead-lettered image."""
    import uuid
    from datetime import timedelta

    import sqlalchemy as sa

    from serving.jobs.store import job_results, jobs, metadata, utcnow

    config = next(o for o in rendered("production") if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"] == "detops-sql-exporter")
    collector = yaml.safe_load(config["data"]["detops_jobs.collector.yml"])
    admin = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    db = f"detops_k8s_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {db}"))
    except sa.exc.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({exc.orig})")
    engine = sa.create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(jobs.insert().values(job_id="j1", owner="o", status="queued", request_hash="h", params="{}",
                                              total=1, created_at=utcnow() - timedelta(minutes=2)))
            conn.execute(job_results.insert().values(job_id="j1", image_index=0, status="dead", created_at=utcnow()))
        with engine.connect() as conn:
            values = {m["metric_name"]: conn.execute(sa.text(m["query"])).mappings().one()[m["values"][0]]
                      for m in collector["metrics"]}
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {db}"))
        admin.dispose()
    assert 110 <= float(values["detops_jobs_oldest_queued_age_seconds"]) < 3600
    assert values["detops_jobs_dead_images_last_hour"] == 1
    rules = json.dumps(next(o for o in rendered("production") if o["kind"] == "PrometheusRule"))
    assert all(m["metric_name"] in rules for m in collector["metrics"])


# --------------------------------------------------------------------------- each check can fail
def _set(objects: list[Obj], kind: str, obj_name: str, edit: Callable[[Obj], None]) -> list[Obj]:
    objects = copy.deepcopy(objects)
    edit(next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == obj_name))
    return objects


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _api_container(rollout: Obj) -> Obj:
    return rollout["spec"]["template"]["spec"]["containers"][0]


MISSPELLED: dict[str, tuple[str, str, str, Callable[[Obj], None], str]] = {
    # check: (kind, name, what, edit, expected problem)
    "core": ("Deployment", "detops-worker", "resources -> resource",
             lambda o: _rename(o["spec"]["template"]["spec"]["containers"][0], "resources", "resource"), "resource"),
    "core-rollout-template": ("Rollout", "detops-api", "readinessProbe -> readynessProbe",
                              lambda o: _rename(_api_container(o), "readinessProbe", "readynessProbe"),
                              "readynessProbe"),
    "crd": ("Rollout", "detops-api", "autoPromotionEnabled -> autoPromotionEnable",
            lambda o: _rename(o["spec"]["strategy"]["blueGreen"], "autoPromotionEnabled", "autoPromotionEnable"),
            "autoPromotionEnable"),
    "crd-keda": ("ScaledObject", "detops-worker", "minReplicaCount -> minReplicas",
                 lambda o: _rename(o["spec"], "minReplicaCount", "minReplicas"), "minReplicas"),
    "crd-servicemonitor": ("ServiceMonitor", "detops-api", "podTargetLabels -> podTargetLabel",
                           lambda o: _rename(o["spec"], "podTargetLabels", "podTargetLabel"), "podTargetLabel"),
    "references": ("Service", "detops-api-preview", "selector label component -> componet",
                   lambda o: _rename(o["spec"]["selector"], "app.kubernetes.io/component",
                                     "app.kubernetes.io/componet"),
                   "matches no pod template"),
    "references-probe": ("Rollout", "detops-api", "probe path /readyz -> /readz",
                         lambda o: _api_container(o)["readinessProbe"]["httpGet"].update(path="/readz"), "'/readz'"),
    "references-secret": ("Deployment", "detops-worker", "secretRef detops-urls -> detops-url",
                          lambda o: o["spec"]["template"]["spec"]["containers"][0]["envFrom"][1]["secretRef"].update(
                              name="detops-url"), "'detops-url' does not exist"),
    "references-port": ("Service", "detops-api-active", "targetPort http -> htp",
                        lambda o: o["spec"]["ports"][0].update(targetPort="htp"), "'htp'"),
}


@pytest.mark.parametrize("case", list(MISSPELLED))
def test_a_misspelled_field_fails_its_check(case: str) -> None:
    kind, obj_name, _, edit, expected = MISSPELLED[case]
    check = CHECKS[case.split("-")[0]]
    broken = _set(list(rendered("small")), kind, obj_name, edit)
    problems = check(broken)
    assert problems and all(expected in p for p in problems), problems


def test_a_misspelled_kustomization_field_fails_the_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresourcess:\n"
        f"  - {os.path.relpath(K8S / 'base', tmp_path)}\n")
    with pytest.raises(AssertionError, match="unknown field"):
        render(tmp_path)


def test_the_drift_alerts_read_what_detops_drift_pushes(tmp_path: Path) -> None:
    """drift.prom (what the drift CronJob pushes) holds every detops_drift_* series the alerts use."""
    from monitoring.drift import DriftResult, FeatureDrift, write_outputs

    write_outputs(DriftResult(True, 0.5, 0.3, 1, 2, 100, 100, "last 100",
                              [FeatureDrift("brightness", "K-S p_value", 0.001, 0.05, True)]), tmp_path)
    exposed = set(re.findall(r"^(detops_drift_[a-z_]+)", (tmp_path / "drift.prom").read_text(), re.M))
    rules = json.dumps(next(o for o in rendered("production") if o["kind"] == "PrometheusRule"))
    used = set(re.findall(r"detops_drift_[a-z_]+", rules))
    assert used and used <= exposed
    cron = json.dumps(next(o for o in rendered("production") if o["metadata"]["name"] == "detops-drift"))
    assert "drift.prom" in cron and "/metrics/job/detops-drift" in cron and 'job=\\"detops-drift\\"' in rules


def test_the_thresholds_are_the_ones_docs_capacity_derives() -> None:
    """docs/capacity.md's table of thresholds and the rendered production manifests agree."""
    table = (ROOT / "docs" / "capacity.md").read_text().split("## Thresholds in the manifests, derived")[1]
    value = {row.split("|")[1].strip(): row.split("|")[3].strip() for row in table.splitlines()
             if row.startswith("| ") and not row.startswith("| threshold")}
    objects = {name(o): o for o in rendered("production")}
    hpa = objects["HorizontalPodAutoscaler/detops-api"]["spec"]
    assert str(hpa["metrics"][0]["resource"]["target"]["averageUtilization"]) == value["HPA CPU target"]
    assert f"{hpa['minReplicas']} / {hpa['maxReplicas']}" == value["API replicas, production"]
    scaled = objects["ScaledObject/detops-worker"]["spec"]
    assert scaled["triggers"][0]["metadata"]["listLength"] == value["KEDA Redis list length per replica"]
    assert f"{scaled['minReplicaCount']} / {scaled['maxReplicaCount']}" == value["worker replicas, production"]
    rules = {r["alert"]: r["expr"] for g in objects["PrometheusRule/detops"]["spec"]["groups"] for r in g["rules"]}
    assert rules["DetopsHighP95Latency"].strip().endswith(f"> {value['p95 alert and post-promotion gate'].split()[0]}")
    assert rules["DetopsHighErrorRate"].strip().endswith(f"> {value['error-rate alert and gates']}")
    assert rules["DetopsJobQueueAge"].strip().endswith(f"> {value['job queue age alert'].split()[0]}")
    templates = {o["metadata"]["name"]: o for o in rendered("production") if o["kind"] == "AnalysisTemplate"}
    args = {a["name"]: a.get("value") for t in templates.values() for a in t["spec"]["args"]}
    assert args["max-p95-seconds"] == value["p95 alert and post-promotion gate"].split()[0]
    assert args["max-error-rate"] == value["error-rate alert and gates"]


def test_every_alert_has_a_runbook_entry() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    rules = [r for o in rendered("production") if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"]
             for r in g["rules"]]
    assert len(rules) >= 5
    for rule in rules:
        assert f"## {rule['alert']}\n" in runbook, rule["alert"]
        assert rule["annotations"]["runbook"] == f"docs/runbook.md#{rule['alert'].lower()}"


def test_the_core_schemas_are_the_pinned_kubernetes_version() -> None:
    import kubernetes_validate

    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()
    with pytest.raises(kubernetes_validate.ValidationError):  # a 1.32 schema judges: an unknown field fails
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                                      "dataa": {}}, KUBERNETES_VERSION, strict=True)
