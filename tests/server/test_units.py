"""Unit checks of the pieces that need no server: state blobs, the store, settings, auth, CLI."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.auth import Guard
from server.errors import ServeError
from server.settings import Settings
from server.state_blob import StateRecord, TensorSpec, decode_state, encode_state
from server.store import LocalDirectoryStore, SessionRecord

SPEC = [TensorSpec("layer0.re", (4, 2), "float32"), TensorSpec("pool.count", (1,), "float64")]


def record(**overrides) -> StateRecord:
    fields = dict(model="m", version="2", samples=7,
                  tensors=[np.arange(8, dtype=np.float32).reshape(4, 2), np.array([7.0])],
                  names=["layer0.re", "pool.count"], sample_rate=100.0)
    fields.update(overrides)
    return StateRecord(**fields)


def test_state_blob_round_trip_and_checks():
    back = decode_state(encode_state(record()))
    back.check("m", "2", SPEC)
    assert back.samples == 7 and back.sample_rate == 100.0
    np.testing.assert_array_equal(back.tensors[0], record().tensors[0])
    with pytest.raises(ServeError, match="version"):
        back.check("m", "3", SPEC)
    with pytest.raises(ServeError, match="layout"):
        back.check("m", "2", [SPEC[0], TensorSpec("pool.count", (2,), "float64")])


@pytest.mark.parametrize("blob", [
    "!!", base64.b64encode(b"XXXX").decode(), encode_state(record())[:-8], 42,
    base64.b64encode(base64.b64decode(encode_state(record())) + b"\0").decode(),
])
def test_malformed_blobs_are_bad_state(blob):
    with pytest.raises(ServeError) as caught:
        decode_state(blob)
    assert caught.value.code == "bad_state"


def test_local_store_take_once_and_expiry(tmp_path):
    now = [1000.0]
    store = LocalDirectoryStore(tmp_path, clock=lambda: now[0])
    item = SessionRecord("id", "m", "float32", None, "every", 3, "blob")
    store.put("../../etc/passwd", item, ttl=10)
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())  # tokens never name paths
    assert store.take("../../etc/passwd") == SessionRecord(**{**item.__dict__, "epoch": 1})
    assert store.take("../../etc/passwd") is None
    store.put("t", item, ttl=10)
    now[0] += 11
    assert store.purge_expired() == 1 and store.take("t") is None


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("S4SERVE_API_KEYS", "a, b")
    monkeypatch.setenv("S4SERVE_MODELS", f"{tmp_path}/x,{tmp_path}/y")
    monkeypatch.setenv("S4SERVE_BACKENDS", '{"speech": "onnx"}')
    monkeypatch.setenv("S4SERVE_MAX_SESSIONS", "5")
    settings = Settings()
    assert settings.api_keys == ["a", "b"] and settings.max_sessions == 5
    assert settings.model_dirs() == [tmp_path / "x", tmp_path / "y"]
    assert settings.backend_for("speech") == "onnx" and settings.backend_for("x") == "torch"


def test_guard():
    guard = Guard(["secret"], ["https://a.example"])
    assert guard.key_ok({"authorization": "Bearer secret"})
    assert guard.key_ok({}, {"token": "secret"})
    assert not guard.key_ok({"authorization": "Basic secret"})
    assert not guard.key_ok({})
    assert guard.origin_ok({"origin": "https://a.example/"}) and guard.origin_ok({})
    assert not guard.origin_ok({"origin": "https://b.example"})
    assert Guard([], []).key_ok({})


def test_serve_without_models_exits_with_a_message(tmp_path):
    env_free = {"PATH": "/usr/bin:/bin", "S4SERVE_ZOO_DIR": str(tmp_path)}
    done = subprocess.run([str(Path(sys.executable).with_name("s4serve")), "serve"],
                          env=env_free, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no models to serve" in done.stderr


def test_observe_many_matches_one_observe_each():
    from prometheus_client import CollectorRegistry, Histogram

    from server.metrics import observe_many

    values = np.array([0.0, 0.0005, 0.0007, 0.001, 0.3, 2.0, 99.0])
    registry = CollectorRegistry()
    one = Histogram("one", "x", buckets=(0.0005, 0.001, 0.5, 5.0), registry=registry)
    many = Histogram("many", "x", buckets=(0.0005, 0.001, 0.5, 5.0), registry=registry)
    for v in values:
        one.observe(float(v))
    observe_many(many, values)

    def samples(name):
        return [(s.name.removeprefix(name), s.labels.get("le"), s.value)
                for m in registry.collect() if m.name == name for s in m.samples]

    assert samples("one") == samples("many")
