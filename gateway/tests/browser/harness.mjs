// What the browser test files share (not a test itself: scripts/browser-test.sh copies it next
// to them and runs only *.test.mjs): the environment the script passes, child processes started
// and tracked so that none outlives a run, free loopback ports, Xvnc with a root colour and an
// xterm, the gateway started until its listening line, the HTTP server of the viewer page,
// Chromium through playwright-core, and what waits on noVNC's canvas and status line.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import { connect as tcpConnect, createServer as createTcpServer } from 'node:net';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { extname, join } from 'node:path';
import { chromium } from 'playwright-core';

// From scripts/browser-test.sh: the gateway binary, and a folder holding index.html
// (config/demo/viewer.html) and node_modules (@novnc/novnc, playwright-core).
export const BIN = process.env.VNCGATE_BIN;
export const VIEWER_DIR = process.env.VIEWER_DIR;

// The gateway's line once it accepts connections: `listening on ws://ADDR/` (wss:// with TLS).
export const LISTENING = /listening on (wss?:\/\/[0-9.:]+)\//;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Processes the importing test file started, killed by pid if the run dies before its after()
// hooks (each test file is a process of its own, so this set is that file's).
const started = new Set();
process.on('exit', () => {
  for (const c of started) {
    try { process.kill(c.pid, 'SIGKILL'); } catch { /* already gone */ }
  }
});

/** Remembers `child` until it exits, for the kill at exit above; returns it. */
export function track(child) {
  started.add(child);
  child.on('exit', () => started.delete(child));
  return child;
}

/** Whether `child` has exited (or was killed by a signal). */
export function exited(child) {
  return child.exitCode !== null || child.signalCode !== null;
}

/**
 * SIGTERM (Xvnc then removes its socket and lock file; the demo passes it to its gateway,
 * which drains and exits), SIGKILL after 3 s. Nothing for a child absent or gone.
 */
export async function stop(child) {
  if (!child || exited(child)) return;
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => { if (!exited(child)) child.kill('SIGKILL'); }, 3000);
  await gone;
  clearTimeout(t);
  started.delete(child);
}

/** A loopback port nothing listens on (just now): for a server to take, or a VM that refuses. */
export async function freePort() {
  const probe = createTcpServer();
  await new Promise((r) => probe.listen(0, '127.0.0.1', r));
  const { port } = probe.address();
  await new Promise((r) => probe.close(r));
  return port;
}

/** Whether 127.0.0.1:port sends an RFB banner (a VNC server that is up, not just listening). */
export function rfbBanner(port) {
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

/** Whether `cmd` is on the PATH. */
export function have(cmd) {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/**
 * Polls `f` every 100 ms until it returns something truthy, which it resolves with; throws
 * `timed out waiting for WHAT` after `ms`.
 */
export async function until(what, f, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/**
 * Starts `bin args` (tracked) and resolves once each of `patterns` matched its stdout, with
 * the child, each pattern's first group (`found`) and what it wrote to stderr so far (`log()`);
 * rejects if it exits first.
 */
export function startWithLines(bin, args, patterns) {
  return new Promise((resolve, reject) => {
    const child = track(spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] }));
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => {
      out += d;
      const found = patterns.map((p) => out.match(p));
      if (found.every(Boolean)) resolve({ child, found: found.map((m) => m[1]), log: () => err });
    });
    child.stderr.on('data', (d) => { err += d; });
    child.on('exit', (code) => reject(new Error(`${bin} exited ${code}: ${out}${err}`)));
  });
}

/**
 * Starts the gateway (`bin`: vncgate, or vncgate-loadtest whose `demo` runs one) and resolves
 * once it prints its listening line: the child, its ws(s):// base and its stderr (`log()`).
 */
export async function startGateway(args, bin = BIN) {
  const { child, found, log } = await startWithLines(bin, args, [LISTENING]);
  return { child, base: found[0], log };
}

/** `#rrggbb` of [r, g, b]: what xsetroot takes. */
export const hex = (rgb) => '#' + rgb.map((c) => c.toString(16).padStart(2, '0')).join('');

/** Whether two [r, g, b] are within `tol` on every channel. */
export const near = (a, b, tol) => a.every((v, i) => Math.abs(v - b[i]) <= tol);

/**
 * Xvnc (TigerVNC) of `screen` ({ w, h }) on a free display from `display` on (no
 * /tmp/.X11-unix/X<N>, no /tmp/.X<N>-lock; each file starts elsewhere so that they never meet)
 * and a free loopback port; another display is tried when one is taken meanwhile. Resolves once
 * the port sends its RFB banner: { child, display: ':N', port, log() }. `shared: false` leaves
 * out -AlwaysShared (the viewers' own shared flag decides).
 */
export async function startXvnc(screen, display, { shared = true } = {}) {
  for (const cmd of ['Xvnc', 'xsetroot', 'xterm']) {
    assert.ok(have(cmd), `${cmd} is not installed: scripts/browser-test.sh installs it ` +
      '(apt-get install tigervnc-standalone-server x11-xserver-utils xterm xfonts-base)');
  }
  let n = display;
  let lastLog = '';
  for (let tries = 0; tries < 20; tries++, n++) {
    if (existsSync(`/tmp/.X11-unix/X${n}`) || existsSync(`/tmp/.X${n}-lock`)) continue;
    const port = await freePort();
    const child = track(spawn('Xvnc', [`:${n}`, '-rfbport', String(port), '-localhost',
      '-nolisten', 'tcp', '-SecurityTypes', 'None', ...(shared ? ['-AlwaysShared'] : []),
      '-geometry', `${screen.w}x${screen.h}`, '-depth', '24'],
    { stdio: ['ignore', 'ignore', 'pipe'] }));
    let log = '';
    child.stderr.on('data', (d) => { log += d; });
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline && !exited(child)) {
      if (await rfbBanner(port)) return { child, display: `:${n}`, port, log: () => log };
      await sleep(100);
    }
    lastLog = log;
    await stop(child);
  }
  throw new Error(`Xvnc did not start on any display tried; last log:\n${lastLog}`);
}

/** Paints X `display`'s root window a solid [r, g, b] (xsetroot): the desktop's background. */
export function setRoot(display, rgb) {
  const r = spawnSync('xsetroot', ['-solid', hex(rgb)],
    { env: { ...process.env, DISPLAY: display }, encoding: 'utf8', timeout: 10000 });
  assert.equal(r.status, 0, `xsetroot: ${r.stderr}`);
}

/**
 * An xterm of 80x24 cells at `at` ({ x, y }) on X `display`, with `args` after its geometry and
 * `env` over SHELL=/bin/sh and an empty ENV (a plain sh, no rc file); tracked, its stderr kept
 * as `child.log` (why it exited, if it did).
 */
export function startXterm(display, at, args, { env = {}, cwd } = {}) {
  const child = track(spawn('xterm', ['-geometry', `80x24+${at.x}+${at.y}`, ...args],
    { cwd, env: { ...process.env, DISPLAY: display, SHELL: '/bin/sh', ENV: '', ...env },
      stdio: ['ignore', 'ignore', 'pipe'] }));
  child.log = '';
  child.stderr.on('data', (d) => { child.log += d; });
  return child;
}

const TYPES = { '.html': 'text/html', '.htm': 'text/html', '.js': 'text/javascript', '.css': 'text/css' };

/**
 * An HTTP server on a free loopback port: `inline[path]` (HTML) where given, else the file
 * `fileFor(pathname)` names, typed by its extension (404 when it cannot be read). Resolves
 * { server, port }.
 */
export async function serveFiles(fileFor, inline = {}) {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    if (Object.hasOwn(inline, path)) {
      res.writeHead(200, { 'Content-Type': 'text/html' });
      res.end(inline[path]);
      return;
    }
    const file = fileFor(path);
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'Content-Type': TYPES[extname(file)] || 'application/octet-stream' });
      res.end(body);
    } catch {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: server.address().port };
}

/** VIEWER_DIR over HTTP: `/` is the viewer page (`/?url=WS_URL`), noVNC under /node_modules. */
export function serveViewer(inline = {}) {
  return serveFiles((path) => join(VIEWER_DIR, path === '/' ? 'index.html' : path), inline);
}

/**
 * Headless Debian Chromium (CHROMIUM overrides /usr/bin/chromium; never a downloaded browser),
 * without the sandbox (root in a container), the GPU, QUIC or background traffic; `extra`
 * flags appended.
 */
export function launchChromium(extra = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', ...extra],
  });
}

/** Waits (15 s) until the viewer page's status line says noVNC is connected. */
export function viewerConnected(page) {
  return page.waitForFunction(() => document.getElementById('status').textContent.startsWith('connected'),
    null, { timeout: 15000 });
}

/**
 * A clean close initiated by the browser: noVNC disconnects, and the viewer page's status says
 * clean, without a status code (1005) or with 1000.
 */
export async function disconnectViewer(page) {
  await page.evaluate(() => window.rfb.disconnect());
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'));
  assert.match(await page.textContent('#status'), /^disconnected: (1000|1005) \(clean: true\)$/);
}
