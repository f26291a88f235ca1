// k6 streaming load for the s4serve WebSocket protocol (docs/protocol.md), a second opinion
// on the Python load tester's numbers. Each VU is one session: start -> started, then binary
// float32 frames of FRAME samples at RATE samples/s for DURATION seconds, then end.
//
//   .venv/bin/k6 run loadtest/k6/stream.js -e URL=http://127.0.0.1:8000 -e MODEL=motion \
//       -e SESSIONS=100 -e RATE=100 -e FRAME=1 -e DURATION=10
//
// Fails (non-zero exit) unless every frame got exactly one reply of the right size.
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { WebSocket } from 'k6/experimental/websockets';
import { setInterval, clearInterval, setTimeout, clearTimeout } from 'k6/timers';

const BASE = (__ENV.URL || 'http://127.0.0.1:8000').replace(/\/$/, '');
const MODEL = __ENV.MODEL || 'motion';
const SESSIONS = parseInt(__ENV.SESSIONS || '10', 10);
const RATE = parseFloat(__ENV.RATE || '100');
const FRAME = parseInt(__ENV.FRAME || '1', 10);
const DURATION = parseFloat(__ENV.DURATION || '10');
const D_INPUT = parseInt(__ENV.D_INPUT || '1', 10);
const DRAIN_MS = parseFloat(__ENV.DRAIN || '10') * 1000;
const WS_URL = BASE.replace(/^http/, 'ws') + `/v1/models/${MODEL}/stream`;

const frameLatency = new Trend('s4_frame_latency', true);
const framesSent = new Counter('s4_frames_sent');
const framesAnswered = new Counter('s4_frames_answered');
const badReplies = new Counter('s4_bad_replies');

export const options = {
  scenarios: {
    stream: {
      executor: 'per-vu-iterations',
      vus: SESSIONS,
      iterations: 1,
      maxDuration: `${Math.ceil(DURATION + DRAIN_MS / 1000 + 30)}s`,
    },
  },
  thresholds: {
    checks: ['rate==1.0'],
    s4_bad_replies: ['count==0'],
  },
};

function makeFrame(k, dInput) {
  // A sine per session, channel-interleaved float32, like the Python tool's synthetic signal.
  const values = new Float32Array(FRAME * dInput);
  for (let i = 0; i < FRAME; i++) {
    for (let c = 0; c < dInput; c++) {
      values[i * dInput + c] = 0.6 * Math.sin(0.05 * (k * FRAME + i) + __VU + c);
    }
  }
  return values.buffer;
}

export default function () {
  const ws = new WebSocket(WS_URL);
  ws.binaryType = 'arraybuffer';
  const sentAt = [];
  let sent = 0;
  let answered = 0;
  let dInput = D_INPUT;
  let dOutput = null;
  let ticker = null;
  let started = false;
  let drainTimer = null;
  let ended = false;

  const finish = () => {
    if (ticker !== null) clearInterval(ticker);
    ticker = null;
    ws.send(JSON.stringify({ type: 'end' }));
    drainTimer = setTimeout(() => ws.close(), DRAIN_MS);
  };

  ws.onopen = () => ws.send(JSON.stringify({ type: 'start', dtype: 'float32', output: 'every' }));

  ws.onmessage = (event) => {
    if (typeof event.data !== 'string') {
      const t = sentAt.shift();
      const size = event.data.byteLength;
      if (t === undefined || dOutput === null || size !== FRAME * dOutput * 4) {
        badReplies.add(1);
        return;
      }
      answered += 1;
      framesAnswered.add(1);
      frameLatency.add(Date.now() - t);
      return;
    }
    const msg = JSON.parse(event.data);
    if (msg.type === 'started') {
      started = true;
      dInput = msg.d_input || dInput;
      dOutput = msg.d_output;
      const periodMs = (1000 * FRAME) / RATE;
      ticker = setInterval(() => {
        sentAt.push(Date.now());
        ws.send(makeFrame(sent, dInput));
        sent += 1;
        framesSent.add(1);
      }, periodMs);
      setTimeout(finish, DURATION * 1000);
    } else if (msg.type === 'end') {
      check(msg, {
        'started': () => started,
        'one reply per frame': () => answered === sent && sentAt.length === 0,
        'server consumed every sample': (m) => m.samples === sent * FRAME,
      });
      ended = true;
      // The server closes with 1000 after `end` (docs/protocol.md); closing here as well races its close
      // frame ("websocket: close sent"). Close ourselves only if it has not within a second.
      if (drainTimer !== null) clearTimeout(drainTimer);
      drainTimer = setTimeout(() => ws.close(), 1000);
    } else if (msg.type === 'error') {
      badReplies.add(1);
      sentAt.shift();
    }
  };

  ws.onclose = () => {
    if (drainTimer !== null) clearTimeout(drainTimer);
    drainTimer = null;
  };

  ws.onerror = (e) => {
    console.error(`websocket error: ${e.error}`);
    // After the session's `end` every reply has been counted; a closing-handshake error is not one.
    if (!ended) badReplies.add(1);
  };
}
