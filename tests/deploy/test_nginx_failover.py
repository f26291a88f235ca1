"""deploy/nginx/nginx.conf in front of 3 `s4serve serve` replicas sharing a real redis-server
(loadtest/cluster.py): 30 sessions stream through nginx with the client library; the replica
holding the most of them is SIGKILLed (or sent SIGTERM) mid-stream; each of its sessions
resumes on another replica and the client replays from the last checkpoint. Every session's
outputs equal `predict` over its whole input: no sample lost or answered twice."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from loadtest.cluster import Cluster, nginx_conf
from loadtest.failover import run_failover
from tests.server.conftest import model_dirs  # noqa: F401 (fixture)

SESSIONS, FRAME, FRAMES = 30, 4, 80


def test_the_shipped_config_takes_the_replicas_it_is_given():
    conf = nginx_conf([9001, 9002, 9003], 9000)
    assert conf.count("server 127.0.0.1:90") == 3 and "listen 127.0.0.1:9000;" in conf
    assert "hash $s4serve_affinity consistent;" in conf and "s4serve-1" not in conf
    with pytest.raises(ValueError):
        nginx_conf([9001], 9000)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
async def test_sessions_of_a_lost_replica_resume_on_another(model_dirs, tmp_path,  # noqa: F811
                                                             stop):
    env = dict(CHECKPOINT_INTERVAL="0.2", STEP_COMPILER="torchscript")
    inputs = np.random.default_rng(11).standard_normal(
        (SESSIONS, FRAMES * FRAME, 2)).astype(np.float32)
    with Cluster(model_dirs["seq"], replicas=3, env=env, scratch=tmp_path) as cluster:
        run = await run_failover(cluster, "seq", inputs, FRAME, pace_s=0.03, stop=stop)
    assert run.victim_sessions > 0
    for i, session in enumerate(run.sessions):
        assert session.outputs.shape == run.expected[i].shape, f"session {i}"
        np.testing.assert_allclose(session.outputs, run.expected[i], atol=1e-4,
                                   err_msg=f"session {i}")
    moved = sum(s.reconnects > 0 for s in run.sessions)
    assert moved >= run.victim_sessions
    assert run.resumed_elsewhere >= run.victim_sessions  # they went on over there
    if stop == signal.SIGTERM:  # drained: the state was handed over whole, nothing replayed
        assert sum(s.replayed for s in run.sessions) == 0
