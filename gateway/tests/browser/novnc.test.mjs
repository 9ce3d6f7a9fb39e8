// noVNC in headless Chromium through vncgate (node --test): against the synthetic desktop
// (`vncgate-loadtest demo`), and against a real VNC server (TigerVNC's Xvnc showing an xterm) behind
// `vncgate serve`. Started by scripts/browser-test.sh, which installs Chromium, Xvnc, xterm,
// xsetroot, @novnc/novnc and playwright-core, builds the gateway, and passes:
//   VNCGATE_BIN   the gateway binary
//   DEMO_BIN      vncgate-loadtest, whose `demo` runs that gateway in front of a synthetic desktop
//   VIEWER_DIR    a folder holding index.html (config/demo/viewer.html) and node_modules
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  BIN, disconnectViewer, exited, freePort, launchChromium, near, serveViewer, setRoot, sleep, startGateway,
  startWithLines, startXterm, startXvnc, stop, track, viewerConnected,
} from './harness.mjs';

const DEMO_BIN = process.env.DEMO_BIN;
const CONTROLLER_BIN = process.env.CONTROLLER_BIN;
let gw, gwUrl, http, httpPort, browser, refusedPort;

before(async () => {
  // A port with nothing listening: the "VM whose VNC server never started".
  refusedPort = await freePort();
  gw = await startGateway(['demo', '--gateway', BIN, '--listen', '127.0.0.1:0', '--workers', '1',
    '--route', `down=127.0.0.1:${refusedPort}`, '--connect-retry-window', '0',
    '--drain-timeout', '1'], DEMO_BIN);
  gwUrl = gw.base;
  ({ server: http, port: httpPort } = await serveViewer({ '/blank': '<!doctype html><title>blank</title>' }));
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  http?.close();
  // SIGTERM: the demo passes it to its gateway, which drains (1 s) and exits; a SIGKILL
  // would leave the gateway running without its parent.
  if (gw) await stop(gw.child);
});

async function viewDesktop(protocols, wsUrl = `${gwUrl}/vnc/demo`, viewer = browser) {
  const page = await viewer.newPage({ viewport: { width: 900, height: 700 } });
  const url = encodeURIComponent(wsUrl);
  const q = protocols ? `&protocols=${protocols}` : '';
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${url}${q}`);
  await viewerConnected(page);
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
  // A clean close, initiated by the browser; noVNC closes without a status code (1005) or
  // with 1000, and the page shows which.
  await disconnectViewer(page);
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

test('the viewer page shows the close code and reason the gateway sent', async () => {
  const page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${httpPort}/?url=${encodeURIComponent(`${gwUrl}/vnc/down`)}`);
  await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'));
  assert.match(await page.textContent('#status'), /^disconnected: 4000 vm vnc port refused \(clean: (true|false)\)$/);
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

// ---- wss:// (--tls-cert, --tls-key): noVNC over TLS to the same synthetic desktop ----

describe('noVNC through wss://', () => {
  let tlsGw, tlsUrl, trusting, dir;
  const openssl = (args) => {
    const r = spawnSync('openssl', args, { encoding: 'utf8' });
    assert.equal(r.status, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
    return r.stdout;
  };
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'vncgate-wss-'));
    const [cert, key] = [join(dir, 'gw.crt'), join(dir, 'gw.key')];
    openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-days', '2', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
      '-keyout', key, '-out', cert]);
    // Chromium trusts exactly this key (its SPKI's SHA-256), as a private CA would make it.
    const spki = spawnSync('sh', ['-c',
      `openssl x509 -in '${cert}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64`],
    { encoding: 'utf8' });
    assert.equal(spki.status, 0, spki.stderr);
    tlsGw = await startGateway(['demo', '--gateway', BIN, '--listen', '127.0.0.1:0', '--workers', '1',
      '--tls-cert', cert, '--tls-key', key, '--drain-timeout', '1'], DEMO_BIN);
    tlsUrl = tlsGw.base;
    assert.match(tlsUrl, /^wss:\/\//);
    trusting = await launchChromium([`--ignore-certificate-errors-spki-list=${spki.stdout.trim()}`]);
  });
  after(async () => {
    await trusting?.close();
    if (tlsGw) await stop(tlsGw.child);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  test('noVNC shows the desktop over wss://', async () => {
    await viewDesktop(null, `${tlsUrl}/vnc/demo`, trusting);
  });

  test('a browser that does not trust the certificate never opens the socket', async () => {
    const page = await browser.newPage();
    await page.goto(`http://127.0.0.1:${httpPort}/blank`);
    const ev = await page.evaluate((u) => new Promise((resolve) => {
      const ws = new WebSocket(u);
      let opened = false;
      ws.onopen = () => { opened = true; };
      ws.onclose = (e) => resolve({ opened, code: e.code });
    }), `${tlsUrl}/vnc/demo`);
    assert.deepEqual(ev, { opened: false, code: 1006 });
    await page.close();
  });
});

// ---- A real VNC server: Xvnc (TigerVNC) with a solid background and an xterm ----

const SCREEN = { w: 800, h: 600 };
const BACKGROUND = [0x33, 0x66, 0xcc]; // xsetroot -solid '#3366cc'
// xterm at +100+100, 80x24 cells of the default 6x13 font: about 100..590 x 100..420. It covers
// the screen's centre, where Xvnc starts the pointer, so typed keys reach it (no window
// manager: the X focus follows the pointer).
const XTERM_AT = { x: 100, y: 100 };
const OUTSIDE_XTERM = [{ x: 20, y: 20 }, { x: 750, y: 550 }, { x: 700, y: 60 }];

/** The desktop: a solid root window and an xterm running sh, white on black. */
async function startDesktop(x, markFile) {
  setRoot(x.display, BACKGROUND);
  const xterm = startXterm(x.display, XTERM_AT, ['-bg', 'black', '-fg', 'white', '-cr', 'white', '+sb', '-bw', '0',
    '-xrm', 'XTerm*cursorBlink: false', '-e', '/bin/sh'], { env: { PS1: '$ ', VNCGATE_MARK: markFile } });
  await sleep(300);
  assert.ok(!exited(xterm), `xterm exited at once: ${xterm.log}`);
  return xterm;
}

// Runs in the page before noVNC: records every WebSocket's close event (noVNC's own socket
// included: it looks WebSocket up when it connects), and reads noVNC's canvas.
function pageHelpers() {
  const closes = [];
  const Native = window.WebSocket;
  // A wrapper returning the native socket itself (noVNC checks the socket's own prototype, so
  // a subclass would not do); statics (CONNECTING, OPEN...) come from the native class.
  function Recorded(...args) {
    const ws = new Native(...args);
    ws.addEventListener('close', (e) => closes.push({ code: e.code, reason: e.reason, clean: e.wasClean }));
    return ws;
  }
  Object.setPrototypeOf(Recorded, Native);
  Recorded.prototype = Native.prototype;
  window.WebSocket = Recorded;
  const canvas = () => document.querySelector('#screen canvas');
  const near = (d, i, rgb, tol) => Math.abs(d[i] - rgb[0]) <= tol && Math.abs(d[i + 1] - rgb[1]) <= tol
    && Math.abs(d[i + 2] - rgb[2]) <= tol;
  let snap = null;
  window.vg = {
    closes,
    size: () => { const c = canvas(); return c ? { w: c.width, h: c.height } : null; },
    pixel: (x, y) => Array.from(canvas().getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)),
    // Bounding box of the pixels that are not the background: the xterm.
    bbox: (bg, tol) => {
      const c = canvas();
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let x0 = c.width, y0 = c.height, x1 = -1, y1 = -1;
      for (let y = 0; y < c.height; y++) {
        for (let x = 0; x < c.width; x++) {
          if (!near(d, (y * c.width + x) * 4, bg, tol)) {
            if (x < x0) x0 = x;
            if (x > x1) x1 = x;
            if (y < y0) y0 = y;
            if (y > y1) y1 = y;
          }
        }
      }
      return x1 < 0 ? null : { x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1 };
    },
    snapshot: (r) => { snap = { r, d: canvas().getContext('2d').getImageData(r.x, r.y, r.w, r.h).data }; },
    // Pixels of the snapshot's region that differ now (any channel by more than 32).
    changed: () => {
      const { r, d: before } = snap;
      const now = canvas().getContext('2d').getImageData(r.x, r.y, r.w, r.h).data;
      let n = 0;
      for (let i = 0; i < now.length; i += 4) {
        if (Math.abs(now[i] - before[i]) > 32 || Math.abs(now[i + 1] - before[i + 1]) > 32
          || Math.abs(now[i + 2] - before[i + 2]) > 32) n++;
      }
      return n;
    },
    // A PNG (a screenshot) decoded by the browser: the colour at (x, y) of its w x h grid.
    pngPixel: async (b64, x, y) => {
      const img = new Image();
      img.src = `data:image/png;base64,${b64}`;
      await img.decode();
      const c = document.createElement('canvas');
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      const px = Math.min(c.width - 1, Math.round(x * c.width));
      const py = Math.min(c.height - 1, Math.round(y * c.height));
      return { w: c.width, h: c.height, rgb: Array.from(g.getImageData(px, py, 1, 1).data.slice(0, 3)) };
    },
  };
}

describe('a real VNC server (Xvnc with an xterm) through vncgate serve', () => {
  let xvnc, xterm, gate, downPort, tmp, markFile;

  before(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'vncgate-xvnc-'));
    markFile = join(tmp, 'typed');
    xvnc = await startXvnc(SCREEN, 100 + (process.pid % 300));
    xterm = await startDesktop(xvnc, markFile);
    downPort = await freePort();
    gate = await startGateway(['serve', '--listen', '127.0.0.1:0', '--workers', '2',
      '--route', `xvnc=127.0.0.1:${xvnc.port}`, '--route', `down=127.0.0.1:${downPort}`,
      '--allow-upstream', '127.0.0.0/8']);
  });

  after(async () => {
    if (gate) { gate.child.removeAllListeners('exit'); await stop(gate.child); }
    await stop(xterm);
    await stop(xvnc?.child);
    if (tmp) await rm(tmp, { recursive: true, force: true });
  });

  async function openViewer(session, protocols) {
    const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
    await page.addInitScript(pageHelpers);
    const url = encodeURIComponent(`${gate.base}/vnc/${session}`);
    const q = protocols ? `&protocols=${protocols}` : '';
    await page.goto(`http://127.0.0.1:${httpPort}/?url=${url}${q}`);
    return page;
  }

  /** Connects, waits for the desktop with its xterm, returns the page and the xterm's box. */
  async function viewXvnc(protocols) {
    const page = await openViewer('xvnc', protocols);
    await viewerConnected(page);
    await page.waitForFunction(({ w, h }) => { const s = window.vg.size(); return s && s.w === w && s.h === h; },
      SCREEN, { timeout: 10000 });
    // The first update is the whole screen, drawn rectangle by rectangle onto a black canvas;
    // wait until all that is not background is an xterm-sized window.
    const xtermSized = (b) => b && b.w > 300 && b.h > 200 && b.w < SCREEN.w - 100 && b.h < SCREEN.h - 100;
    let box = null;
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline) {
      box = await page.evaluate((bg) => window.vg.bbox(bg, 24), BACKGROUND);
      if (xtermSized(box)) break;
      await sleep(100);
    }
    assert.ok(xtermSized(box), `xterm window visible: ${JSON.stringify(box)}`);
    assert.ok(Math.abs(box.x - XTERM_AT.x) <= 4 && Math.abs(box.y - XTERM_AT.y) <= 4,
      `xterm where it was put: ${JSON.stringify(box)}`);
    return { page, box };
  }

  async function assertBackground(page) {
    // noVNC's framebuffer...
    for (const p of OUTSIDE_XTERM) {
      const rgb = await page.evaluate(({ x, y }) => window.vg.pixel(x, y), p);
      assert.ok(near(rgb, BACKGROUND, 24), `framebuffer at ${JSON.stringify(p)}: ${rgb}`);
    }
    // ...and what the browser paints: a screenshot of the canvas element, scaled or not.
    const png = await page.locator('#screen canvas').screenshot();
    for (const p of OUTSIDE_XTERM) {
      const shot = await page.evaluate(([b64, x, y]) => window.vg.pngPixel(b64, x, y),
        [png.toString('base64'), p.x / SCREEN.w, p.y / SCREEN.h]);
      assert.ok(shot.w > 100 && shot.h > 100, `screenshot size ${shot.w}x${shot.h}`);
      assert.ok(near(shot.rgb, BACKGROUND, 24), `screenshot at ${JSON.stringify(p)}: ${JSON.stringify(shot)}`);
    }
  }

  /** A clean close initiated by the browser: noVNC says clean, and so does the socket. */
  async function disconnectCleanly(t, page) {
    await disconnectViewer(page);
    await page.waitForFunction(() => window.vg.closes.length === 1);
    const [ev] = await page.evaluate(() => window.vg.closes);
    // noVNC closes without a status code; the gateway echoes that, so the browser reports
    // 1005 (no status received), cleanly.
    assert.ok(ev.clean, `close event: ${JSON.stringify(ev)}`);
    assert.ok(ev.code === 1000 || ev.code === 1005, `close event: ${JSON.stringify(ev)}`);
    t.diagnostic(`close event ${JSON.stringify(ev)}`);
    await page.close();
  }

  for (const protocols of [null, 'binary']) {
    const who = protocols ? 'old noVNC (binary offered)' : 'current noVNC (no subprotocol offered)';
    test(`${who} shows Xvnc's desktop and closes cleanly`, async (t) => {
      const { page } = await viewXvnc(protocols);
      await assertBackground(page);
      await disconnectCleanly(t, page);
    });
  }

  test('keys typed into noVNC reach the xterm on the real VNC server', async (t) => {
    const { page, box } = await viewXvnc(null);
    await assertBackground(page);
    // Point at the xterm (the X focus follows the pointer) and give noVNC the keyboard.
    const rect = await page.locator('#screen canvas').boundingBox();
    const cx = box.x + box.w / 2, cy = box.y + box.h / 2;
    await page.mouse.move(rect.x + cx * rect.width / SCREEN.w, rect.y + cy * rect.height / SCREEN.h);
    await page.evaluate(() => window.rfb.focus());
    await sleep(300);
    await page.evaluate((r) => window.vg.snapshot(r), box);
    // The shell in the xterm writes the line to a file: the keys (shifted ones included)
    // arrived as typed.
    await page.keyboard.type('echo vncgate-ok >"$VNCGATE_MARK"', { delay: 20 });
    await page.keyboard.press('Enter');
    // 31 typed characters and a new prompt: several hundred pixels.
    let changed = 0;
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline) {
      changed = await page.evaluate(() => window.vg.changed());
      if (changed >= 300) break;
      await sleep(100);
    }
    assert.ok(changed >= 300, `pixels changed inside the xterm after typing: ${changed}`);
    t.diagnostic(`xterm at ${JSON.stringify(box)}: ${changed} pixels changed`);
    let typed = null;
    while (Date.now() < deadline && typed === null) {
      typed = await readFile(markFile, 'utf8').catch(() => null);
      if (typed === null) await sleep(100);
    }
    assert.equal(typed, 'vncgate-ok\n', 'the shell in the xterm ran the typed line');
    // Nothing else moved: the background is still the background.
    await assertBackground(page);
    await disconnectCleanly(t, page);
  });

  test('a route to a port where nothing listens closes noVNC with 4000 and its reason', async () => {
    const page = await openViewer('down', null);
    await page.waitForFunction(() => document.getElementById('status').textContent.startsWith('disconnected'),
      null, { timeout: 15000 });
    const closes = await page.evaluate(() => window.vg.closes);
    assert.deepEqual(closes, [{ code: 4000, reason: 'vm vnc port refused', clean: true }]);
    // noVNC itself calls it unclean: the server ended the session before the RFB handshake.
    // noVNC calls it unclean (the close came during its handshake); the page says why.
    assert.equal(await page.textContent('#status'), 'disconnected: 4000 vm vnc port refused (clean: false)');
    await page.close();
  });
});

// ---- Sessions made through the controller's API: the embedded default, and Redis ----

async function api(base, method, path, body) {
  const r = await fetch(`${base}${path}`, {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, json: await r.json() };
}

/**
 * Create a session, wait for ready, show its desktop through `gateway`, delete it, and wait
 * until its VM is gone (its directory under `workDir` removed), so none outlives the test.
 */
async function viewControllerSession(apiBase, gateway, workDir) {
  const c = await api(apiBase, 'POST', '/api/sessions', { user_id: 'browser', provider: 'test' });
  assert.equal(c.status, 201, JSON.stringify(c.json));
  const { id, token } = c.json;
  const w = await api(apiBase, 'GET', `/api/sessions/${id}/wait?state=ready&timeout=30`);
  assert.equal(w.json.state, 'ready', JSON.stringify(w.json));
  await viewDesktop(null, `${gateway}/vnc/${id}?token=${token}`);
  const d = await api(apiBase, 'DELETE', `/api/sessions/${id}`);
  assert.equal(d.status, 202);
  // The VM stops a second after its route is withdrawn, and takes its directory with it.
  for (let i = 0; i < 200 && existsSync(join(workDir, id)); i++) await sleep(50);
  assert.ok(!existsSync(join(workDir, id)), `the VM of ${id} is still there after its deletion`);
}

describe('sessions made through the controller', () => {
  let work;
  before(async () => {
    work = await mkdtemp(join(tmpdir(), 'vncgate-browser-ctl-'));
  });
  after(async () => {
    if (work) await rm(work, { recursive: true, force: true });
  });

  test('the embedded default (no Redis) shows the session\'s desktop in noVNC', async () => {
    const ctl = await startWithLines(CONTROLLER_BIN,
      ['--listen', '127.0.0.1:0', '--gateway-listen', '127.0.0.1:0', '--work-dir', join(work, 'embedded')],
      [/listening on (http:\/\/[0-9.:]+)/, /gateway on (ws:\/\/[0-9.:]+)\//]);
    try {
      await viewControllerSession(ctl.found[0], ctl.found[1], join(work, 'embedded'));
    } finally {
      ctl.child.removeAllListeners('exit');
      await stop(ctl.child);
    }
  });

  test('with Redis and vncgate serve, the session\'s desktop shows in noVNC', async () => {
    const port = await freePort();
    const redis = track(spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
      { stdio: 'ignore' }));
    const url = `redis://127.0.0.1:${port}`;
    let ctl, gate;
    try {
      for (let i = 0; i < 100 && spawnSync('redis-cli', ['-p', String(port), 'ping']).stdout?.toString().trim() !== 'PONG'; i++) {
        await sleep(50);
      }
      ctl = await startWithLines(CONTROLLER_BIN,
        ['--listen', '127.0.0.1:0', '--redis', url, '--work-dir', join(work, 'redis')],
        [/listening on (http:\/\/[0-9.:]+)/]);
      gate = await startWithLines(BIN,
        ['serve', '--listen', '127.0.0.1:0', '--redis', url, '--allow-upstream', '127.0.0.0/8', '--workers', '1'],
        [/listening on (ws:\/\/[0-9.:]+)\//]);
      await viewControllerSession(ctl.found[0], gate.found[0], join(work, 'redis'));
    } finally {
      for (const p of [gate, ctl]) {
        if (p) { p.child.removeAllListeners('exit'); await stop(p.child); }
      }
      await stop(redis);
    }
  });
});
