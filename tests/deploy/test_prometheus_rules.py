"""Prometheus config and alert rules: promtool checks and the rule unit tests."""

from __future__ import annotations

import subprocess

import yaml

from tests.deploy.conftest import DEPLOY, tool

PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120,
                          cwd=PROMETHEUS)


def test_config_is_valid():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_passing_unit_test():
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests
    result = promtool("test", "rules", *(str(t) for t in tests))
    assert result.returncode == 0, result.stdout + result.stderr

    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    fired, quiet = set(), set()
    for path in tests:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts == {"S4serveDown", "S4serveFrameLatencyP99High", "S4serveSessionLimitNear",
                      "S4serveErrorRateHigh"}
    # Each alert is tested both firing and staying quiet.
    assert fired == alerts and quiet == alerts
