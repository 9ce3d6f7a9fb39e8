// noVNC in headless Chromium through vncgate (node --test). Started by scripts/browser-test.sh,
// which installs Chromium, @novnc/novnc and playwright-core, builds the gateway, and passes:
//   VNCGATE_BIN   the gateway binary
//   VIEWER_DIR    a folder holding index.html (config/demo/viewer.html) and node_modules
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { createServer as createTcpServer } from 'node:net';
import { readFile } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.VNCGATE_BIN;
const VIEWER_DIR = process.env.VIEWER_DIR;
let gw, gwUrl, http, httpPort, browser, refusedPort;

function startGateway(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (ws:\/\/[0-9.:]+)\//);
      if (m) resolve({ child, base: m[1] });
    });
    child.stderr.on('data', () => {});
    child.on('exit', (code) => reject(new Error(`gateway exited ${code}: ${out}`)));
  });
}

before(async () => {
  // A port with nothing listening: the "VM whose VNC server never started".
  const probe = createTcpServer();
  await new Promise((r) => probe.listen(0, '127.0.0.1', r));
  refusedPort = probe.address().port;
  await new Promise((r) => probe.close(r));
  gw = await startGateway(['demo', '--listen', '127.0.0.1:0', '--workers', '1',
    '--route', `down=127.0.0.1:${refusedPort}`, '--connect-retry-window', '0']);
  gwUrl = gw.base;
  http = createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (path === '/blank') {
      res.writeHead(200, { 'Content-Type': 'text/html' });
      res.end('<!doctype html><title>blank</title>');
      return;
    }
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
  gw?.child.kill('SIGKILL');
});

async function viewDesktop(protocols) {
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const url = encodeURIComponent(`${gwUrl}/vnc/demo`);
  const q = protocols ? `&protocols=${protocols}` : '';
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${url}${q}`);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'),
    null, { timeout: 15000 });
  // Let a few framebuffer updates land, then read pixels off noVNC's canvas.
  await page.waitForTimeout(1000);
  const stats = await page.evaluate(() => {
    const c = document.querySelector('#screen canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const colours = new Set();
    let lit = 0;
    for (let i = 0; i < d.length; i += 4 * 97) {
      if (d[i] + d[i + 1] + d[i + 2] > 60) lit++;
      colours.add((d[i] >> 4) << 8 | (d[i + 1] >> 4) << 4 | (d[i + 2] >> 4));
    }
    return { w: c.width, h: c.height, lit, colours: colours.size, samples: d.length / (4 * 97) };
  });
  // The synthetic desktop is 1024x768 of coloured bars: many colours, mostly lit.
  assert.equal(stats.w, 1024);
  assert.equal(stats.h, 768);
  assert.ok(stats.colours > 20, `desktop shows its pattern: ${JSON.stringify(stats)}`);
  assert.ok(stats.lit > stats.samples / 2, `desktop is drawn: ${JSON.stringify(stats)}`);
  // A clean close, initiated by the browser.
  await page.evaluate(() => window.rfb.disconnect());
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'));
  assert.equal(await page.textContent('#status'), 'disconnected (clean: true)');
  await page.close();
}

test('current noVNC (no subprotocol offered) shows the desktop', async () => {
  await viewDesktop(null);
});

test('old noVNC (binary offered) shows the desktop', async () => {
  await viewDesktop('binary');
});

test('a VM that refuses the connection reaches the browser as 4000 with its reason', async () => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${httpPort}/blank`);
  const ev = await page.evaluate((u) => new Promise((resolve) => {
    const ws = new WebSocket(u);
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onclose = (e) => resolve({ opened, code: e.code, reason: e.reason, clean: e.wasClean });
  }), `${gwUrl}/vnc/down`);
  assert.deepEqual(ev, { opened: true, code: 4000, reason: 'vm vnc port refused', clean: true });
  await page.close();
});

test('an unknown session is refused before the upgrade', async () => {
  const page = await browser.newPage();
  const ev = await page.evaluate((u) => new Promise((resolve) => {
    const ws = new WebSocket(u);
    ws.onclose = (e) => resolve({ code: e.code });
  }), `${gwUrl}/vnc/nobody`);
  assert.equal(ev.code, 1006, 'a failed handshake is all a browser can see');
  await page.close();
});
