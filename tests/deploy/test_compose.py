"""deploy/compose.yaml and the Grafana provisioning it mounts: valid and wired together."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, REPO

COMPOSE = DEPLOY / "compose.yaml"
GRAFANA = DEPLOY / "grafana"
SERVICE_FIELDS = {  # the Compose Specification fields this file may use
    "build", "image", "ports", "environment", "volumes", "command", "depends_on",
    "stop_grace_period", "restart", "healthcheck",
}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mount_targets(service: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/) of the bind mounts of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def test_compose_file_is_valid():
    """`docker-compose config` when a Compose implementation is installed; the structural
    checks of the other tests run either way."""
    if shutil.which("docker-compose"):
        command = ["docker-compose", "-f", str(COMPOSE), "config", "--quiet"]
    elif subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        command = ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"]
    else:
        command = None
    if command is not None:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    spec = compose()
    assert {k for k in spec if not k.startswith("x-")} <= {
        "services", "volumes", "networks", "configs", "secrets"}
    for name, service in spec["services"].items():
        assert set(service) <= SERVICE_FIELDS, (name, set(service) - SERVICE_FIELDS)
    named_volumes = {
        v.split(":")[0] for s in spec["services"].values() for v in s.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert named_volumes <= set(spec.get("volumes") or {})


def replicas(services: dict) -> list[str]:
    return sorted(name for name in services if name.startswith("s4serve-"))


def test_compose_builds_the_repository_dockerfile_and_scrapes_it():
    services = compose()["services"]
    assert len(replicas(services)) == 3
    build = services["s4serve-1"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == (
        REPO / "Dockerfile"
    )
    prometheus_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus_config["scrape_configs"]
    assert job["job_name"] == "s4serve"  # the alerts select job="s4serve"
    assert job["static_configs"][0]["targets"] == [f"{r}:8000" for r in replicas(services)]

    mounts = mount_targets(services["prometheus"])
    for rule_file in prometheus_config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts
    for source in mounts.values():
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source


def test_grafana_provisioning_matches_the_dashboard():
    grafana = compose()["services"]["grafana"]
    mounts = mount_targets(grafana)
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "s4serve.yaml").read_text())["providers"]
    dashboards_dir = DEPLOY / mounts[provider["options"]["path"]]
    dashboards = sorted(dashboards_dir.glob("*.json"))
    assert dashboards

    for path in dashboards:
        dashboard = json.loads(path.read_text())
        panel_ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(panel_ids) == len(set(panel_ids))
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
        for signal in ("sessions", "samples", "frame latency", "batch size", "step",
                       "errors", "predict latency"):
            assert signal in titles, signal


def test_sessions_wait_in_the_compose_redis():
    services = compose()["services"]
    for name in replicas(services):
        server = services[name]
        assert "redis" in services and "redis" in server["depends_on"]
        assert server["environment"]["S4SERVE_STORE"] == "redis://redis:6379/0"


def test_nginx_fronts_every_replica_with_the_shipped_config():
    services = compose()["services"]
    proxy = services["nginx"]
    assert "8000:8080" in proxy["ports"]
    assert set(proxy["depends_on"]) == set(replicas(services))
    mounts = mount_targets(proxy)
    assert mounts["/etc/nginx/s4serve/nginx.conf"] == "./nginx/nginx.conf"
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert sorted(re.findall(r"server (s4serve-\d+):8000", conf)) == replicas(services)
    assert "listen 8080;" in conf

