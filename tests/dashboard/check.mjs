// Drives the Tether dashboard in headless Chromium (used by tests/dashboard.rs):
//
//   NODE_PATH=target/pw/node_modules node tests/dashboard/check.mjs URL SCREENSHOT
//
// Waits for the backend rows (`tr[data-backend]`), prints `BACKENDS ["a","b",...]`,
// then the traffic splits' rows (`#splits-body tr`) as `SPLITS [[cell, ...], ...]`,
// clicks the Drain button (`button[data-action="drain"]`) of the first row, waits until
// that row's `.admin-state` cell reads `draining`, lets the charts gather a little data,
// saves a full-page screenshot to SCREENSHOT and prints `DRAINED <name>`. Exit 0 on
// success; on any failure prints the error and exits 1.
//
// Needs /usr/bin/chromium and the npm package playwright-core (tests/support/chromium.mjs
// finds and launches them).
import { inChromium } from "../support/chromium.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  console.log("usage: node tests/dashboard/check.mjs <dashboard-url> <screenshot-path>");
  process.exit(1);
}

await inChromium({ profile: "tether-dashboard", timeoutMs: 90_000, viewport: { width: 1360, height: 900 } }, async ({ page, pageErrors }) => {
  page.on("console", m => { if (m.type() === "error") console.error("PAGE CONSOLE " + m.text()); });

  await page.goto(url, { waitUntil: "domcontentloaded", timeout: 15_000 });
  const title = await page.title();
  if (title !== "Tether dashboard") throw new Error(`unexpected page title ${JSON.stringify(title)}`);

  await page.waitForSelector("tr[data-backend]", { timeout: 15_000 });
  const names = await page.$$eval("tr[data-backend]", rows => rows.map(r => r.getAttribute("data-backend")));
  console.log("BACKENDS " + JSON.stringify(names));

  await page.waitForSelector("#splits-body tr", { timeout: 15_000 });
  const splits = await page.$$eval("#splits-body tr", rows => rows.map(r => [...r.cells].map(c => c.textContent.trim())));
  console.log("SPLITS " + JSON.stringify(splits));

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
});
