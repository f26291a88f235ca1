"""Kubernetes manifests: schema-valid (strict), consistent with each other and with the image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from server.settings import Settings
from tests.deploy.conftest import DEPLOY, tool

K8S = DEPLOY / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
RESOURCE_FILES = [K8S / name for name in KUSTOMIZATION["resources"]]

# The fields of monitoring.coreos.com/v1 ServiceMonitor this project may use (a subset of the
# Prometheus Operator CRD): kubernetes-validate has no schema for CRDs and only warns on them.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object"}},
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def load_documents(paths: list[Path]) -> list[dict]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """The s4serve resources by kind (the Redis store's Deployment and Service aside)."""
    return {doc["kind"]: doc for doc in docs
            if not doc["metadata"]["name"].endswith("-redis")}


def kubernetes_validate(paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )


def test_every_listed_resource_exists():
    missing = [str(p) for p in RESOURCE_FILES if not p.is_file()]
    assert not missing, f"kustomization.yaml lists missing files: {missing}"


def test_builtin_resources_pass_strict_schema_validation():
    result = kubernetes_validate(RESOURCE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    skipped_crds = result.stdout.count("Couldn't find schema for kind")
    # Every document was either validated or is a CRD kind checked below.
    assert passed + skipped_crds == len(load_documents(RESOURCE_FILES)), result.stdout
    assert skipped_crds == 1 and "ServiceMonitor" in result.stdout, result.stdout


def test_strict_validation_rejects_an_unknown_field(tmp_path):
    # Guards the check above: strict mode must actually reject misspelled fields.
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["replicaz"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    assert kubernetes_validate([bad]).returncode != 0


def test_service_monitor_matches_its_crd_subset():
    monitor = by_kind(load_documents(RESOURCE_FILES))["ServiceMonitor"]
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_optional_hash_patch_is_a_valid_ingress():
    result = kubernetes_validate([K8S / "ingress-hash-by-session.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_resources_refer_to_each_other_consistently():
    docs = by_kind(load_documents(RESOURCE_FILES))
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb_selector = docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb_selector.items() <= pod_labels.items()

    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 8000}  # the port the image serves on
    service_port = service["spec"]["ports"][0]
    assert service_port["targetPort"] in port_names

    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_port_names

    backends = [
        path["backend"]["service"]
        for rule in docs["Ingress"]["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    for backend in backends:
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in service_port_names


def test_deployment_probes_and_shutdown_fit_the_server():
    deployment = by_kind(load_documents(RESOURCE_FILES))["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop_seconds = int(pre_stop[-1]) if pre_stop[0] == "sleep" else 0
    # Room after preStop for the drain and the session snapshot.
    assert spec["terminationGracePeriodSeconds"] >= pre_stop_seconds + 30
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001  # the image's user (Dockerfile)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The root filesystem is read-only: session snapshots must go to a mounted volume.
    assert env["S4SERVE_SNAPSHOT_DIR"] in mounts
    # Every variable is one the server reads, and each parses
    settings = Settings(**{name.removeprefix("S4SERVE_").lower(): value
                           for name, value in env.items()})
    assert set(env) <= {"S4SERVE_" + field.upper() for field in Settings.model_fields}
    # as many server processes as cores requested (left unset: one per core of the node)
    assert settings.workers == int(container["resources"]["requests"]["cpu"])


def test_hpa_targets_a_share_of_a_pods_session_limit():
    documents = by_kind(load_documents(RESOURCE_FILES))
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    limit = int(env["S4SERVE_WORKERS"]) * int(env["S4SERVE_MAX_SESSIONS"])  # per worker
    metrics = {m["type"]: m for m in documents["HorizontalPodAutoscaler"]["spec"]["metrics"]}
    target = int(metrics["Pods"]["pods"]["target"]["averageValue"])
    assert 0.5 * limit <= target <= 0.8 * limit


def test_hpa_scales_on_cpu_and_active_sessions():
    hpa = by_kind(load_documents(RESOURCE_FILES))["HorizontalPodAutoscaler"]
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "s4serve_sessions_active"


def test_ingress_keeps_websocket_sessions_on_one_pod():
    annotations = by_kind(load_documents(RESOURCE_FILES))["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "affinity"] == "cookie"
    assert annotations[prefix + "affinity-mode"] == "persistent"
    # Longer than the server's idle timeout (300 s), or the proxy cuts quiet sessions.
    assert int(annotations[prefix + "proxy-read-timeout"]) > 300
    patch = yaml.safe_load((K8S / "ingress-hash-by-session.yaml").read_text())
    assert patch["metadata"]["annotations"][prefix + "upstream-hash-by"] == "$arg_session"


def test_kustomize_renders_the_listed_resources():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # The per-file checks above already cover every resource; rendering is a bonus.
        pytest.skip("kubectl not installed: kustomize rendering not checked (files checked above)")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = list(yaml.safe_load_all(rendered.stdout))
    listed = load_documents(RESOURCE_FILES)
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in listed)
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert all(d["metadata"]["namespace"] == KUSTOMIZATION["namespace"] for d in namespaced)
    image = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    new = KUSTOMIZATION["images"][0]
    assert image == f"{new['newName']}:{new['newTag']}"


def test_the_session_store_points_at_the_redis_service():
    docs = load_documents(RESOURCE_FILES)
    redis_docs = {d["kind"]: d for d in docs if d["metadata"]["name"] == "s4serve-redis"}
    deployment, service = redis_docs["Deployment"], redis_docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port = service["spec"]["ports"][0]
    container = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["S4SERVE_STORE"] == f"redis://{service['metadata']['name']}:{port['port']}/0"

