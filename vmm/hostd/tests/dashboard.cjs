// Drives the vmm-hostd dashboard in headless Chromium (Debian's package)
// through playwright-core: waits for the VM to run with disk I/O in its
// plot, presses Pause, sees the state and the disk plot drop to zero,
// presses Resume, sees them come back, sees the guest's console, and keeps
// a screenshot.
//
// Usage: node dashboard.cjs URL SCREENSHOT [--vm NAME] [--net] [--hold]
// (NODE_PATH must hold playwright-core). --vm: the VM's name (default
// "web"); --net: the NIC plots must follow the state too; --hold: once
// paused, wait for a line on stdin before pressing Resume (so the caller
// can look at the paused VM from outside). Prints "step: ..." per step;
// exits non-zero on failure.
"use strict";

const { chromium } = require("playwright-core");

const args = process.argv.slice(2);
const [url, screenshot] = args;
const option = (name) => args.includes(name);
const name = args.includes("--vm") ? args[args.indexOf("--vm") + 1] : "web";
const withNet = option("--net");
const LIMIT = 45000;
const SETTLE = 3000;

// One line from stdin.
function nextLine() {
  return new Promise((resolve) => {
    process.stdin.once("data", (d) => { process.stdin.pause(); resolve(String(d)); });
  });
}

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
    const vm = `#vm-${name}`;
    const plots = [`${vm} [data-chart=disk_iops]`];
    if (withNet) plots.push(`${vm} [data-chart=net_pps]`, `${vm} [data-chart=net_mbits]`);
    const io = withNet ? "disk and network" : "disk";
    const state = (s) => page.locator(`${vm} .state[data-state=${s}]`).waitFor({ timeout: LIMIT });
    const busy = (busy) => page.waitForFunction(
      ([sels, busy]) => sels.every((sel) => {
        const v = Number(document.querySelector(sel)?.dataset.last || "NaN");
        return busy ? v > 0 : v === 0;
      }), [plots, busy], { timeout: LIMIT });

    await state("Running");
    await busy(true);
    console.log(`step: running, ${io} busy`);
    await page.waitForTimeout(SETTLE); // a few seconds of plot before the pause

    await page.click(`${vm} button[data-action=pause]`);
    await state("Paused");
    await busy(false);
    console.log(`step: paused, ${io} idle`);
    if (option("--hold")) await nextLine();

    await page.click(`${vm} button[data-action=resume]`);
    await state("Running");
    await busy(true);
    console.log(`step: running, ${io} busy`);

    await page.waitForFunction(
      (sel) => document.querySelector(sel)?.textContent.includes("TG: blkcount"),
      `${vm} pre.console`, { timeout: LIMIT });
    console.log("step: console shows the guest");
    await page.waitForTimeout(SETTLE); // the plots going again after the gap


    await page.screenshot({ path: screenshot, fullPage: true });
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.log("error: " + (e && e.stack || e));
  process.exit(1);
});
