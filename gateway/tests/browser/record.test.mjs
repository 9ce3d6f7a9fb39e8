// Session recording and playback in Chromium (node --test): a real Xvnc desktop viewed in
// noVNC through `vncgate serve --record DIR`, then `vncgate replay FILE --listen ADDR` opened in
// noVNC: the canvas shows the recorded desktop (its colour then, not the desktop's colour now).
// Started by scripts/browser-test.sh (VNCGATE_BIN, VIEWER_DIR; see novnc.test.mjs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { connect as tcpConnect } from 'node:net';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  BIN, freePort, hex, launchChromium, near, serveViewer, setRoot, sleep, startXvnc, stop,
  track, until, viewerConnected,
} from './harness.mjs';

const SCREEN = { w: 640, h: 480 };
const RECORDED = [0xcc, 0x33, 0x66]; // the desktop while recorded
const LATER = [0x22, 0xaa, 0x44]; // the desktop at playback time

/** Whether 127.0.0.1:port accepts a connection (the replay listens, sends nothing until asked). */
function accepts(port) {
  return new Promise((resolve) => {
    const s = tcpConnect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}

/** A child whose stderr is kept (the gateway and the replay log there). */
function spawnLogged(cmd, args) {
  const child = track(spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
  child.out = '';
  child.err = '';
  child.stdout.on('data', (d) => { child.out += d; });
  child.stderr.on('data', (d) => { child.err += d; });
  return child;
}

let tmp, xvnc, gate, gateBase, replay, http, httpPort, browser;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'vncgate-record-'));
  xvnc = await startXvnc(SCREEN, 400 + (process.pid % 200));
  setRoot(xvnc.display, RECORDED);
  gate = spawnLogged(BIN, ['serve', '--listen', '127.0.0.1:0', '--workers', '1',
    '--route', `rec=127.0.0.1:${xvnc.port}`, '--allow-upstream', '127.0.0.0/8',
    '--record', join(tmp, 'rec'), '--record-input']);
  await until('the gateway to listen', () => /listening on ws:\/\/[0-9.:]+\//.test(gate.out));
  gateBase = gate.out.match(/listening on (ws:\/\/[0-9.:]+)\//)[1];
  ({ server: http, port: httpPort } = await serveViewer());
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  http?.close();
  await stop(replay);
  await stop(gate);
  await stop(xvnc?.child);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

/** Opens the viewer page on `wsUrl`; resolves once noVNC shows a SCREEN-sized canvas whose
 * sampled pixels are all `rgb`. */
async function viewAndSee(wsUrl, rgb) {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${encodeURIComponent(wsUrl)}`);
  await viewerConnected(page);
  let last = null;
  await until(`the canvas to show ${hex(rgb)}`, async () => {
    last = await page.evaluate(() => {
      const c = document.querySelector('#screen canvas');
      if (!c) return null;
      const g = c.getContext('2d');
      const at = [[20, 20], [c.width - 20, c.height - 20], [c.width >> 1, c.height >> 1], [c.width - 30, 40]];
      return { w: c.width, h: c.height, px: at.map(([x, y]) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3))) };
    });
    return last && last.w === SCREEN.w && last.h === SCREEN.h && last.px.every((p) => near(p, rgb, 8));
  }).catch((e) => { throw new Error(`${e.message}: ${JSON.stringify(last)}`); });
  return page;
}

test('a recorded Xvnc session plays back in noVNC showing the recorded desktop', async () => {
  // Record: view the live desktop, then leave.
  const live = await viewAndSee(`${gateBase}/vnc/rec`, RECORDED);
  await sleep(500);
  await live.evaluate(() => window.rfb.disconnect());
  await live.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'));
  await live.close();
  await until('the recording to end', () => gate.err.includes('recording ended'));
  assert.match(gate.err, /recording ended.*result="complete"/);
  const files = (await readdir(join(tmp, 'rec'))).filter((f) => f.endsWith('.vncrec'));
  assert.equal(files.length, 1, `one recording: ${files}`);
  assert.match(files[0], /^rec-\d+\.\d{6}-\d+\.vncrec$/);

  // The desktop changes; the recording does not.
  setRoot(xvnc.display, LATER);
  const port = await freePort();
  replay = spawnLogged(BIN, ['replay', join(tmp, 'rec', files[0]), '--listen', `127.0.0.1:${port}`]);
  await until('the replay to listen', () => accepts(port));
  // noVNC's default path (websockify); any path serves the recording.
  const played = await viewAndSee(`ws://127.0.0.1:${port}/websockify`, RECORDED);
  // Once the recording has played out, the viewer keeps the last frame, connected.
  await until('the replay to end', () => replay.err.includes('played to its end'), 20000);
  assert.match(await played.textContent('#status'), /^connected/);
  // A second viewer gets the recording from the start.
  const second = await viewAndSee(`ws://127.0.0.1:${port}/any/path`, RECORDED);
  await second.close();
  await played.close();
  // The live desktop really changed (the replay did not show the VM).
  const now = await viewAndSee(`${gateBase}/vnc/rec`, LATER);
  await now.close();
});
