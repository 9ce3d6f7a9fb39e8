// Session recording and playback in Chromium (node --test): a real Xvnc desktop viewed in
// noVNC through `vncgate serve --record DIR`, then `vncgate replay FILE --listen ADDR` opened in
// noVNC: the canvas shows the recorded desktop (its colour then, not the desktop's colour now).
// Started by scripts/browser-test.sh (VNCGATE_BIN, VIEWER_DIR; see novnc.test.mjs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import { connect as tcpConnect, createServer as createTcpServer } from 'node:net';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { extname, join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.VNCGATE_BIN;
const VIEWER_DIR = process.env.VIEWER_DIR;
const SCREEN = { w: 640, h: 480 };
const RECORDED = [0xcc, 0x33, 0x66]; // the desktop while recorded
const LATER = [0x22, 0xaa, 0x44]; // the desktop at playback time
const hex = (rgb) => '#' + rgb.map((c) => c.toString(16).padStart(2, '0')).join('');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Processes this file started, killed by pid if the run dies before after().
const started = new Set();
process.on('exit', () => {
  for (const c of started) {
    try { process.kill(c.pid, 'SIGKILL'); } catch { /* already gone */ }
  }
});
function track(child) {
  started.add(child);
  child.on('exit', () => started.delete(child));
  return child;
}
const exited = (child) => child.exitCode !== null || child.signalCode !== null;
async function stop(child) {
  if (!child || exited(child)) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => { if (!exited(child)) child.kill('SIGKILL'); }, 3000);
  await gone;
  clearTimeout(t);
}
async function freePort() {
  const probe = createTcpServer();
  await new Promise((r) => probe.listen(0, '127.0.0.1', r));
  const { port } = probe.address();
  await new Promise((r) => probe.close(r));
  return port;
}
function accepts(port) {
  return new Promise((resolve) => {
    const s = tcpConnect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(true); });
    s.on('error', () => resolve(false));
  });
}
function rfbBanner(port) {
  return new Promise((resolve) => {
    const s = tcpConnect(port, '127.0.0.1');
    let buf = '';
    const done = (ok) => { s.destroy(); resolve(ok); };
    s.on('data', (d) => { buf += d; if (buf.length >= 12) done(/^RFB \d{3}\.\d{3}\n/.test(buf)); });
    s.on('error', () => done(false));
    s.on('close', () => done(false));
    s.setTimeout(1000, () => done(false));
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

async function waitFor(what, f, ms = 15000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await f()) return;
    await sleep(100);
  }
  assert.fail(`timed out waiting for ${what}`);
}

let tmp, xvnc, display, gate, gateBase, replay, http, httpPort, browser;

async function startXvnc() {
  let n = 400 + (process.pid % 200);
  for (let tries = 0; tries < 20; tries++, n++) {
    if (existsSync(`/tmp/.X11-unix/X${n}`) || existsSync(`/tmp/.X${n}-lock`)) continue;
    const port = await freePort();
    const child = track(spawn('Xvnc', [`:${n}`, '-rfbport', String(port), '-localhost',
      '-nolisten', 'tcp', '-SecurityTypes', 'None', '-AlwaysShared',
      '-geometry', `${SCREEN.w}x${SCREEN.h}`, '-depth', '24'], { stdio: 'ignore' }));
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline && !exited(child)) {
      if (await rfbBanner(port)) return { child, display: `:${n}`, port };
      await sleep(100);
    }
    await stop(child);
  }
  throw new Error('Xvnc did not start on any display tried');
}

function setRoot(rgb) {
  const r = spawnSync('xsetroot', ['-solid', hex(rgb)],
    { env: { ...process.env, DISPLAY: display }, encoding: 'utf8', timeout: 10000 });
  assert.equal(r.status, 0, `xsetroot: ${r.stderr}`);
}

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'vncgate-record-'));
  xvnc = await startXvnc();
  display = xvnc.display;
  setRoot(RECORDED);
  gate = spawnLogged(BIN, ['serve', '--listen', '127.0.0.1:0', '--workers', '1',
    '--route', `rec=127.0.0.1:${xvnc.port}`, '--allow-upstream', '127.0.0.0/8',
    '--record', join(tmp, 'rec'), '--record-input']);
  await waitFor('the gateway to listen', () => /listening on ws:\/\/[0-9.:]+\//.test(gate.out));
  gateBase = gate.out.match(/listening on (ws:\/\/[0-9.:]+)\//)[1];
  http = createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const file = join(VIEWER_DIR, path === '/' ? 'index.html' : path);
    try {
      const body = await readFile(file);
      const type = { '.html': 'text/html', '.js': 'text/javascript' }[extname(file)] || 'application/octet-stream';
      res.writeHead(200, { 'Content-Type': type });
      res.end(body);
    } catch {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => http.listen(0, '127.0.0.1', r));
  httpPort = http.address().port;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  http?.close();
  await stop(replay);
  await stop(gate);
  await stop(xvnc?.child);
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

const near = (a, b, tol) => a.every((v, i) => Math.abs(v - b[i]) <= tol);

/** Opens the viewer page on `wsUrl`; resolves once noVNC shows a SCREEN-sized canvas whose
 * sampled pixels are all `rgb`. */
async function viewAndSee(wsUrl, rgb) {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${encodeURIComponent(wsUrl)}`);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'),
    null, { timeout: 15000 });
  let last = null;
  await waitFor(`the canvas to show ${hex(rgb)}`, async () => {
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
  await waitFor('the recording to end', () => gate.err.includes('recording ended'));
  assert.match(gate.err, /recording ended.*result="complete"/);
  const files = (await readdir(join(tmp, 'rec'))).filter((f) => f.endsWith('.vncrec'));
  assert.equal(files.length, 1, `one recording: ${files}`);
  assert.match(files[0], /^rec-\d+\.\d{6}-\d+\.vncrec$/);

  // The desktop changes; the recording does not.
  setRoot(LATER);
  const port = await freePort();
  replay = spawnLogged(BIN, ['replay', join(tmp, 'rec', files[0]), '--listen', `127.0.0.1:${port}`]);
  await waitFor('the replay to listen', () => accepts(port));
  // noVNC's default path (websockify); any path serves the recording.
  const played = await viewAndSee(`ws://127.0.0.1:${port}/websockify`, RECORDED);
  // Once the recording has played out, the viewer keeps the last frame, connected.
  await waitFor('the replay to end', () => replay.err.includes('played to its end'), 20000);
  assert.match(await played.textContent('#status'), /^connected/);
  // A second viewer gets the recording from the start.
  const second = await viewAndSee(`ws://127.0.0.1:${port}/any/path`, RECORDED);
  await second.close();
  await played.close();
  // The live desktop really changed (the replay did not show the VM).
  const now = await viewAndSee(`${gateBase}/vnc/rec`, LATER);
  await now.close();
});
