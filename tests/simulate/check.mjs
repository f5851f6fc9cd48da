// Opens a `tether simulate` HTML report in headless Chromium (used by tests/simulate.rs):
//
//   NODE_PATH=target/pw/node_modules node tests/simulate/check.mjs REPORT.html SCREENSHOT
//
// Checks that the page loads no external resource, then that every chart is an SVG the
// browser laid out (non-zero size) whose lines have drawn geometry: for each
// `path.line`, a `d` with at least two points and a bounding box with a non-zero width.
// Prints `CHART <id> <lines>` per chart and `PATH <chart id> <series> <points> <width>
// <height>` per line, saves a full-page screenshot, and exits 0; on any failure prints
// `ERROR <message>` and exits 1.
//
// Needs /usr/bin/chromium and the npm package playwright-core (tests/support/chromium.mjs
// finds and launches them).
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { inChromium } from "../support/chromium.mjs";

const [report, screenshot] = process.argv.slice(2);
if (!report || !screenshot) {
  console.log("usage: node tests/simulate/check.mjs <report.html> <screenshot-path>");
  process.exit(1);
}

await inChromium({ profile: "tether-simulate", timeoutMs: 60_000, viewport: { width: 1000, height: 800 } }, async ({ page, pageErrors }) => {
  const external = [];
  page.on("request", r => { if (!r.url().startsWith("file:")) external.push(r.url()); });

  await page.goto(pathToFileURL(resolve(report)).href, { waitUntil: "load", timeout: 15_000 });
  if (!(await page.title()).startsWith("tether simulate")) throw new Error(`unexpected title ${await page.title()}`);
  const charts = await page.$$eval("svg.chart", svgs => svgs.map(svg => {
    const box = svg.getBoundingClientRect();
    const lines = [...svg.querySelectorAll("path.line")].map(p => {
      const b = p.getBBox();
      const d = p.getAttribute("d") || "";
      return { series: p.getAttribute("data-series"), points: (d.match(/[ML]/g) || []).length, w: b.width, h: b.height };
    });
    return { id: svg.id, w: box.width, h: box.height, lines };
  }));
  if (charts.length === 0) throw new Error("no chart in the report");
  for (const c of charts) {
    if (!(c.w > 0 && c.h > 0)) throw new Error(`chart ${c.id} was not laid out (${c.w}x${c.h})`);
    console.log(`CHART ${c.id} ${c.lines.length}`);
    for (const l of c.lines) console.log(`PATH ${c.id} ${l.series} ${l.points} ${l.w.toFixed(1)} ${l.h.toFixed(1)}`);
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  if (external.length) throw new Error(`the report loaded external resources: ${external.join(", ")}`);
  if (pageErrors.length) throw new Error(`the page threw: ${pageErrors[0].message}`);
});
