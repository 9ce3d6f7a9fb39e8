// View-only links in noVNC itself (node --test, started by scripts/browser-test.sh): noVNC in
// headless Chromium through `vncgate serve` to TigerVNC's Xvnc with an xterm, once with the
// route's view token and once with its full token. Keys typed into the view-only noVNC do not
// reach the shell (the gateway drops them, counted), while the desktop still shows and the
// session stays up (noVNC's own messages to the server, fences and continuous updates
// included, pass the gateway's filter); the same keys through the full token run.
// Environment as for novnc.test.mjs: VNCGATE_BIN, VIEWER_DIR.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import { connect as tcpConnect, createServer as createTcpServer } from 'node:net';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { extname, join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.VNCGATE_BIN;
const VIEWER_DIR = process.env.VIEWER_DIR;
const FULL = 'full-token-2';
const VIEW = 'view-token-2';
const SCREEN = { w: 800, h: 600 };
// The xterm covers the screen's centre, where Xvnc starts the pointer: keys that reached the
// server would reach the xterm even from a viewer whose pointer moves are dropped.
const XTERM_AT = { x: 100, y: 100 };

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
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const exited = (c) => c.exitCode !== null || c.signalCode !== null;

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

async function until(what, f, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

let dir, xvnc, xterm, gate, http, httpPort, browser;

before(async () => {
  for (const cmd of ['Xvnc', 'xsetroot', 'xterm']) {
    assert.equal(spawnSync('sh', ['-c', `command -v ${cmd}`]).status, 0,
      `${cmd} is not installed: scripts/browser-test.sh installs it`);
  }
  dir = await mkdtemp(join(tmpdir(), 'vncgate-view-only-'));
  let n = 700 + (process.pid % 200);
  for (let tries = 0; tries < 20 && !xvnc; tries++, n++) {
    if (existsSync(`/tmp/.X11-unix/X${n}`) || existsSync(`/tmp/.X${n}-lock`)) continue;
    const port = await freePort();
    const child = track(spawn('Xvnc', [`:${n}`, '-rfbport', String(port), '-localhost',
      '-nolisten', 'tcp', '-SecurityTypes', 'None', '-geometry', `${SCREEN.w}x${SCREEN.h}`,
      '-depth', '24'], { stdio: 'ignore' }));
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline && !exited(child)) {
      if (await rfbBanner(port)) { xvnc = { child, display: `:${n}`, port }; break; }
      await sleep(100);
    }
    if (!xvnc) await stop(child);
  }
  assert.ok(xvnc, 'Xvnc started');
  const env = { ...process.env, DISPLAY: xvnc.display };
  assert.equal(spawnSync('xsetroot', ['-solid', '#3366cc'], { env }).status, 0);
  xterm = track(spawn('xterm', ['-geometry', `80x24+${XTERM_AT.x}+${XTERM_AT.y}`, '+sb',
    '-e', '/bin/sh', '-c', 'touch .ready; exec /bin/sh'],
  { cwd: dir, env: { ...env, SHELL: '/bin/sh', ENV: '' }, stdio: 'ignore' }));
  await until('the xterm\'s shell', () => existsSync(join(dir, '.ready')));

  const routes = join(dir, 'routes.toml');
  await writeFile(routes, `[[route]]\nsession = "desk"\nupstream = "127.0.0.1:${xvnc.port}"\n`
    + `token = "${FULL}"\nview_token = "${VIEW}"\n`);
  gate = await new Promise((resolve, reject) => {
    const child = track(spawn(BIN, ['serve', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0',
      '--workers', '1', '--routes-file', routes, '--allow-upstream', '127.0.0.0/8'],
    { stdio: ['ignore', 'pipe', 'ignore'] }));
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const ws = out.match(/listening on (ws:\/\/[0-9.:]+)\//);
      const admin = out.match(/admin on (http:\/\/[0-9.:]+)/);
      if (ws && admin) resolve({ child, base: ws[1], admin: admin[1] });
    });
    child.on('exit', (code) => reject(new Error(`gateway exited ${code}: ${out}`)));
  });

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
  if (gate) { gate.child.removeAllListeners('exit'); await stop(gate.child); }
  await stop(xterm);
  await stop(xvnc?.child);
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** A metric's value from the gateway's /metrics (0 when absent). */
async function metric(series) {
  const body = await (await fetch(`${gate.admin}/metrics`)).text();
  const line = body.split('\n').find((l) => l.startsWith(`${series} `));
  return line ? Number(line.slice(series.length + 1)) : 0;
}
const dropped = (kind) => metric(`vncgate_view_only_dropped_total{kind="${kind}"}`);

/** noVNC connected with `token`, the desktop drawn (the blue root, the xterm over it). */
async function viewer(token) {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const url = encodeURIComponent(`${gate.base}/vnc/desk?token=${token}`);
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${url}`);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'),
    null, { timeout: 15000 });
  await until('the desktop on the canvas', () => page.evaluate(({ w, h }) => {
    const c = document.querySelector('#screen canvas');
    if (!c || c.width !== w || c.height !== h) return false;
    const g = c.getContext('2d');
    const [r, gr, b] = g.getImageData(20, 20, 1, 1).data; // the root window
    const [xr, xg, xb] = g.getImageData(w / 2, h / 2, 1, 1).data; // inside the xterm
    const root = (p, q, s) => Math.abs(p - 0x33) < 24 && Math.abs(q - 0x66) < 24 && Math.abs(s - 0xcc) < 24;
    return root(r, gr, b) && !root(xr, xg, xb);
  }, SCREEN));
  return page;
}

/** Types `line` and Enter into noVNC, the pointer over the xterm. */
async function typeInto(page, line) {
  const rect = await page.locator('#screen canvas').boundingBox();
  await page.mouse.move(rect.x + rect.width / 2, rect.y + rect.height / 2);
  await page.evaluate(() => window.rfb.focus());
  await page.keyboard.type(line, { delay: 10 });
  await page.keyboard.press('Enter');
}

test('keys typed into a view-only noVNC do not reach the shell; through the full token they do', async (t) => {
  const view = await viewer(VIEW);
  await typeInto(view, 'touch viewed');
  // noVNC sends each key as a QEMU extended key event when the server offers them (TigerVNC
  // does), else as a KeyEvent: a press and a release per key, 13 keys.
  const keys = async () => (await dropped('key_event')) + (await dropped('qemu'));
  await until('the key events dropped', async () => (await keys()) >= 26);
  t.diagnostic(`dropped: ${await keys()} key events, ${await dropped('pointer_event')} pointer events`);
  assert.ok((await dropped('pointer_event')) > 0, 'the pointer moves were dropped too');
  assert.equal(await metric('vncgate_view_only_sessions_total'), 1);

  // A checksum of the xterm's region as the view-only noVNC draws it.
  const xtermSum = () => view.evaluate(({ x, y }) => {
    const d = document.querySelector('#screen canvas').getContext('2d').getImageData(x, y, 480, 300).data;
    let sum = 0;
    for (let i = 0; i < d.length; i += 4) sum = (sum * 31 + d[i] + d[i + 1] + d[i + 2]) % 1000000007;
    return sum;
  }, XTERM_AT);
  const before = await xtermSum();

  const full = await viewer(FULL);
  await typeInto(full, 'touch typed');
  await until('the full viewer\'s line to run', () => existsSync(join(dir, 'typed')));
  assert.ok(!existsSync(join(dir, 'viewed')), 'keys through the view token reached the shell');
  // The view-only viewer is still connected (noVNC's own messages passed the filter) and
  // still sees the desktop change: the full viewer's line echoed in the xterm.
  assert.match(await view.textContent('#status'), /^connected/);
  await until('the view-only canvas to show the typed line', async () => (await xtermSum()) !== before);
  await full.close();
  await view.evaluate(() => window.rfb.disconnect());
  await view.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'));
  assert.match(await view.textContent('#status'), /^disconnected: (1000|1005) \(clean: true\)$/);
  await view.close();
});
