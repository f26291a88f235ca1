"""Unit checks of the pieces that need no server: state blobs, the store, settings, auth, CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.fused import StateLayout
from server.auth import Guard
from server.errors import ServeError
from server.local_store import LocalDirectoryStore
from server.replies import ReplyRing
from server.settings import Settings
from server.slabs import HEAD, parse
from server.state_blob import (
    BlobWriter,
    StateRecord,
    TensorSpec,
    decode_state,
    encode_state,
    encode_state_raw,
)
from server.store import _RECORD, SessionRecord, pack_record, unpack_record

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


@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_blob_writer_writes_what_encode_state_writes(secret):
    """Blobs cut from flat rows for many sessions at once equal the one-by-one encoding, with
    float32 and float64 tensors interleaved, two sample rates and a signature."""
    spec = [("a", (2, 3), "float32"), ("n", (2,), "float64"), ("b", (4,), "float32")]
    layout = StateLayout.of(spec)
    rng = np.random.default_rng(0)
    flat32 = rng.standard_normal((3, layout.width32)).astype(np.float32)
    flat64 = rng.standard_normal((3, layout.width64))
    samples, rates = [0, 17, 123456789], [100.0, None, 100.0]
    heads, parts, tails = BlobWriter("m", "2", layout, secret).blob_rows(
        samples, rates, flat32, flat64)
    assert len(parts) == 3  # a, n, b: the float32 tensors are not neighbours in blob order
    made = [heads[i] + b"".join(part[i].tobytes() for part in parts) + tails[i]
            for i in range(3)]
    for i in range(3):
        a, n, b = flat32[i, :6].reshape(2, 3), flat64[i], flat32[i, 6:]
        expected = encode_state_raw(StateRecord("m", "2", samples[i], [a, n, b], ["a", "n", "b"],
                                                rates[i]), secret)
        assert made[i] == expected
        back = decode_state(base64.b64encode(made[i]).decode(), secret)
        assert back.samples == samples[i]
        np.testing.assert_array_equal(back.tensors[1], n)


def test_reply_ring_keeps_the_last_replies_within_its_bytes():
    ring = ReplyRing(limit=10)
    for payload in (b"aaaa", "bbbb", b"cccc"):
        ring.add(payload)
    assert ring.count == 3
    assert ring.since(3) == [] and ring.since(2) == [b"cccc"] and ring.since(1) == ["bbbb", b"cccc"]
    assert ring.since(0) is None  # "aaaa" fell out (12 bytes > 10)
    assert ring.since(4) is None  # more than were sent
    again = ReplyRing(10, ring.count, ReplyRing.unpack(ring.pack()))
    assert again.since(1) == ["bbbb", b"cccc"]
    off = ReplyRing(limit=0)
    off.add(b"x")
    assert off.count == 1 and off.since(0) is None and off.since(1) == []


def test_session_records_pack_and_unpack():
    ring = ReplyRing(1000, 7, [b"\x01\x02", '{"type": "reset", "samples": 0}']).pack()
    item = SessionRecord("id", "m", "float32", 8000.0, "last", 9, b"\0raw\xff", live=True,
                         replies=7, ring=ring)
    raw = pack_record(item, 12.5, seq=4)
    back, expires_at, seq = unpack_record(raw + b"old bytes", epoch=3)
    assert back == SessionRecord(**{**item.__dict__, "epoch": 3}) and (expires_at, seq) == (12.5, 4)
    for bad in (raw[:-1], raw[:40] + b"X" + raw[41:], b"S4SB" + bytes(40)):
        with pytest.raises(ValueError):
            unpack_record(bad)


def test_a_record_in_pieces_is_the_same_record():
    """A checkpoint hands the store the state blob in pieces (written without joining): the
    bytes are those of the joined record, and its options are the JSON list they always were
    (records written before the meta template still read back)."""
    whole = SessionRecord("id-\u00e9", "m", "float64", 16000.0, "all", 123, b"headbody+tag",
                          live=False, replies=2, ring=b"ring")
    pieces = SessionRecord(**{**whole.__dict__, "state": (b"head", memoryview(b"body"), b"+tag")})
    assert pack_record(pieces, 1.0, 2) == pack_record(whole, 1.0, 2)
    raw = pack_record(whole)
    meta_len = _RECORD.unpack_from(raw)[3]  # magic, expires_at, seq, then the meta's length
    fields = ["id-\u00e9", "m", "float64", 16000.0, "all", 123, False, 2]
    meta = raw[_RECORD.size:_RECORD.size + meta_len]
    assert json.loads(meta) == fields
    assert meta == json.dumps(fields, separators=(",", ":")).encode()


def test_local_store_survives_a_write_cut_short(tmp_path):
    """A record whose write was cut (a SIGKILL mid-write, or read while it lands) fails its
    checksum: take returns the previous whole record from the other file."""
    store = LocalDirectoryStore(tmp_path)
    for samples in (1, 2):
        store.put("t", SessionRecord("id", "m", "float32", None, "every", samples, b"x" * 99),
                  ttl=30)
    halves = [(slab, i) for slab in store._slabs.each() for i in range(len(slab.halves))
              if slab.head_of(i) is not None]
    assert len(halves) == 2
    newest = max(halves, key=lambda h: parse(bytes(h[0].at(h[1])))[3])
    newest[0].halves[newest[1], HEAD + 40] ^= 1  # a byte of the newer record's state
    assert store.take("t").samples == 1


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
    item = SessionRecord("id", "m", "float32", None, "every", 3, b"blob")
    store.put("../../etc/passwd", item, ttl=10)
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())  # tokens never name paths
    assert store.take("../../etc/passwd") == SessionRecord(**{**item.__dict__, "epoch": 1})
    assert store.take("../../etc/passwd") is None
    store.put("t", item, ttl=10)
    now[0] += 11
    assert store.purge_expired() == 1 and store.take("t") is None
    store.put("u", item, ttl=10)
    assert store.take("u") is not None
    assert not store.put("u", item, ttl=10, epoch=0)  # an owner that lost the session
    assert store.records() == []  # its write went where nobody reads, and is let go at once


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("S4SERVE_API_KEYS", "a, b")
    monkeypatch.setenv("S4SERVE_MODELS", f"{tmp_path}/x,{tmp_path}/y")
    monkeypatch.setenv("S4SERVE_BACKENDS", '{"speech": "onnx"}')
    monkeypatch.setenv("S4SERVE_MAX_SESSIONS", "5")
    monkeypatch.setenv("S4SERVE_ONNX_THREADS", "2")
    monkeypatch.setenv("S4SERVE_ONNX_CACHE", "")  # empty: not set (not the current directory)
    settings = Settings()
    assert settings.api_keys == ["a", "b"] and settings.max_sessions == 5
    assert settings.onnx_threads == 2 and settings.onnx_cache is None
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


def test_predict_passes_fit_the_memory_bound_and_the_pass_size():
    from server.predict_job import Limits

    mb = 1 << 20
    # 256 MB among 2 threads, 32 MB a pass: passes of 32 MB at most
    assert Limits(1, memory_bytes=256 * mb, threads=2, pass_bytes=32 * mb).pass_size(3 * mb) == 10
    # 40 MB among 4 threads: 10 MB each, below the pass size
    assert Limits(1, memory_bytes=40 * mb, threads=4, pass_bytes=32 * mb).pass_size(3 * mb) == 3
    # a sequence above both still runs, alone; an unknown size runs the batch whole
    assert Limits(1, memory_bytes=40 * mb, threads=4).pass_size(95 * mb) == 1
    assert Limits(1).pass_size(0) is None


def test_predict_threads_default_to_the_cores_shared_among_the_workers(tmp_path):
    from server.predict_job import Limits
    from server.workers import cpu_cores

    def limits(**fields):
        return Limits.of(Settings(**fields))

    assert limits(predict_workers=1).threads == cpu_cores()
    assert limits(predict_workers=0).threads == cpu_cores()  # a thread of the server
    assert limits(predict_workers=64).threads == 1
    assert limits(predict_threads=3).threads == 3
