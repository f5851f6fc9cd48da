// Headless Chromium for the tests' page checks (tests/dashboard/check.mjs and
// tests/simulate/check.mjs).
//
// `inChromium(options, check)` finds playwright-core (by a plain import, or through
// NODE_PATH, which ES modules do not consult by themselves), launches /usr/bin/chromium
// on a throwaway profile and runs `check({ page, pageErrors })`, where `pageErrors`
// collects what the page throws. It exits the process: 0 when the check returns, 1 with
// `ERROR <message>` when it throws or when `timeoutMs` runs out first. The profile is
// removed either way.
import { createRequire } from "node:module";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";

const CHROMIUM = "/usr/bin/chromium";
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

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

export async function inChromium({ profile, timeoutMs, viewport }, check) {
  const userDataDir = mkdtempSync(join(tmpdir(), `${profile}-`));
  let context = null;
  const cleanup = async () => {
    if (context) await context.close().catch(() => {});
    rmSync(userDataDir, { recursive: true, force: true });
  };
  const guard = setTimeout(async () => {
    fail(new Error(`gave up after ${timeoutMs / 1000}s`));
    await cleanup();
    process.exit(1);
  }, timeoutMs);

  let code = 1;
  try {
    const chromium = await loadChromium();
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM, headless: true, args: ARGS, viewport,
    });
    const page = context.pages()[0] ?? await context.newPage();
    const pageErrors = [];
    page.on("pageerror", e => { pageErrors.push(e); console.error("PAGE ERROR " + (e.stack || e.message)); });
    await check({ page, pageErrors });
    code = 0;
  } catch (err) {
    fail(err);
  } finally {
    clearTimeout(guard);
    await cleanup();
  }
  process.exit(code);
}
