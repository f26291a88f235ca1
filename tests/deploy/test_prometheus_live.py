"""A real Prometheus scrapes a real `s4serve serve`; every PromQL expression of the Grafana
dashboard and of the alert rules must evaluate without error and find data."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
import yaml

from tests.deploy.conftest import DEPLOY, VENV_BIN, load_deploy_script, tool

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "s4serve.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_SECONDS = 1
# Grafana fills these in before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$model": ".*"}
# A threshold as the alert rules write it: `<op> <number>` (see the note in alerts.yml).
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*-?\d+(\.\d+)?(e-?\d+)?(?=\s*(\)|\bor\b|$))")

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, what: str, timeout: float = 60.0, process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}")
        try:
            value = predicate()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("served")
    model_dir = load_deploy_script("make_test_model").make_test_model(root / "smoke")
    port = free_port()
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [str(VENV_BIN / "s4serve"), "serve", "--model", str(model_dir), "--port", str(port),
         "--snapshot-dir", str(root / "sessions")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200,
                 "s4serve /readyz", process=process)
        yield url
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="module")
def prometheus_url(server_url, tmp_path_factory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("prometheus")
    # The shipped config, pointed at the test server and sped up.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_SECONDS}s",
                            evaluation_interval=f"{SCRAPE_SECONDS}s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    job["static_configs"] = [{"targets": [server_url.removeprefix("http://")]}]
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = (root / "prometheus.log").open("w")
    process = subprocess.Popen(
        [tool("prometheus"), f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # until its storage is open Prometheus answers 503 "Service Unavailable", not JSON
        wait_for(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200,
                 "prometheus /-/ready", process=process)
        wait_for(lambda: query(url, 'up{job="s4serve"} == 1'), "the first scrape",
                 process=process)
        yield url
    finally:
        stop(process)
        log.close()


def query(prometheus: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = answer.json()
    assert body["status"] == "success", f"{expr!r}: {body.get('error')}"
    return body["data"]["result"]


def server_samples(server: str) -> float:
    text = httpx.get(server + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("s4serve_samples_total{"))


async def send_bad_frame(ws_url: str) -> dict:
    """A binary frame whose length is not a multiple of d_input × 4: rejected, counted."""
    async with websockets.connect(ws_url) as ws:
        await ws.send(json.dumps({"type": "start"}))
        json.loads(await ws.recv())
        await ws.send(b"\x00" * 5)
        reply = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "end"}))
        await ws.recv()
    return reply


def put_traffic(server: str, prometheus: str) -> None:
    """Streams, predicts and errors, twice, each time until Prometheus has scraped the result,
    so that every rate() sees the counters move."""
    smoke = load_deploy_script("smoke_client")
    for round_ in range(2):
        result = smoke.run_smoke(server, timeout=30, seed=round_)
        ws_url = server.replace("http", "ws", 1) + f"/v1/models/{result.model}/stream"
        assert asyncio.run(send_bad_frame(ws_url))["type"] == "error"
        bad = httpx.post(f"{server}/v1/models/{result.model}/predict",
                         json={"inputs": [[[0.0] * (result.d_input + 1)]]}, timeout=10)
        assert bad.status_code == 400
        expected = server_samples(server)
        wait_for(
            lambda e=expected: (r := query(prometheus, "sum(s4serve_samples_total)"))
            and float(r[0]["value"][1]) == e,
            "Prometheus to scrape the traffic",
        )


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((f"panel {panel['title']!r} {target['refId']}", expr))
    for variable in dashboard["templating"]["list"]:
        # label_values(METRIC, LABEL) is Grafana's; the metric itself must have series.
        metric = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"]).group(1)
        found.append((f"variable ${variable['name']}", metric))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [(f"alert {rule['alert']}", rule["expr"]) for g in groups for rule in g["rules"]]


@pytest.fixture(scope="module")
def scraped(server_url, prometheus_url) -> str:
    put_traffic(server_url, prometheus_url)
    return prometheus_url


def test_threshold_pattern_strips_every_alert_threshold():
    # Guards the signal check below: a threshold left in would let an empty result pass.
    for name, expr in alert_expressions():
        signal = THRESHOLD.sub("", expr)
        assert signal != expr and not re.search(r"[<>]|==", signal), (name, signal)


def test_every_dashboard_expression_finds_data(scraped):
    empty = [(name, expr) for name, expr in dashboard_expressions() if not query(scraped, expr)]
    assert not empty, f"expressions without data: {empty}"


def test_dashboard_rates_see_the_traffic(scraped):
    (samples_panel_expr,) = [e for n, e in dashboard_expressions() if "Samples per second" in n]
    rates = [float(series["value"][1]) for series in query(scraped, samples_panel_expr)]
    assert any(rate > 0 for rate in rates), rates


def test_every_alert_expression_evaluates_and_its_signal_finds_data(scraped):
    for name, expr in alert_expressions():
        query(scraped, expr)  # raises on a PromQL error
        assert query(scraped, THRESHOLD.sub("", expr)), f"{name}: no data behind {expr!r}"
    # The healthy server under test must not fire the availability alert.
    assert not query(scraped, dict(alert_expressions())["alert S4serveDown"])


def test_prometheus_loads_and_evaluates_every_rule(scraped):
    def rules_evaluated():
        body = httpx.get(f"{scraped}/api/v1/rules", timeout=10).json()
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("0001") is False for r in rules):
            return rules
        return None

    rules = wait_for(rules_evaluated, "every rule to be evaluated once", timeout=30)
    assert {r["name"] for r in rules} == {n.removeprefix("alert ") for n, _ in alert_expressions()}
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken


def test_dashboard_and_alerts_use_only_contract_metrics():
    internals = (Path(__file__).resolve().parents[2] / "docs" / "internals.md").read_text()
    contract = set(re.findall(r"^\| `(s4serve_\w+)`", internals, flags=re.MULTILINE))
    assert contract, "metric table not found in docs/internals.md"
    used = set()
    for _, expr in dashboard_expressions() + alert_expressions():
        used |= set(re.findall(r"s4serve_\w+", expr))
    histogram_parts = re.compile(r"_(bucket|sum|count)$")
    unknown = {m for m in used if histogram_parts.sub("", m) not in contract and m not in contract}
    # Regex selectors such as s4serve_(frames|requests)_total appear as fragments; none today.
    assert not unknown, unknown
