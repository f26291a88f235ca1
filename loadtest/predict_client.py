"""POST /v1/models/{name}/predict from the client side (npy or JSON bodies)."""

from __future__ import annotations

import io

import httpx
import numpy as np

NPY = "application/x-npy"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


async def predict(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    inputs: np.ndarray,
    *,
    body: str = "npy",
    sample_rate: float | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> tuple[int, np.ndarray | None, str | None]:
    """(HTTP status, outputs (batch, length, d_output) or None, error code or None)."""
    url = f"{base_url}/v1/models/{model}/predict"
    hdrs = dict(headers or {})
    if body == "npy":
        params = {"outputs": "all"}
        if sample_rate is not None:
            params["sample_rate"] = str(sample_rate)
        hdrs.update({"Content-Type": NPY, "Accept": NPY})
        resp = await client.post(
            url, content=npy_bytes(inputs), params=params, headers=hdrs, timeout=timeout_s
        )
    else:
        payload: dict = {"inputs": inputs.tolist(), "outputs": "all"}
        if sample_rate is not None:
            payload["sample_rate"] = sample_rate
        resp = await client.post(url, json=payload, headers=hdrs, timeout=timeout_s)
    if resp.status_code != 200:
        try:
            code = resp.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = f"http_{resp.status_code}"
        return resp.status_code, None, code
    if resp.headers.get("content-type", "").startswith(NPY):
        return 200, np.load(io.BytesIO(resp.content), allow_pickle=False), None
    return 200, np.asarray(resp.json()["outputs"], dtype=np.float32), None
