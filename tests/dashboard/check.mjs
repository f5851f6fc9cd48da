// Drives the Tether dashboard in headless Chromium (used by tests/dashboard.rs):
//   NODE_PATH=target/pw/node_modules node tests/dashboard/check.mjs URL SCREENSHOT
// Prints "BACKENDS [...]" once the backend rows are shown, clicks Drain on the first
// backend, waits until its state reads "draining", saves a screenshot and prints
// "DRAINED <name>". Exits 1 on any failure.
import { createRequire } from "node:module";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const [url, screenshot] = process.argv.slice(2);
const args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

let context;
try {
  context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "tether-chromium-")), {
    executablePath: "/usr/bin/chromium", headless: true, args, viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  await page.goto(url);
  await page.waitForSelector("tr[data-backend]", { timeout: 10000 });
  const names = await page.$$eval("tr[data-backend]", rows => rows.map(r => r.dataset.backend));
  console.log("BACKENDS " + JSON.stringify(names));
  const first = names[0];
  await page.click(`tr[data-backend="${first}"] button[data-action="drain"]`);
  await page.waitForFunction(
    name => document.querySelector(`tr[data-backend="${name}"] .admin-state`)?.textContent.trim() === "draining",
    first, { timeout: 10000 });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log("DRAINED " + first);
  await context.close();
  process.exit(0);
} catch (err) {
  console.log("FAILED " + (err && err.stack || err));
  if (context) await context.close().catch(() => {});
  process.exit(1);
}
