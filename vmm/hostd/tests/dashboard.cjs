// Drives the vmm-hostd dashboard in headless Chromium (Debian's package)
// through playwright-core: waits for the VM "web" to run with disk I/O in
// its plot, presses Pause, sees the state and the disk plot drop to zero,
// presses Resume, sees them come back, sees the guest's console, and keeps
// a screenshot. Usage: node dashboard.cjs URL SCREENSHOT (NODE_PATH must
// hold playwright-core). Prints "step: ..." per step; exits non-zero on
// failure.
"use strict";

const { chromium } = require("playwright-core");

const [url, screenshot] = process.argv.slice(2);
const LIMIT = 45000;

async function main() {
  const browser = await chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
    page.on("pageerror", (e) => console.log("page error: " + e));
    await page.goto(url);
    const vm = "#vm-web";
    const iops = `${vm} [data-chart=disk_iops]`;
    const state = (s) => page.locator(`${vm} .state[data-state=${s}]`).waitFor({ timeout: LIMIT });
    const diskBusy = (busy) => page.waitForFunction(
      ([sel, busy]) => {
        const v = Number(document.querySelector(sel)?.dataset.last || "NaN");
        return busy ? v > 0 : v === 0;
      }, [iops, busy], { timeout: LIMIT });

    await state("Running");
    await diskBusy(true);
    console.log("step: running, disk busy");

    await page.click(`${vm} button[data-action=pause]`);
    await state("Paused");
    await diskBusy(false);
    console.log("step: paused, disk idle");

    await page.click(`${vm} button[data-action=resume]`);
    await state("Running");
    await diskBusy(true);
    console.log("step: running, disk busy");

    await page.waitForFunction(
      (sel) => document.querySelector(sel)?.textContent.includes("TG: blkcount"),
      `${vm} pre.console`, { timeout: LIMIT });
    console.log("step: console shows the guest");

    await page.screenshot({ path: screenshot, fullPage: true });
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.log("error: " + (e && e.stack || e));
  process.exit(1);
});
