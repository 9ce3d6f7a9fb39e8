// `vncgate websockify` in place of websockify (node --test): Debian's own noVNC package
// (/usr/share/novnc) served by the gateway itself with --web, its own vnc.html driven in
// headless Chromium to a real Xvnc (a solid background and an xterm) through
// `vnc.html?path=websockify?token=...&autoconnect=true`, the token picked from a websockify
// TokenFile. Started by scripts/browser-test.sh, which installs chromium, novnc, Xvnc,
// xterm, xsetroot and playwright-core and passes VNCGATE_BIN.
import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  exited, freePort, launchChromium, near as nearWithin, setRoot, sleep, startGateway, startXterm, startXvnc, stop,
} from './harness.mjs';

const NOVNC = '/usr/share/novnc';
const SCREEN = { w: 800, h: 600 };
const BACKGROUND = [0x33, 0x66, 0xcc]; // xsetroot -solid '#3366cc'
const XTERM_AT = { x: 100, y: 100 }; // 80x24 cells of 6x13: about 100..590 x 100..420
const TOKEN = 'novnc-browser-7d41e9';

describe("Debian's noVNC from vncgate websockify --web, to a real Xvnc", () => {
  let xvnc, xterm, gate, browser, tmp, port;

  before(async () => {
    assert.ok(existsSync(join(NOVNC, 'vnc.html')),
      `${NOVNC}/vnc.html is missing: scripts/browser-test.sh installs Debian's novnc`);
    tmp = await mkdtemp(join(tmpdir(), 'vncgate-websockify-'));
    xvnc = await startXvnc(SCREEN, 400 + (process.pid % 300));
    setRoot(xvnc.display, BACKGROUND);
    xterm = startXterm(xvnc.display, XTERM_AT, ['-bg', 'black', '-fg', 'white', '+sb', '-bw', '0', '-e', '/bin/sh']);
    await sleep(300);
    assert.ok(!exited(xterm), 'xterm exited at once');
    // websockify's TokenFile format, a comment and a blank line included.
    const tokens = join(tmp, 'tokens');
    await writeFile(tokens, `# vncgate browser test\n\n${TOKEN}: 127.0.0.1:${xvnc.port}\n`);
    port = await freePort();
    // The migration: websockify's own command line, one word added.
    gate = await startGateway(['websockify', '--web', NOVNC, '--token-plugin', 'TokenFile',
      '--token-source', tokens, '--workers', '1', `127.0.0.1:${port}`]);
    browser = await launchChromium();
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
    const near = (a, b) => nearWithin(a, b, 24);
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
