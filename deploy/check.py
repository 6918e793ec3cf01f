#!/usr/bin/env python3
"""Validate everything under deploy/ (run by `make lint`, so by CI).

- Kubernetes manifests: kubernetes-validate (PyPI) against the official
  Kubernetes JSON schemas, strict (unknown fields are errors).
- KEDA objects (custom resources, not in the Kubernetes schemas): a JSON Schema
  of the fields herald's manifests use, with python-jsonschema, plus the rule
  that the scaler watches the work queue only.
- Prometheus alert rules: promtool (Debian's prometheus package).
- docker-compose.yml and the Grafana dashboard: parse, and check what herald relies on.
"""

import glob
import json
import os
import re
import subprocess
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


manifests = sorted(glob.glob(os.path.join(HERE, "k8s", "*.yaml")))
result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *manifests], capture_output=True, text=True)
errors = [l for l in (result.stdout + result.stderr).splitlines() if "ERROR" in l or "FAIL" in l]
check(result.returncode == 0 and not errors, f"kubernetes-validate --strict on {len(manifests)} files" + ("".join("\n      " + e for e in errors)))

KEDA = {
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                        },
                    },
                },
            },
        },
    },
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {
                "type": "object",
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {"parameter": {"type": "string"}, "name": {"type": "string"}, "key": {"type": "string"}},
                        },
                    }
                },
            },
        },
    },
}
deployments = set()
for path in manifests:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "Deployment":
            deployments.add(doc["metadata"]["name"])
            grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            check(grace > 25, f"{doc['metadata']['name']}: terminationGracePeriodSeconds {grace} > worker.shutdown_deadline_secs 25")
for path in manifests:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") not in KEDA:
            continue
        name = f"{os.path.basename(path)}: {doc['kind']}/{doc['metadata']['name']}"
        try:
            jsonschema.validate(doc, KEDA[doc["kind"]])
            check(True, f"{name} matches the KEDA schema")
        except jsonschema.ValidationError as err:
            check(False, f"{name}: {err.message}")
        if doc["kind"] == "ScaledObject":
            check(doc["spec"]["scaleTargetRef"]["name"] in deployments, f"{name} targets a Deployment of deploy/k8s")
            for trigger in doc["spec"]["triggers"]:
                meta = trigger["metadata"]
                queue = meta.get("queueName", "")
                pending = re.compile(queue) if meta.get("useRegex") == "true" else None
                names = ["herald.msteams", "herald.msteams.shard.0", "herald.msteams.shard.15", "herald.msteams.retry.5s", "herald.msteams.dead"]
                matched = [n for n in names if (pending.fullmatch(n) if pending else n == queue)]
                check(
                    matched == names[:3] and meta.get("operation") == "sum",
                    f"{name} scales on the sum of the work queue and the shards, not the retry tiers or dead letters ({queue}: {matched})",
                )

rules = os.path.join(HERE, "prometheus", "herald-rules.yaml")
result = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
check(result.returncode == 0, "promtool check rules prometheus/herald-rules.yaml" + ("" if result.returncode == 0 else "\n" + result.stdout + result.stderr))

tests = os.path.join(HERE, "prometheus", "herald-rules.test.yaml")
result = subprocess.run(["promtool", "test", "rules", tests], capture_output=True, text=True)
check(result.returncode == 0, "promtool test rules prometheus/herald-rules.test.yaml" + ("" if result.returncode == 0 else "\n" + result.stdout + result.stderr))

compose = yaml.safe_load(open(os.path.join(HERE, "docker-compose.yml")))
services = compose.get("services", {})
check({"rabbitmq", "mongodb", "teams-sim", "herald-worker"} <= set(services), "docker-compose.yml has rabbitmq, mongodb, teams-sim and herald-worker")
check(services.get("herald-worker", {}).get("deploy", {}).get("replicas") == 2, "docker-compose.yml runs two herald workers")

dashboard = json.load(open(os.path.join(HERE, "grafana", "herald-dashboard.json")))
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
check(len(exprs) >= 8 and all("herald_" in e for e in exprs), f"Grafana dashboard: {len(exprs)} queries on herald metrics")

if failures:
    print(f"\n{len(failures)} deploy check(s) failed", file=sys.stderr)
    sys.exit(1)
print("\ndeploy/ is valid")
