// View-only links in noVNC itself (node --test, started by scripts/browser-test.sh): noVNC in
// headless Chromium through `vncgate serve` to TigerVNC's Xvnc with an xterm, once with the
// route's view token and once with its full token. Keys typed into the view-only noVNC do not
// reach the shell (the gateway drops them, counted), while the desktop still shows and the
// session stays up (noVNC's own messages to the server, fences and continuous updates
// included, pass the gateway's filter); the same keys through the full token run.
// Environment as for novnc.test.mjs: VNCGATE_BIN, VIEWER_DIR.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  BIN, disconnectViewer, launchChromium, serveViewer, setRoot, startWithLines, startXterm, startXvnc, stop,
  until, viewerConnected,
} from './harness.mjs';

const FULL = 'full-token-2';
const VIEW = 'view-token-2';
const SCREEN = { w: 800, h: 600 };
// The xterm covers the screen's centre, where Xvnc starts the pointer: keys that reached the
// server would reach the xterm even from a viewer whose pointer moves are dropped.
const XTERM_AT = { x: 100, y: 100 };

let dir, xvnc, xterm, gate, http, httpPort, browser;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vncgate-view-only-'));
  xvnc = await startXvnc(SCREEN, 700 + (process.pid % 200), { shared: false });
  setRoot(xvnc.display, [0x33, 0x66, 0xcc]);
  xterm = startXterm(xvnc.display, XTERM_AT, ['+sb', '-e', '/bin/sh', '-c', 'touch .ready; exec /bin/sh'], { cwd: dir });
  await until('the xterm\'s shell', () => existsSync(join(dir, '.ready')));

  const routes = join(dir, 'routes.toml');
  await writeFile(routes, `[[route]]\nsession = "desk"\nupstream = "127.0.0.1:${xvnc.port}"\n`
    + `token = "${FULL}"\nview_token = "${VIEW}"\n`);
  const started = await startWithLines(BIN, ['serve', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0',
    '--workers', '1', '--routes-file', routes, '--allow-upstream', '127.0.0.0/8'],
  [/listening on (ws:\/\/[0-9.:]+)\//, /admin on (http:\/\/[0-9.:]+)/]);
  gate = { child: started.child, base: started.found[0], admin: started.found[1] };

  ({ server: http, port: httpPort } = await serveViewer());
  browser = await launchChromium();
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
  await viewerConnected(page);
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
  await disconnectViewer(view);
  await view.close();
});
