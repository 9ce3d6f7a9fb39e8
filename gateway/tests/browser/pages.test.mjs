// Every HTML page the project ships (`git ls-files '*.html'`: today config/demo/viewer.html)
// shows the close code and reason the gateway sent, in headless Chromium: each is opened with
// `?url=` pointing at a session whose VM refuses the connection, and its text must come to
// hold `4000 vm vnc port refused`. A page added to the repository is covered without editing
// this file; one that cannot show why a session ended fails here. (The contract of a shipped
// page: it takes the WebSocket URL as `?url=`, as the demo viewer does.)
//
// Started by scripts/browser-test.sh from the repository root, with:
//   VNCGATE_BIN   the gateway binary
//   VIEWER_DIR    a folder holding node_modules (@novnc/novnc), which pages import relatively
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join, normalize } from 'node:path';
import { VIEWER_DIR, freePort, launchChromium, serveFiles, startGateway, stop } from './harness.mjs';

const ROOT = spawnSync('git', ['rev-parse', '--show-toplevel'], { encoding: 'utf8' }).stdout.trim();
const PAGES = spawnSync('git', ['ls-files', '*.html', '*.htm'], { cwd: ROOT, encoding: 'utf8' })
  .stdout.split('\n').filter(Boolean);
let gw, gwBase, http, httpPort, browser;

before(async () => {
  // A port with nothing listening: the VM whose VNC server never started.
  const refused = await freePort();
  gw = await startGateway(['serve', '--listen', '127.0.0.1:0', '--workers', '1',
    '--route', `down=127.0.0.1:${refused}`, '--allow-upstream', '127.0.0.1/32',
    '--connect-retry-window', '0', '--drain-timeout', '1']);
  gwBase = gw.base;
  // The repository's files as they are, and node_modules from VIEWER_DIR wherever a page
  // imports it from (`./node_modules/...` next to the page).
  ({ server: http, port: httpPort } = await serveFiles((pathname) => {
    const path = normalize(decodeURIComponent(pathname));
    const nm = path.indexOf('/node_modules/');
    return nm >= 0 ? join(VIEWER_DIR, path.slice(nm)) : join(ROOT, path);
  }));
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  http?.close();
  if (gw) await stop(gw.child);
});

test('the project ships at least the demo viewer page', () => {
  assert.ok(PAGES.includes('config/demo/viewer.html'), `pages found: ${JSON.stringify(PAGES)}`);
});

for (const page of PAGES) {
  test(`${page} shows the close code and reason the gateway sent`, async () => {
    const tab = await browser.newPage();
    try {
      const ws = encodeURIComponent(`${gwBase}/vnc/down`);
      await tab.goto(`http://127.0.0.1:${httpPort}/${page}?url=${ws}`);
      await tab.waitForFunction(() => /\b4\d{3}\b/.test(document.body.innerText), null, { timeout: 15000 })
        .catch(() => {});
      const text = await tab.evaluate(() => document.body.innerText);
      assert.match(text, /4000 vm vnc port refused/, `${page} shows: ${JSON.stringify(text)}`);
    } finally {
      await tab.close();
    }
  });
}
