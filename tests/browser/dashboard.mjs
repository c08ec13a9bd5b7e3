// The operator dashboard (GET / on the admin listener) in headless Chromium.
//
// Starts petrel with a tcp listener and an [admin] listener on 127.0.0.1 and no admin token, so
// the broker makes one up and logs `http://ADDR/#token=TOKEN`; the test reads that link from the
// log and opens it (the path an operator takes). Then, with MQTT clients from Node (the `mqtt`
// package over TCP) it checks that the page follows the broker:
//   - the link opens the dashboard and the token leaves the address bar;
//   - the connections tile counts the clients as they connect;
//   - while one client publishes a stream on dash/test/topic, the messages-in rate is > 0, the
//     topic is in the top-topics table, and the charts are drawn;
//   - the client list holds every client, and the search box narrows it (by id and by address);
//   - Disconnect, with the confirm() dismissed, leaves the client connected; accepted, it
//     closes that client's connection (the MQTT 5 client gets DISCONNECT 0x98) and the list
//     and the tile follow;
//   - a wrong token in the link, and no token at all, show the token form; the form opens the
//     dashboard with the right token;
//   - the page never has two requests in flight to one endpoint (polls do not pile up);
//   - no page error and no CSP violation along the way;
//   - the broker logged no panic and exits 0 on SIGTERM.
// Full-page screenshots go to $ARTIFACTS_DIR (default <repo>/target/test-artifacts/):
// dashboard.png at 1280x800 and dashboard-narrow.png at 390x844.
//
// Environment: PETREL_BIN, CHROMIUM, RUST_LOG, KEEP_LOGS as in run.mjs; ARTIFACTS_DIR.
// Prints "PASS  <case> (<detail>)" or "FAIL  <case>: <why>" per case, then "N passed, M failed";
// exits 1 if anything failed. Bounded at 60 s; the broker and the clients are stopped on every
// exit path.

import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "../..");
const HOST = "127.0.0.1";
const PETREL = process.env.PETREL_BIN || path.join(ROOT, "target", "debug", "petrel");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = path.resolve(process.env.ARTIFACTS_DIR || path.join(ROOT, "target", "test-artifacts"));
const RUN_DEADLINE_MS = 60_000; // the whole run
const START_WAIT_MS = 10_000; // broker listening and its admin link logged
const STEP_MS = 8_000; // one expectation on the page
const STOP_WAIT_MS = 10_000; // broker exit after SIGTERM
const TOPIC = "dash/test/topic";

const t0 = Date.now();
const work = fs.mkdtempSync(path.join(os.tmpdir(), "petrel-dashboard-"));
let broker = null;
let brokerLog = "";
let brokerExit = null;
let browser = null;
const clients = []; // MqttClient, ended at cleanup
let publishing = null; // interval
let passed = 0;
let failed = 0;
let aborting = false;

function abort(why, showLog = true) {
  if (aborting) return new Promise(() => {});
  aborting = true;
  clearTimeout(watchdog);
  console.log(`FAIL  ${why}`);
  if (showLog) dumpBrokerLog();
  console.log(`${passed} passed, ${failed + 1} failed`);
  cleanup().finally(() => process.exit(1));
  return new Promise(() => {});
}
const fatal = (why) => abort(`setup: ${why}`);

// --- cleanup on every exit path ---------------------------------------------------------------

function killBrokerNow() {
  if (broker && broker.exitCode === null && broker.signalCode === null) {
    try {
      broker.kill("SIGKILL");
    } catch {
      /* already gone */
    }
  }
}

function removeWork() {
  if (process.env.KEEP_LOGS) return;
  try {
    fs.rmSync(work, { recursive: true, force: true });
  } catch {
    /* best effort */
  }
}

async function cleanup() {
  clearInterval(publishing);
  for (const c of clients) c.end(true);
  const closing = browser ? Promise.race([browser.close().catch(() => {}), sleep(5_000)]) : Promise.resolve();
  browser = null;
  await closing;
  killBrokerNow();
  removeWork();
}

process.on("exit", () => {
  killBrokerNow();
  removeWork();
});
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => abort(`run: interrupted by ${sig}`, false));
}
process.on("uncaughtException", (e) => abort(`run: uncaught exception: ${e && e.stack ? e.stack : e}`));
process.on("unhandledRejection", (e) => abort(`run: unhandled rejection: ${e && e.stack ? e.stack : e}`));
const watchdog = setTimeout(() => abort(`run: did not finish within ${RUN_DEADLINE_MS / 1000} s`), RUN_DEADLINE_MS);

// --- helpers ------------------------------------------------------------------------------------

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

function dumpBrokerLog() {
  if (!brokerLog) return;
  const lines = brokerLog.trimEnd().split("\n");
  const tail = lines.slice(-60);
  console.log(`---- broker log (last ${tail.length} of ${lines.length} lines) ----`);
  for (const line of tail) console.log(`  ${line}`);
  console.log("---- end of broker log ----");
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, HOST, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function tryConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: HOST, port });
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(500, () => done(false));
    sock.once("connect", () => done(true));
    sock.once("error", () => done(false));
  });
}

function report(name, ok, detail) {
  if (aborting) return ok;
  if (ok) {
    passed++;
    console.log(`PASS  ${name} (${detail})`);
  } else {
    failed++;
    console.log(`FAIL  ${name}: ${detail}`);
  }
  return ok;
}

// Runs one case: `body` returns the PASS detail or throws with the reason.
async function check(name, body) {
  if (aborting) return false;
  const started = Date.now();
  try {
    const detail = await body();
    return report(name, true, `${detail ? `${detail}, ` : ""}${Date.now() - started} ms`);
  } catch (e) {
    return report(name, false, (e && e.message ? e.message : String(e)).split("\n")[0]);
  }
}

// A tile's figure as a number ("1,234" → 1234, "3.4" → 3.4); NaN while it shows "–".
const tileValue = (page, testid) =>
  page.locator(`[data-testid="${testid}"]`).textContent().then((t) => Number(t.replace(/,/g, "")));

// Waits until `probe()` returns a truthy value; returns it, or throws `what` with the last value.
async function until(what, probe, ms = STEP_MS) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await probe();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`${what} (after ${ms} ms${last === false || last == null ? "" : `, last ${JSON.stringify(last)}`})`);
    await sleep(100);
  }
}

// The client ids in the client table, in order.
const listedClients = (page) =>
  page.$$eval("#clients-body tr[data-client-id]", (rows) => rows.map((r) => r.dataset.clientId));

// --- the pieces ---------------------------------------------------------------------------------

// Starts the broker; resolves with the MQTT port and the admin link the broker logged.
async function startBroker() {
  if (!fs.existsSync(PETREL)) {
    return fatal(`no petrel binary at ${PETREL} (build it: cargo build -p petrel-server --bin petrel, or set PETREL_BIN)`);
  }
  const mqttPort = await freePort();
  const config = path.join(work, "petrel.toml");
  // No token: the broker makes one and logs the dashboard link; port 0: the link names the port.
  fs.writeFileSync(
    config,
    [
      "[[listeners]]",
      'protocol = "tcp"',
      `bind = "${HOST}:${mqttPort}"`,
      "",
      "[storage]",
      'mode = "memory"',
      "",
      "[admin]",
      `bind = "${HOST}:0"`,
      "",
    ].join("\n")
  );
  const logFile = path.join(work, "petrel.log");
  broker = spawn(PETREL, ["--config", config], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", NO_COLOR: "1" },
  });
  brokerExit = new Promise((resolve) => {
    broker.once("exit", (code, signal) => resolve({ code, signal }));
    broker.once("error", (e) => {
      brokerLog += `spawn error: ${e.message}\n`;
      resolve({ code: null, signal: null, error: e });
    });
  });
  const onData = (chunk) => {
    brokerLog += chunk.toString();
    fs.appendFileSync(logFile, chunk);
  };
  broker.stdout.on("data", onData);
  broker.stderr.on("data", onData);

  const deadline = Date.now() + START_WAIT_MS;
  for (;;) {
    if (broker.exitCode !== null || broker.signalCode !== null) {
      const { code, signal } = await brokerExit;
      return fatal(`petrel exited at start (code ${code}, signal ${signal})`);
    }
    // Strip colour codes in case the logger adds them anyway.
    const link = brokerLog.replace(/\x1b\[[0-9;]*m/g, "").match(/http:\/\/(127\.0\.0\.1:\d+)\/#token=([0-9A-Za-z_-]+)/);
    if (link && (await tryConnect(mqttPort))) {
      return { mqttPort, adminAddr: link[1], token: link[2], link: link[0] };
    }
    if (Date.now() > deadline) {
      return fatal(
        link
          ? `petrel does not listen on ${HOST}:${mqttPort} after ${START_WAIT_MS / 1000} s`
          : `petrel logged no "http://.../#token=..." admin link within ${START_WAIT_MS / 1000} s`
      );
    }
    await sleep(50);
  }
}

async function launchBrowser() {
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch (e) {
    return fatal(`playwright-core is not installed (run npm ci in tests/browser): ${e.message}`);
  }
  if (!fs.existsSync(CHROMIUM)) {
    return fatal(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  }
  try {
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"], timeout: 30_000 });
  } catch (e) {
    return fatal(`Chromium did not start: ${e.message}`);
  }
}

// A fresh page (own sessionStorage) whose errors and CSP violations are collected in `problems`.
async function newPage(problems, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    // A refused token is a 401 the page handles; Chromium still logs the failed load.
    if (m.type() === "error" && !/status of 401/.test(m.text())) problems.push(`console.error: ${m.text()}`);
  });
  return page;
}

async function connectClient(mqtt, port, clientId, protocolVersion) {
  const c = await withTimeout(
    mqtt.connectAsync(`mqtt://${HOST}:${port}`, { clientId, protocolVersion, reconnectPeriod: 0, connectTimeout: 5_000 }),
    6_000,
    `MQTT connect of ${clientId}`
  );
  c.on("error", () => {}); // reported through the cases, not as an unhandled event
  clients.push(c);
  return c;
}

// --- the run ------------------------------------------------------------------------------------

async function main() {
  let mqtt;
  try {
    mqtt = await import("mqtt");
  } catch (e) {
    return fatal(`the mqtt package is not installed (run npm ci in tests/browser): ${e.message}`);
  }
  const { mqttPort, adminAddr, token, link } = await startBroker();
  const base = `http://${adminAddr}`;
  console.log(`petrel ${PETREL}: mqtt on ${HOST}:${mqttPort}, admin on ${adminAddr} (token from the log)`);
  await launchBrowser();
  console.log(`Chromium ${browser.version()} (${CHROMIUM})`);
  fs.mkdirSync(ARTIFACTS, { recursive: true });

  const problems = [];
  const page = await newPage(problems);
  // Counts the page's requests in flight per method and path, to check that polls never pile up.
  await page.addInitScript(() => {
    const fetch = window.fetch.bind(window);
    const now = {};
    window.__maxInFlight = {};
    window.fetch = async (input, init) => {
      const key = `${(init && init.method) || "GET"} ${new URL(String(input), location.href).pathname}`;
      now[key] = (now[key] || 0) + 1;
      window.__maxInFlight[key] = Math.max(window.__maxInFlight[key] || 0, now[key]);
      try {
        return await fetch(input, init);
      } finally {
        now[key]--;
      }
    };
  });

  const opened = await check("the logged link opens the dashboard; the token leaves the URL", async () => {
    await page.goto(link);
    await page.waitForSelector('body[data-state="dashboard"]');
    await page.waitForFunction(() => document.getElementById("version").textContent !== "–");
    const { hash, stored } = await page.evaluate(() => ({ hash: location.hash, stored: sessionStorage.getItem("petrel.admin.token") }));
    if (hash !== "") throw new Error(`location.hash is still "${hash}"`);
    if (stored !== token) throw new Error("the token is not kept in sessionStorage");
    await until("the connections tile does not show 0", async () => (await tileValue(page, "tile-connections")) === 0);
    const badge = await page.locator('[data-testid="ready"]').getAttribute("data-state");
    if (badge !== "ready") throw new Error(`readiness badge is "${badge}", not ready`);
    return `connections 0, version ${await page.locator("#version").textContent()}, badge ready`;
  });
  if (!opened) return finish();

  // Three clients: a 3.1.1 publisher, a 5.0 subscriber (the one disconnected later), a 3.1.1 idler.
  const pub = await connectClient(mqtt, mqttPort, "dash-pub", 4);
  const sub = await connectClient(mqtt, mqttPort, "dash-sub", 5);
  const idle = await connectClient(mqtt, mqttPort, "dash-idle", 4);
  await withTimeout(sub.subscribeAsync("dash/#", { qos: 0 }), 5_000, "SUBSCRIBE of dash-sub");
  let received = 0;
  sub.on("message", () => received++);
  let sent = 0;
  publishing = setInterval(() => {
    for (let i = 0; i < 5; i++) pub.publish(TOPIC, `reading ${sent++}`, { qos: 0 });
  }, 25); // 200 messages/s

  await check("the connections tile reaches 3", async () => {
    await until("the connections tile shows 3", async () => (await tileValue(page, "tile-connections")) === 3);
    return "3 clients";
  });

  await check("messages-in rate > 0 while publishing", async () => {
    const rate = await until("the messages-in rate becomes > 0", async () => {
      const v = await tileValue(page, "tile-messages-in-rate");
      return v > 0 ? v : false;
    });
    const out = await tileValue(page, "tile-messages-out-rate");
    return `${rate}/s in, ${out}/s out shown; ${sent} published, ${received} delivered so far`;
  });

  await check(`${TOPIC} is in the top-topics table`, async () => {
    const row = page.locator(`#topics-body tr[data-topic="${TOPIC}"]`);
    await until(`no row for ${TOPIC}`, () => row.count());
    const rate = Number((await row.locator("td").nth(1).textContent()).replace(/,/g, ""));
    if (!(rate > 0)) {
      await until(`${TOPIC} rate stays 0`, async () => Number((await row.locator("td").nth(1).textContent()).replace(/,/g, "")) > 0);
    }
    return `${await row.locator("td").nth(1).textContent()} msg/s`;
  });

  await check("both charts are drawn", async () => {
    const inked = await until("a chart canvas is blank", () =>
      page.evaluate(() => {
        const count = (id) => {
          const c = document.getElementById(id);
          if (!c.width || !c.height) return 0;
          const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
          return n;
        };
        const a = count("chart-connections"), b = count("chart-messages");
        return a > 500 && b > 500 ? [a, b] : false;
      })
    );
    return `${inked[0]} and ${inked[1]} inked pixels`;
  });

  await check("the client list holds every client", async () => {
    const ids = await until("not all three clients listed", async () => {
      const l = await listedClients(page);
      return ["dash-idle", "dash-pub", "dash-sub"].every((id) => l.includes(id)) ? l : false;
    });
    const count = await page.locator('[data-testid="clients-count"]').textContent();
    return `${ids.join(", ")}; count "${count}"`;
  });

  await check("searching narrows the client list (by id, by address)", async () => {
    const search = page.locator('[data-testid="client-search"]');
    await search.fill("sub");
    await until('searching "sub" does not list only dash-sub', async () => {
      const l = await listedClients(page);
      return l.length === 1 && l[0] === "dash-sub";
    });
    const port = String(idle.stream.localPort);
    await search.fill(`:${port}`);
    await until(`searching ":${port}" does not list only dash-idle`, async () => {
      const l = await listedClients(page);
      return l.length === 1 && l[0] === "dash-idle";
    });
    await search.fill("no-such-client");
    await until("a search matching nothing does not empty the list", async () => (await listedClients(page)).length === 0);
    await search.fill("");
    await until("clearing the search does not bring back all three", async () => (await listedClients(page)).length === 3);
    return `"sub" → dash-sub, ":${port}" → dash-idle, nothing → none, "" → 3`;
  });

  await check("Disconnect, confirm dismissed, leaves the client connected", async () => {
    page.once("dialog", (d) => d.dismiss());
    let closed = false;
    const onClose = () => (closed = true);
    idle.once("close", onClose);
    await page.locator('#clients-body tr[data-client-id="dash-idle"] [data-testid="disconnect"]').click();
    await sleep(1_000);
    idle.off("close", onClose);
    if (closed || !idle.connected) throw new Error("dash-idle was disconnected although the confirm was dismissed");
    return "still connected after 1 s";
  });

  await check("Disconnect closes the client's connection (DISCONNECT 0x98) and the page follows", async () => {
    const disconnectPacket = new Promise((resolve) => sub.once("disconnect", resolve));
    const closed = new Promise((resolve) => sub.once("close", resolve));
    let dialog = "";
    page.once("dialog", (d) => {
      dialog = d.message().split("\n")[0];
      d.accept();
    });
    await page.locator('#clients-body tr[data-client-id="dash-sub"] [data-testid="disconnect"]').click();
    const packet = await withTimeout(disconnectPacket, 5_000, "DISCONNECT to dash-sub");
    await withTimeout(closed, 5_000, "close of dash-sub's connection");
    if (packet.reasonCode !== 0x98) throw new Error(`DISCONNECT reason 0x${packet.reasonCode.toString(16)}, not 0x98`);
    await until("dash-sub stays in the list of connected clients", async () => {
      const l = await listedClients(page);
      return !l.includes("dash-sub") && l.length === 2;
    });
    await until("the connections tile does not drop to 2", async () => (await tileValue(page, "tile-connections")) === 2);
    const notice = await page.locator('[data-testid="clients-notice"]').textContent();
    if (!/Disconnected/.test(notice)) throw new Error(`the page says "${notice}"`);
    return `confirm "${dialog}" accepted; reason 0x98; list and tile show 2; notice "${notice}"`;
  });

  // Screenshots with live data: the stream is still running.
  await check("screenshots", async () => {
    const wide = path.join(ARTIFACTS, "dashboard.png");
    await page.screenshot({ path: wide, fullPage: true });
    const narrowPage = await newPage(problems, { width: 390, height: 844 });
    await narrowPage.goto(`${base}/#token=${token}`);
    await narrowPage.waitForSelector('body[data-state="dashboard"]');
    await until("the narrow page does not list the 2 clients", async () => (await listedClients(narrowPage)).length === 2);
    await sleep(2_500); // a few chart points
    const narrow = path.join(ARTIFACTS, "dashboard-narrow.png");
    await narrowPage.screenshot({ path: narrow, fullPage: true });
    const overflow = await narrowPage.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    await narrowPage.context().close();
    if (overflow > 0) throw new Error(`the narrow page is ${overflow} px wider than the screen`);
    console.log(`screenshot: ${wide}`);
    console.log(`screenshot: ${narrow}`);
    return "1280x800 and 390x844, no horizontal overflow";
  });

  await check("a wrong token shows the token form", async () => {
    const p = await newPage(problems);
    await p.goto(`${base}/#token=not-the-token`);
    await p.waitForSelector('body[data-state="refused"]');
    const visible = await p.locator('[data-testid="login"]').isVisible();
    const dashboard = await p.locator('[data-testid="dashboard"]').isVisible();
    const stored = await p.evaluate(() => sessionStorage.getItem("petrel.admin.token"));
    await p.context().close();
    if (!visible || dashboard) throw new Error(`token form visible ${visible}, dashboard visible ${dashboard}`);
    if (stored !== null) throw new Error("the refused token is still stored");
    return "form shown, dashboard hidden, token forgotten";
  });

  await check("without a token the form asks, and the right token opens the dashboard", async () => {
    const p = await newPage(problems);
    await p.goto(`${base}/`);
    await p.waitForSelector('body[data-state="login"]');
    await p.getByLabel("Token", { exact: true }).fill(token);
    await p.getByRole("button", { name: "Open" }).click();
    await p.waitForSelector('body[data-state="dashboard"]');
    await until("the connections tile does not show 2", async () => (await tileValue(p, "tile-connections")) === 2);
    await p.context().close();
    return "form → dashboard, 2 connections";
  });

  await check("one request in flight per endpoint", async () => {
    const max = await page.evaluate(() => window.__maxInFlight);
    const piled = Object.entries(max).filter(([, n]) => n > 1);
    if (piled.length) throw new Error(`concurrent requests: ${piled.map(([k, n]) => `${k} ×${n}`).join(", ")}`);
    if (!max["GET /api/v1/overview"] || !max["GET /api/v1/clients"]) throw new Error(`the page polled only ${Object.keys(max).join(", ")}`);
    return `${Object.keys(max).length} endpoints, at most 1 each`;
  });

  clearInterval(publishing);
  publishing = null;
  await page.context().close();
  report("no page errors or CSP violations", problems.length === 0, problems.length === 0 ? "none" : problems.slice(0, 5).join(" | "));
  return finish();
}

async function finish() {
  if (aborting) return;
  clearInterval(publishing);
  for (const c of clients) await withTimeout(c.endAsync(), 3_000, "MQTT client end").catch(() => c.end(true));
  await withTimeout(browser.close(), 10_000, "closing Chromium").catch((e) => console.log(`note: ${e.message}`));
  browser = null;
  broker.kill("SIGTERM");
  const exit = await withTimeout(brokerExit, STOP_WAIT_MS, "petrel after SIGTERM").catch((e) => ({ timeout: e.message }));
  if (exit.timeout) report("broker exits 0 on SIGTERM", false, exit.timeout);
  else report("broker exits 0 on SIGTERM", exit.code === 0, exit.code === 0 ? "exit 0" : `exit code ${exit.code}, signal ${exit.signal}`);
  const panics = brokerLog.split("\n").filter((l) => /panicked/.test(l));
  report("broker log has no panic", panics.length === 0, panics.length === 0 ? "none" : panics.join(" | "));

  if (failed > 0) dumpBrokerLog();
  console.log(`${passed} passed, ${failed} failed`);
  console.log(`dashboard test took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  clearTimeout(watchdog);
  await cleanup();
  process.exit(failed > 0 ? 1 : 0);
}

main().catch((e) => abort(`run: ${e && e.stack ? e.stack : e}`));
