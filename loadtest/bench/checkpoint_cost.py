"""Cost of one checkpoint pass over 1000 in-process `motion` sessions (local directory and a
real redis-server), next to one batched step of the same sessions. Run alone:
`.venv/bin/python loadtest/bench/checkpoint_cost.py` (not yet part of `make bench`)."""
# ruff: noqa
import asyncio, shutil, subprocess, tempfile, time, statistics
import numpy as np, torch
from server.settings import Settings
from server.runtime import Runtime
from server.models import load_models
from server.checkpoints import Checkpointer
from server.protocol import StartOptions
from server.local_store import LocalDirectoryStore
from server.redis_store import RedisStore

class Owner:
    def frame_done(self,*a): pass
    def frame_failed(self,*a): pass
    def control_done(self,*a): pass
    def frames_dropped(self,*a): pass
    def kick(self,*a): pass

async def measure(store, label, n=1000):
    s = Settings(models=["model/zoo/motion"], max_sessions=2000, step_compiler="torchscript")
    rt = Runtime.create(s, store)
    rt.scheduler.start(asyncio.get_running_loop())
    rt.models = load_models(s)
    m = rt.models["motion"]
    sessions = [rt.manager.open(m, StartOptions(), Owner()) for _ in range(n)]
    ck = Checkpointer(rt.manager, 1.0)
    times = []
    for r in range(5):
        for x in sessions: x.stream.samples += 1
        t = time.perf_counter(); w = await ck.checkpoint(); times.append(time.perf_counter() - t)
        assert w == n
    # step cost of the same sessions for scale: one batched step of all n
    pool = m.pool
    idx = pool.index([x.stream.slot for x in sessions])
    u = torch.zeros(n, 6)
    st=[]
    for r in range(20):
        t=time.perf_counter(); f32,f64=pool.gather(idx); y,f32,f64=m.backend.step_flat(u,f32,f64,m.backend.rate_for(None)); pool.scatter(idx,f32,f64); st.append(time.perf_counter()-t)
    blob = len(rt.manager.blob(sessions[0], 1, pool.read(sessions[0].stream.slot)))
    print(f"{label}: {n} sessions, pass median {statistics.median(times)*1e3:.1f} ms (min {min(times)*1e3:.1f}), blob {blob} chars; one batched step of all {n}: {statistics.median(st)*1e3:.2f} ms")

if __name__ == "__main__":
    d = tempfile.mkdtemp()
    asyncio.run(measure(LocalDirectoryStore(d), "local"))
    port = 6391
    p = subprocess.Popen(["redis-server","--port",str(port),"--save","","--appendonly","no"],stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        asyncio.run(measure(RedisStore(f"redis://127.0.0.1:{port}/0", LocalDirectoryStore(d)), "redis"))
    finally:
        p.terminate()
