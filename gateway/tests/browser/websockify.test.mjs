// `vncgate websockify` in place of websockify (node --test): Debian's own noVNC package
// (/usr/share/novnc) served by the gateway itself with --web, its own vnc.html driven in
// headless Chromium to a real Xvnc (a solid background and an xterm) through
// `vnc.html?path=websockify?token=...&autoconnect=true`, the token picked from a websockify
// TokenFile. Started by scripts/browser-test.sh, which installs chromium, novnc, Xvnc,
// xterm, xsetroot and playwright-core and passes VNCGATE_BIN.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { connect as tcpConnect, createServer as createTcpServer } from 'node:net';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.VNCGATE_BIN;
const NOVNC = '/usr/share/novnc';
const SCREEN = { w: 800, h: 600 };
const BACKGROUND = [0x33, 0x66, 0xcc]; // xsetroot -solid '#3366cc'
const XTERM_AT = { x: 100, y: 100 }; // 80x24 cells of 6x13: about 100..590 x 100..420
const TOKEN = 'novnc-browser-7d41e9';

// Processes this file started, killed by pid if the run dies before its after() hooks.
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
const exited = (child) => child.exitCode !== null || child.signalCode !== null;

async function stop(child) {
  if (!child || exited(child)) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => { if (!exited(child)) child.kill('SIGKILL'); }, 3000);
  await gone;
  clearTimeout(t);
  started.delete(child);
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

function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/** Xvnc on a free display and a free loopback port, once it sends its RFB banner. */
async function startXvnc() {
  for (const cmd of ['Xvnc', 'xsetroot', 'xterm']) {
    assert.ok(have(cmd), `${cmd} is not installed: scripts/browser-test.sh installs it`);
  }
  let n = 400 + (process.pid % 300);
  let lastLog = '';
  for (let tries = 0; tries < 20; tries++, n++) {
    if (existsSync(`/tmp/.X11-unix/X${n}`) || existsSync(`/tmp/.X${n}-lock`)) continue;
    const port = await freePort();
    const child = track(spawn('Xvnc', [`:${n}`, '-rfbport', String(port), '-localhost',
      '-nolisten', 'tcp', '-SecurityTypes', 'None', '-AlwaysShared',
      '-geometry', `${SCREEN.w}x${SCREEN.h}`, '-depth', '24'],
    { stdio: ['ignore', 'ignore', 'pipe'] }));
    let log = '';
    child.stderr.on('data', (d) => { log += d; });
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline && !exited(child)) {
      if (await rfbBanner(port)) return { child, display: `:${n}`, port };
      await sleep(100);
    }
    lastLog = log;
    await stop(child);
  }
  throw new Error(`Xvnc did not start on any display tried; last log:\n${lastLog}`);
}

/** Starts `vncgate ARGS` and resolves once it prints its listening line. */
function startGateway(args) {
  return new Promise((resolve, reject) => {
    const child = track(spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on (wss?:\/\/[0-9.:]+)\//);
      if (m) resolve({ child, base: m[1], log: () => err });
    });
    child.stderr.on('data', (d) => { err += d; });
    child.on('exit', (code) => reject(new Error(`vncgate exited ${code}: ${out}${err}`)));
  });
}

describe("Debian's noVNC from vncgate websockify --web, to a real Xvnc", () => {
  let xvnc, xterm, gate, browser, tmp, port;

  before(async () => {
    assert.ok(existsSync(join(NOVNC, 'vnc.html')),
      `${NOVNC}/vnc.html is missing: scripts/browser-test.sh installs Debian's novnc`);
    tmp = await mkdtemp(join(tmpdir(), 'vncgate-websockify-'));
    xvnc = await startXvnc();
    const env = { ...process.env, DISPLAY: xvnc.display };
    const root = spawnSync('xsetroot', ['-solid', '#3366cc'], { env, encoding: 'utf8', timeout: 10000 });
    assert.equal(root.status, 0, `xsetroot: ${root.stderr}`);
    xterm = track(spawn('xterm', ['-geometry', `80x24+${XTERM_AT.x}+${XTERM_AT.y}`,
      '-bg', 'black', '-fg', 'white', '+sb', '-bw', '0', '-e', '/bin/sh'],
    { env: { ...env, SHELL: '/bin/sh', ENV: '' }, stdio: 'ignore' }));
    await sleep(300);
    assert.ok(!exited(xterm), 'xterm exited at once');
    // websockify's TokenFile format, a comment and a blank line included.
    const tokens = join(tmp, 'tokens');
    await writeFile(tokens, `# vncgate browser test\n\n${TOKEN}: 127.0.0.1:${xvnc.port}\n`);
    port = await freePort();
    // The migration: websockify's own command line, one word added.
    gate = await startGateway(['websockify', '--web', NOVNC, '--token-plugin', 'TokenFile',
      '--token-source', tokens, '--workers', '1', `127.0.0.1:${port}`]);
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  });

  after(async () => {
    await browser?.close();
    if (gate) { gate.child.removeAllListeners('exit'); await stop(gate.child); }
    await stop(xterm);
    await stop(xvnc?.child);
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  test("noVNC's own vnc.html shows the Xvnc desktop through path=websockify?token=", async (t) => {
    const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
    const failed = [];
    page.on('response', (r) => { if (r.status() >= 400) failed.push(`${r.status()} ${r.url()}`); });
    const resp = await page.goto(
      `http://127.0.0.1:${port}/vnc.html?path=websockify?token=${TOKEN}&autoconnect=true`);
    assert.equal(resp.status(), 200);
    assert.match(resp.headers()['content-type'], /^text\/html/);
    await page.waitForFunction(() => document.documentElement.classList.contains('noVNC_connected'),
      null, { timeout: 20000 });
    // The desktop: the xsetroot colour outside the xterm, the xterm's black inside.
    const pixel = (x, y) => page.evaluate(([px, py]) => {
      const c = document.querySelector('#noVNC_container canvas');
      if (!c || c.width === 0) return null;
      return { w: c.width, h: c.height, rgb: Array.from(c.getContext('2d').getImageData(px, py, 1, 1).data.slice(0, 3)) };
    }, [x, y]);
    const near = (a, b) => a.every((v, i) => Math.abs(v - b[i]) <= 24);
    let bg = null;
    let inXterm = null;
    const deadline = Date.now() + 15000;
    while (Date.now() < deadline) {
      bg = await pixel(20, 20);
      inXterm = await pixel(XTERM_AT.x + 200, XTERM_AT.y + 150);
      if (bg && inXterm && near(bg.rgb, BACKGROUND) && near(inXterm.rgb, [0, 0, 0])) break;
      await sleep(100);
    }
    assert.deepEqual({ w: bg?.w, h: bg?.h }, SCREEN, `canvas size: ${JSON.stringify(bg)}`);
    assert.ok(near(bg.rgb, BACKGROUND), `background at (20,20): ${JSON.stringify(bg)}`);
    assert.ok(near(inXterm.rgb, [0, 0, 0]), `xterm at (300,250): ${JSON.stringify(inXterm)}`);
    // Every file of the page came from the gateway, but the version file noVNC asks for
    // and Debian's package does not ship (websockify answers it with 404 as well).
    assert.deepEqual(failed.filter((f) => !f.endsWith(`:${port}/package.json`)), []);
    assert.match(await page.textContent('#noVNC_status'), /Connected \(unencrypted\)/);
    t.diagnostic(`background ${bg.rgb}, xterm ${inXterm.rgb}`);
    await page.close();
    // The token stays out of the gateway's log; the session is named by its digest.
    for (let i = 0; i < 50 && !/session closed/.test(gate.log()); i++) await sleep(100);
    assert.match(gate.log(), /session closed.*session=tok-[0-9a-f]{16}/);
    assert.ok(!gate.log().includes(TOKEN), 'the token is in the log');
  });

  test('a token the file lacks never connects', async () => {
    const page = await browser.newPage();
    await page.goto(`http://127.0.0.1:${port}/vnc.html?path=websockify?token=not-in-the-file&autoconnect=true`);
    await page.waitForFunction(() => /Failed to connect/.test(document.getElementById('noVNC_status').textContent),
      null, { timeout: 20000 });
    assert.ok(!(await page.evaluate(() => document.documentElement.classList.contains('noVNC_connected'))));
    await page.close();
    assert.match(gate.log(), /reason="?token not found in the token file/);
  });
});
