"""The browser demo end to end: headless Chromium (Debian's, driven by Playwright) opens `/`
with an API key in `?token=`, streams its microphone (a fake device playing a spoken digit
from a WAV file) to the shipped `digits` model, and shows that digit."""

from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.data.digits import WORDS, plan
from model.data.speech import read_wav, synthesize
from tests.server.conftest import ServerThread, make_settings

ZOO = Path(__file__).resolve().parents[2] / "model" / "zoo"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    settings = make_settings({"digits": ZOO / "digits"}, tmp_path_factory.mktemp("demo"),
                             api_keys=["demo-key"], step_compiler="torchscript")
    with ServerThread(settings) as running:
        yield running


def spoken_digit(server: ServerThread, folder: Path) -> tuple[str, Path]:
    """A held-out voice saying a digit that the model gets right from a 1 s window, as the
    WAV the fake microphone plays (looped)."""
    for clip in plan("test", renditions=1)[:30]:
        word = synthesize(clip.utterance, folder / f"{clip.utterance.file_stem()}.wav", 16000)
        samples, _ = read_wav(word)
        window = np.zeros(16000, np.float32)
        window[4000:4000 + min(len(samples), 12000)] = samples[:12000]
        reply = httpx.post(f"{server.url}/v1/models/digits/predict", timeout=60,
                           headers={"Authorization": "Bearer demo-key"},
                           json={"inputs": window[None, :, None].tolist(), "outputs": "last"})
        logits = np.array(reply.json()["outputs"])[0, -1]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        if int(p.argmax()) == clip.target and p.max() > 0.8:
            path = folder / "mic.wav"
            with wave.open(str(path), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes((np.clip(window, -1, 1) * 32767).astype("<i2").tobytes())
            return WORDS[clip.target], path
    raise AssertionError("no held-out clip was recognised confidently")


def test_browser_demo_shows_the_spoken_digit(demo_server, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (make test installs it)"
    digit, wav = spoken_digit(demo_server, tmp_path)
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.goto(f"{demo_server.url}/?token=demo-key")
            page.wait_for_selector("#model option[value=digits]", state="attached")
            page.click("#start")
            page.wait_for_function(
                f"document.getElementById('top').dataset.label === '{digit}'", timeout=30_000)
            assert "latency mean" in page.inner_text("#latency")
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / "demo.png"))
        finally:
            browser.close()
    if os.environ.get("DEMO_SCREENSHOT"):  # how docs/demo.png is made
        shutil.copy(tmp_path / "demo.png", os.environ["DEMO_SCREENSHOT"])
