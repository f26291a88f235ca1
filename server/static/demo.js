// s4serve live demo: one streaming session from the microphone or a synthetic sensor signal,
// class probabilities plotted as the replies arrive. No libraries, no CDN.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const headers = token ? { Authorization: `Bearer ${token}` } : {};
const $ = (id) => document.getElementById(id);
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
const HISTORY = 300;

let models = {};
let run = null; // the running session: {ws, stop(), ...}

function showError(message) { $("error").textContent = message || ""; }

async function loadModels() {
  const reply = await fetch("/v1/models", { headers });
  if (!reply.ok) {
    const body = await reply.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `HTTP ${reply.status}`);
  }
  const list = (await reply.json()).models;
  models = Object.fromEntries(list.map((m) => [m.name, m]));
  $("model").innerHTML = list.map((m) => `<option value="${m.name}">${m.name}</option>`).join("");
  const audio = list.find((m) => m.d_input === 1);
  if (audio) $("model").value = audio.name;
  describe();
}

function describe() {
  const m = models[$("model").value];
  if (!m) return;
  const audio = m.d_input === 1;
  $("source").value = audio ? "mic" : "synthetic";
  $("pattern-label").style.display = audio ? "none" : "";
  $("info").textContent = `${m.layer.toUpperCase()} ${m.task}, ${m.n_layers} layers × ` +
    `${m.d_model}, N=${m.d_state}; ${m.d_input} channel(s) in` +
    (m.sample_rate ? ` at ${m.sample_rate} Hz` : "") +
    (m.labels ? `; classes: ${m.labels.join(", ")}` : "");
  $("state").textContent = `state per session: ${(m.state_bytes / 1024).toFixed(1)} KiB`;
}

function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

function draw(history, labels) {
  const canvas = $("plot");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (!history.length) return;
  const k = history[0].length;
  for (let c = 0; c < k; c++) {
    g.strokeStyle = COLORS[c % COLORS.length];
    g.lineWidth = 2;
    g.beginPath();
    history.forEach((p, i) => {
      const x = (i / (HISTORY - 1)) * canvas.width;
      const y = canvas.height - 4 - p[c] * (canvas.height - 8);
      if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
    });
    g.stroke();
  }
  $("legend").innerHTML = (labels || [...Array(k).keys()].map((i) => `output ${i}`))
    .map((name, c) => `<span style="color:${COLORS[c % COLORS.length]}">■ ${name}</span>`).join("");
}

// A synthetic 6-axis watch signal (accelerometer + gyroscope) for sensor models.
function syntheticSample(pattern, t, channels) {
  const out = new Float32Array(channels);
  const f = { standing: 0, walking: 2, running: 3, badminton: 1.2 }[pattern];
  const amp = { standing: 0.05, walking: 1.5, running: 4, badminton: 3 }[pattern];
  const burst = pattern === "badminton" ? (Math.sin(2 * Math.PI * 0.4 * t) > 0.6 ? 1 : 0.1) : 1;
  for (let c = 0; c < channels; c++) {
    const wave = Math.sin(2 * Math.PI * f * t + c * 0.9);
    out[c] = (c === 2 ? 9.8 : 0) * (c < 3 ? 1 : 0) + amp * burst * wave + 0.05 * (Math.random() - 0.5);
  }
  return out;
}

async function start() {
  showError("");
  const m = models[$("model").value];
  const source = $("source").value;
  let audio = null;
  let rate = m.sample_rate || 100;
  if (source === "mic") {
    const media = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1 } });
    let ctx;
    try { ctx = new AudioContext({ sampleRate: rate }); } catch (e) { ctx = new AudioContext(); }
    rate = ctx.sampleRate; // what the samples really are; the server rescales dt to it
    audio = { media, ctx, input: ctx.createMediaStreamSource(media),
      node: ctx.createScriptProcessor(2048, 1, 1) };
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/models/${m.name}/stream${query}`);
  ws.binaryType = "arraybuffer";
  const sent = []; // send times of the frames in flight
  const latencies = [];
  const history = [];
  let samples = 0, replies = 0, began = performance.now(), timer = null;
  run = { ws, stop() {
    if (timer) clearInterval(timer);
    if (audio) { audio.node.disconnect(); audio.input.disconnect();
      audio.media.getTracks().forEach((t) => t.stop()); audio.ctx.close(); }
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
    $("start").disabled = false; $("stop").disabled = true; run = null;
  } };
  $("start").disabled = true; $("stop").disabled = false;

  function send(buffer, rows) {
    if (ws.readyState !== WebSocket.OPEN) return;
    sent.push(performance.now());
    ws.send(buffer);
    samples += rows;
  }

  ws.onopen = () => ws.send(JSON.stringify({ type: "start", output: "last",
    dtype: audio ? "int16" : "float32", sample_rate: rate }));
  ws.onmessage = (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "started") {
        $("rate").textContent = `streaming at ${rate} Hz`;
        if (audio) {
          audio.node.onaudioprocess = (e) => {
            const x = e.inputBuffer.getChannelData(0);
            const pcm = new Int16Array(x.length);
            for (let i = 0; i < x.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, x[i] * 32768));
            send(pcm.buffer, x.length);
          };
          audio.input.connect(audio.node);
          audio.node.connect(audio.ctx.destination);
        } else {
          let t = 0;
          timer = setInterval(() => {
            send(syntheticSample($("pattern").value, t, m.d_input).buffer, 1);
            t += 1 / rate;
          }, 1000 / rate);
        }
      } else if (msg.type === "error") {
        sent.shift();
        showError(`${msg.code}: ${msg.message}`);
      }
      return;
    }
    const latency = performance.now() - sent.shift();
    latencies.push(latency);
    if (latencies.length > 100) latencies.shift();
    replies += 1;
    const logits = Array.from(new Float32Array(event.data));
    const p = m.labels ? softmax(logits) : logits;
    history.push(p);
    if (history.length > HISTORY) history.shift();
    if (m.labels) {
      const best = p.indexOf(Math.max(...p));
      $("top").textContent = `${m.labels[best]} (${(100 * p[best]).toFixed(0)}%)`;
      $("top").dataset.label = m.labels[best];
    }
    const mean = latencies.reduce((a, b) => a + b, 0) / latencies.length;
    $("latency").textContent = `latency mean ${mean.toFixed(1)} ms, max ${Math.max(...latencies).toFixed(1)} ms`;
    $("samples").textContent = `${samples} samples, ${(replies / ((performance.now() - began) / 1000)).toFixed(1)} replies/s`;
    draw(history, m.labels);
  };
  ws.onclose = (event) => {
    if (run && run.ws === ws) run.stop();
    if (event.code !== 1000) showError(`connection closed ${event.code} ${event.reason}`);
  };
}

$("model").onchange = describe;
$("start").onclick = () => start().catch((e) => { showError(String(e)); if (run) run.stop(); });
$("stop").onclick = () => run && run.stop();
loadModels().catch((e) => showError(`cannot list models: ${e.message}`));
