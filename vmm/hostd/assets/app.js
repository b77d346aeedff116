// The vmm-hostd dashboard: polls /api/vms every second, keeps the last
// minutes of each VM's rates and plots them with uPlot, follows each VM's
// serial output, and sends the lifecycle buttons' actions.
"use strict";

const KEEP = 300; // samples (seconds) kept per VM
const POLL_MS = 1000;

// Plots: key, title, series (label, stroke, how to compute the value from
// two readings a and b, dt seconds apart).
const CHARTS = [
  { key: "cpu", title: "CPU (% of one host CPU)", series: [
    ["vCPUs", "#1e88e5", (a, b, dt) => (b.cpu_us - a.cpu_us) / 1e4 / dt],
  ] },
  { key: "memory", title: "Memory (MiB backed)", series: [
    ["memory", "#8e24aa", (a, b) => b.mem_bytes / 1048576],
  ] },
  { key: "disk_iops", title: "Disk (IOPS)", series: [
    ["reads", "#43a047", (a, b, dt) => (b.disk.reads - a.disk.reads) / dt],
    ["writes", "#e53935", (a, b, dt) => (b.disk.writes - a.disk.writes) / dt],
  ] },
  { key: "disk_mbs", title: "Disk (MB/s)", series: [
    ["read", "#43a047", (a, b, dt) => (b.disk.read_bytes - a.disk.read_bytes) / 1e6 / dt],
    ["write", "#e53935", (a, b, dt) => (b.disk.write_bytes - a.disk.write_bytes) / 1e6 / dt],
  ] },
  { key: "net_pps", title: "Network (packets/s)", series: [
    ["rx", "#00897b", (a, b, dt) => (b.net.rx_packets - a.net.rx_packets) / dt],
    ["tx", "#f4511e", (a, b, dt) => (b.net.tx_packets - a.net.tx_packets) / dt],
  ] },
  { key: "net_mbits", title: "Network (Mbit/s)", series: [
    ["rx", "#00897b", (a, b, dt) => (b.net.rx_bytes - a.net.rx_bytes) * 8 / 1e6 / dt],
    ["tx", "#f4511e", (a, b, dt) => (b.net.tx_bytes - a.net.tx_bytes) * 8 / 1e6 / dt],
  ] },
];

const ACTIONS = [
  ["pause", "Pause"], ["resume", "Resume"], ["reboot", "Reboot"],
  ["shutdown", "Shut down"], ["power-off", "Power off"], ["snapshot", "Snapshot"],
];

const vms = new Map(); // name -> view

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c);
  return e;
}

function fmt(n) {
  return Math.abs(n) >= 100 ? n.toFixed(0) : n.toFixed(2);
}

function newView(vm) {
  const card = el("section", { class: "vm", id: "vm-" + vm.name, "data-name": vm.name });
  const state = el("span", { class: "state" });
  const actions = el("span", { class: "actions" });
  const message = el("span", { class: "message" });
  for (const [action, label] of ACTIONS) {
    const b = el("button", { "data-action": action }, label);
    b.addEventListener("click", () => act(vm.name, action, message));
    actions.append(b);
  }
  const facts = el("div", { class: "facts" });
  const devices = el("ul", { class: "devices" });
  const charts = el("div", { class: "charts" });
  const consoleOut = el("pre", { class: "console" });
  card.append(el("div", {}, el("h2", {}, vm.name), state, actions, message),
    facts, devices, charts, consoleOut);
  document.getElementById("vms").append(card);
  const view = { card, state, facts, devices, consoleOut, prev: null, times: [], plots: [],
    consoleFrom: 0, consoleBusy: false };
  for (const c of CHARTS) {
    const last = el("span", { class: "last" });
    const box = el("div", { class: "chart", "data-chart": c.key, "data-last": "" },
      el("h3", {}, c.title + " ", last));
    charts.append(box);
    const opts = {
      width: 340, height: 150, legend: { show: true },
      scales: { x: { time: true } },
      series: [{}].concat(c.series.map(([label, stroke]) => ({ label, stroke, width: 1.5 }))),
      axes: [{}, { size: 50 }],
    };
    const data = [[]].concat(c.series.map(() => []));
    view.plots.push({ chart: c, box, last, data, plot: new uPlot(opts, data, box) });
  }
  return view;
}

function describe(view, vm) {
  view.state.textContent = vm.state;
  view.state.setAttribute("data-state", vm.state);
  view.card.setAttribute("data-state", vm.state);
  const mem = vm.memory ? (vm.memory / 1048576).toFixed(0) + " MiB" : "?";
  const serial = vm.serial ? vm.serial.mode + (vm.serial.file ? " " + vm.serial.file : "") : "?";
  view.facts.textContent = `vCPUs ${vm.cpus ?? "?"} · memory ${mem} · serial ${serial} · API ${vm.socket}`
    + (vm.error ? ` · error: ${vm.error}` : "");
  view.devices.replaceChildren(...vm.devices.map((d) =>
    el("li", {}, `${d.kind} ${d.id}: ${d.queues ?? "?"} queues, backend ${d.socket}` + (d.mac ? `, mac ${d.mac}` : ""))));
}

function sample(view, vm) {
  const prev = view.prev;
  view.prev = vm;
  if (!prev || vm.t <= prev.t) return;
  const dt = (vm.t - prev.t) / 1000;
  for (const p of view.plots) {
    p.data[0].push(vm.t / 1000);
    const values = p.chart.series.map(([, , f]) => Math.max(0, f(prev, vm, dt)));
    values.forEach((v, i) => p.data[i + 1].push(v));
    if (p.data[0].length > KEEP) p.data.forEach((s) => s.shift());
    p.plot.setData(p.data);
    const shown = values.map(fmt).join(" / ");
    p.last.textContent = shown;
    p.box.setAttribute("data-last", values.reduce((s, v) => s + v, 0));
  }
}

async function followConsole(name, view) {
  if (view.consoleBusy) return;
  view.consoleBusy = true;
  try {
    const r = await fetch(`/api/vms/${encodeURIComponent(name)}/console?from=${view.consoleFrom}`);
    if (r.ok) {
      const c = await r.json();
      if (c.data) {
        const atBottom = view.consoleOut.scrollTop + view.consoleOut.clientHeight >= view.consoleOut.scrollHeight - 4;
        view.consoleOut.textContent = (view.consoleOut.textContent + c.data).slice(-65536);
        if (atBottom) view.consoleOut.scrollTop = view.consoleOut.scrollHeight;
      }
      view.consoleFrom = c.total;
    }
  } finally {
    view.consoleBusy = false;
  }
}

async function act(name, action, message) {
  message.textContent = action + "…";
  try {
    const r = await fetch(`/api/vms/${encodeURIComponent(name)}/${action}`,
      { method: "POST", headers: { "X-Vmm-Hostd": "1" } });
    const body = await r.text();
    message.textContent = r.ok ? "" : `${action}: ${body.trim()}`;
    if (r.ok && action === "snapshot") message.textContent = "snapshot in " + JSON.parse(body).path;
  } catch (e) {
    message.textContent = `${action}: ${e}`;
  }
  poll();
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/api/vms");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const list = await r.json();
    const seen = new Set();
    for (const vm of list) {
      seen.add(vm.name);
      let view = vms.get(vm.name);
      if (!view) { view = newView(vm); vms.set(vm.name, view); }
      describe(view, vm);
      sample(view, vm);
      followConsole(vm.name, view);
    }
    for (const [name, view] of vms) {
      if (!seen.has(name)) { view.card.remove(); vms.delete(name); }
    }
    status.textContent = `${list.length} VM(s) · updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    status.textContent = "cannot reach vmm-hostd: " + e;
  }
}

poll();
setInterval(poll, POLL_MS);
