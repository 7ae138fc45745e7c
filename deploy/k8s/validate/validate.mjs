// Validate custom resources (Argo Rollouts, KEDA, Prometheus Operator) against the schemas that
// @kubernetes-models/* generated from the upstream CRDs (versions pinned in package-lock.json).
//
// stdin: a JSON array of Kubernetes objects. stdout: a JSON array, one entry per object:
//   {kind, name, checked: bool, errors: [..], unknown: [..]}
// `errors` are the schema's own findings. `unknown` lists fields the schema does not define: CRD
// schemas leave additionalProperties open (the API server prunes unknown fields silently), so a
// misspelled field would pass; a field is known when the schema rejects a wrong-typed value put in its
// place (a boolean and a string: no typed field accepts both), and unknown when it accepts anything.
import { AnalysisTemplate } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/AnalysisTemplate";
import { Rollout } from "@kubernetes-models/argo-rollouts/argoproj.io/v1alpha1/Rollout";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { readFileSync } from "node:fs";

const MODELS = [AnalysisTemplate, Rollout, ScaledObject, TriggerAuthentication, PrometheusRule, ServiceMonitor];
const PROBES = [true, "\u0000probe"];

function findModel(obj) {
  return MODELS.find((m) => m.apiVersion === obj.apiVersion && m.kind === obj.kind);
}

function errorsOf(Model, obj) {
  try {
    new Model(obj).validate();
    return [];
  } catch (e) {
    const list = e.errors || e.details || [{ message: String(e.message || e) }];
    return list.map((x) => `${x.instancePath || "/"} ${x.message || x.keyword} ${JSON.stringify(x.params || {})}`);
  }
}

function setAt(obj, path, value) {
  const copy = structuredClone(obj);
  let node = copy;
  for (const key of path.slice(0, -1)) node = node[key];
  node[path[path.length - 1]] = value;
  return copy;
}

function unknownFields(Model, obj) {
  const unknown = [];
  const walk = (node, path) => {
    if (Array.isArray(node)) {
      node.forEach((item, i) => walk(item, [...path, i]));
      return;
    }
    if (node === null || typeof node !== "object") return;
    for (const key of Object.keys(node)) {
      const here = [...path, key];
      const known = PROBES.some((probe) => errorsOf(Model, setAt(obj, here, probe)).length > 0);
      if (!known) {
        unknown.push("/" + here.join("/"));
        continue;
      }
      walk(node[key], here);
    }
  };
  // apiVersion and kind are fixed enums; metadata is the core ObjectMeta (kubernetes-validate checks it).
  for (const key of Object.keys(obj)) {
    if (key === "metadata") continue;
    if (key === "apiVersion" || key === "kind") continue;
    walk({ [key]: obj[key] }[key], [key]);
  }
  return unknown;
}

const objects = JSON.parse(readFileSync(0, "utf8"));
const out = objects.map((obj) => {
  const Model = findModel(obj);
  const entry = { kind: obj.kind, name: obj.metadata?.name, checked: Boolean(Model), errors: [], unknown: [] };
  if (!Model) return entry;
  entry.errors = errorsOf(Model, obj);
  if (entry.errors.length === 0) entry.unknown = unknownFields(Model, obj);
  return entry;
});
process.stdout.write(JSON.stringify(out));
