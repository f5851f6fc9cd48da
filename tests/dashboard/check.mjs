// Drives the Tether dashboard in headless Chromium (used by tests/dashboard.rs):
//
//   NODE_PATH=target/pw/node_modules node tests/dashboard/check.mjs URL SCREENSHOT
//
// Waits for the backend rows (`tr[data-backend]`), prints `BACKENDS ["a","b",...]`,
// clicks the Drain button (`button[data-action="drain"]`) of the first row, waits until
// that row's `.admin-state` cell reads `draining`, lets the charts gather a little data,
// saves a full-page screenshot to SCREENSHOT and prints `DRAINED <name>`. Exit 0 on
// success; on any failure prints the error and exits 1.
//
// Needs /usr/bin/chromium and the npm package playwright-core (found by a plain import
// or through NODE_PATH, which ES modules do not consult by themselves).
import { createRequire } from "node:module";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";

const CHROMIUM = "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const OVERALL_TIMEOUT_MS = 90_000;

async function loadChromium() {
  try {
    const m = await import("playwright-core");
    const chromium = m.chromium ?? m.default?.chromium;
    if (chromium) return chromium;
  } catch { /* not resolvable from here: try NODE_PATH */ }
  const require = createRequire(import.meta.url);
  try {
    return require("playwright-core").chromium;
  } catch (first) {
    for (const dir of (process.env.NODE_PATH || "").split(delimiter).filter(Boolean)) {
      try { return require(join(dir, "playwright-core")).chromium; } catch { /* next */ }
    }
    throw new Error(`cannot load playwright-core (NODE_PATH=${process.env.NODE_PATH || ""}): ${first.message}`);
  }
}

function fail(err) {
  console.log("ERROR " + String(err && err.message || err).split("\n")[0]);
  if (err && err.stack) console.error(err.stack);
}

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.log("usage: node tests/dashboard/check.mjs <dashboard-url> <screenshot-path>");
  process.exit(1);
}

const userDataDir = mkdtempSync(join(tmpdir(), "tether-dashboard-"));
let context = null;
const cleanup = async () => {
  if (context) await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
};
const guard = setTimeout(async () => {
  fail(new Error(`gave up after ${OVERALL_TIMEOUT_MS / 1000}s`));
  await cleanup();
  process.exit(1);
}, OVERALL_TIMEOUT_MS);

let code = 1;
try {
  const chromium = await loadChromium();
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ARGS,
    viewport: { width: 1360, height: 900 },
  });
  const page = context.pages()[0] ?? await context.newPage();
  const pageErrors = [];
  page.on("pageerror", e => { pageErrors.push(e); console.error("PAGE ERROR " + (e.stack || e.message)); });
  page.on("console", m => { if (m.type() === "error") console.error("PAGE CONSOLE " + m.text()); });

  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 15_000 });
  const title = await page.title();
  if (title !== "Tether dashboard") throw new Error(`unexpected page title ${JSON.stringify(title)}`);

  await page.waitForSelector("tr[data-backend]", { timeout: 15_000 });
  const names = await page.$$eval("tr[data-backend]", rows => rows.map(r => r.getAttribute("data-backend")));
  console.log("BACKENDS " + JSON.stringify(names));

  const first = names[0];
  const row = page.locator("tr[data-backend]").first();
  const drain = row.locator('button[data-action="drain"]');
  if (await drain.count() === 0) {
    const state = (await row.locator(".admin-state").textContent() || "").trim();
    throw new Error(`the first backend ${JSON.stringify(first)} has no Drain button (state ${JSON.stringify(state)})`);
  }
  await drain.click({ timeout: 10_000 });

  // The first row carrying that name: rows are looked up afresh, so a re-render cannot
  // leave the wait holding a detached element.
  await page.waitForFunction(name => {
    const r = [...document.querySelectorAll("tr[data-backend]")].find(r => r.getAttribute("data-backend") === name);
    return r?.querySelector(".admin-state")?.textContent.trim() === "draining";
  }, first, { timeout: 10_000, polling: 100 }).catch(async () => {
    const state = await page.$$eval("tr[data-backend]", (rows, name) =>
      rows.find(r => r.getAttribute("data-backend") === name)?.querySelector(".admin-state")?.textContent.trim(), first);
    throw new Error(`${first} did not turn draining within 10s (state ${JSON.stringify(state)})`);
  });

  await page.waitForTimeout(1500);
  await page.screenshot({ path: screenshot, fullPage: true });
  if (pageErrors.length) throw new Error(`the page threw: ${pageErrors[0].message}`);
  console.log("DRAINED " + first);
  code = 0;
} catch (err) {
  fail(err);
} finally {
  clearTimeout(guard);
  await cleanup();
}
process.exit(code);
