// MQTT.js in headless Chromium against petrel over ws:// and wss://.
//
// Serves page.html and MQTT.js's browser bundle from a static HTTP server on 127.0.0.1, makes a
// self-signed certificate for 127.0.0.1/localhost with the openssl CLI, starts petrel with one
// `ws` and one `wss` listener on free loopback ports, then drives page.html in headless Chromium
// (playwright-core, the system's /usr/bin/chromium) for each transport and MQTT 3.1.1 and 5.0:
// connect, subscribe, publish a unique payload, receive it back. One negative case: a wrong
// upgrade path must be refused (404) and reported by the page as a failure, not hang.
// Finally the broker must not have logged a panic and must exit 0 on SIGTERM.
//
// Environment:
//   PETREL_BIN  the petrel binary (default: <repo>/target/debug/petrel)
//   CHROMIUM    the Chromium binary (default: /usr/bin/chromium)
//   RUST_LOG    the broker's log filter (default: info,petrel=debug,petrel_server=debug)
//   KEEP_LOGS   if set, the temporary directory (config, certificate, broker log) is kept
//
// Prints one line per case, "PASS  <case> (<ms>)" or "FAIL  <case>: <why>", then
// "N passed, M failed"; exits 1 if anything failed. The whole run is bounded (85 s), and the
// broker, the browser and the HTTP server are stopped on every exit path.

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, "../..");
const HOST = "127.0.0.1";
const PETREL = process.env.PETREL_BIN || path.join(ROOT, "target", "debug", "petrel");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const RUN_DEADLINE_MS = 85_000; // the whole run
const START_WAIT_MS = 10_000; // broker listening on both ports
const PAGE_TIMEOUT_MS = 10_000; // the page's own bound on connect + subscribe + publish + receive
const CASE_TIMEOUT_MS = PAGE_TIMEOUT_MS + 10_000; // our bound on one case, page load included
const STOP_WAIT_MS = 10_000; // broker exit after SIGTERM

const t0 = Date.now();
const work = fs.mkdtempSync(path.join(os.tmpdir(), "petrel-browser-"));
let broker = null; // ChildProcess
let brokerLog = "";
let brokerExit = null; // Promise<{code, signal}>
let httpServer = null;
let browser = null;
let passed = 0;
let failed = 0;
let aborting = false; // set once, by the first fatal error, signal or the watchdog

// Stops the run: says why (once), shows the broker's log, cleans up and exits 1. Whatever is
// still in flight in main() is ignored from here on.
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

// --- cleanup on every exit path -------------------------------------------------------------------

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
  const browserClosing = browser
    ? Promise.race([browser.close().catch(() => {}), sleep(5_000)])
    : Promise.resolve();
  browser = null;
  if (httpServer) {
    httpServer.closeAllConnections?.();
    httpServer.close();
    httpServer = null;
  }
  await browserClosing;
  killBrokerNow();
  removeWork();
}

// Synchronous last resort: playwright kills its own Chromium on exit; the broker is ours.
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

// --- helpers ----------------------------------------------------------------------------------------

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

// A setup step failed: nothing after it should run while cleanup proceeds.
function fatal(why) {
  return abort(`setup: ${why}`);
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

// --- the pieces ---------------------------------------------------------------------------------------

function makeCertificate() {
  const version = spawnSync("openssl", ["version"], { encoding: "utf8" });
  if (version.error) {
    return fatal(
      `the openssl command-line tool is needed to make the test certificate and was not found ` +
        `(${version.error.code || version.error.message}); install it, e.g. apt-get install openssl`
    );
  }
  const cert = path.join(work, "server.pem");
  const key = path.join(work, "server.key");
  const r = spawnSync(
    "openssl",
    [
      "req", "-x509", "-nodes", "-days", "2",
      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
      "-keyout", key, "-out", cert,
      "-subj", "/CN=localhost",
      "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "-addext", "extendedKeyUsage=serverAuth",
    ],
    { encoding: "utf8", timeout: 20_000 }
  );
  if (r.status !== 0) {
    return fatal(`openssl could not make a certificate (${r.error || `exit ${r.status}`}): ${r.stderr}`);
  }
  return { cert, key };
}

function startHttpServer() {
  const files = {
    "/": ["page.html", "text/html; charset=utf-8"],
    "/page.html": ["page.html", "text/html; charset=utf-8"],
    "/mqtt.min.js": [path.join("node_modules", "mqtt", "dist", "mqtt.min.js"), "text/javascript; charset=utf-8"],
  };
  for (const [file] of Object.values(files)) {
    if (!fs.existsSync(path.join(HERE, file))) {
      return fatal(`${path.join(HERE, file)} is missing (run npm ci in tests/browser)`);
    }
  }
  return new Promise((resolve, reject) => {
    const server = http.createServer((req, res) => {
      const { pathname } = new URL(req.url, `http://${HOST}`);
      const entry = files[pathname];
      if (!entry || (req.method !== "GET" && req.method !== "HEAD")) {
        res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
        return;
      }
      const body = fs.readFileSync(path.join(HERE, entry[0]));
      res.writeHead(200, { "content-type": entry[1], "cache-control": "no-store", "content-length": body.length });
      res.end(req.method === "HEAD" ? undefined : body);
    });
    server.on("error", reject);
    server.listen(0, HOST, () => {
      httpServer = server;
      resolve(server.address().port);
    });
  });
}

async function startBroker({ cert, key }) {
  if (!fs.existsSync(PETREL)) {
    return fatal(`no petrel binary at ${PETREL} (build it: cargo build -p petrel-server --bin petrel, or set PETREL_BIN)`);
  }
  const wsPort = await freePort();
  let wssPort = await freePort();
  while (wssPort === wsPort) wssPort = await freePort();
  const config = path.join(work, "petrel.toml");
  // JSON strings are valid TOML basic strings for these paths.
  fs.writeFileSync(
    config,
    [
      "[[listeners]]",
      'protocol = "ws"',
      `bind = "${HOST}:${wsPort}"`,
      'path = "/mqtt"',
      'connect_timeout = "10s"',
      "",
      "[[listeners]]",
      'protocol = "wss"',
      `bind = "${HOST}:${wssPort}"`,
      'path = "/mqtt"',
      'connect_timeout = "10s"',
      `cert = ${JSON.stringify(cert)}`,
      `key = ${JSON.stringify(key)}`,
      "",
      "[storage]",
      'mode = "memory"',
      "",
    ].join("\n")
  );
  const logFile = path.join(work, "petrel.log");
  broker = spawn(PETREL, ["--config", config], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info,petrel=debug,petrel_server=debug" },
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
  for (const port of [wsPort, wssPort]) {
    for (;;) {
      if (broker.exitCode !== null || broker.signalCode !== null) {
        const { code, signal } = await brokerExit;
        return fatal(`petrel exited at start (code ${code}, signal ${signal})`);
      }
      if (await tryConnect(port)) break;
      if (Date.now() > deadline) {
        return fatal(`petrel does not listen on ${HOST}:${port} after ${START_WAIT_MS / 1000} s`);
      }
      await sleep(50);
    }
  }
  return { wsPort, wssPort };
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
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ["--no-sandbox", "--ignore-certificate-errors"],
      timeout: 30_000,
    });
  } catch (e) {
    return fatal(`Chromium did not start: ${e.message}`);
  }
  return browser;
}

// Opens page.html for one case and returns the page's window.result, plus what the page and its
// WebSockets showed along the way (for the report when something fails).
async function runPage(httpPort, { url, v }) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await context.newPage();
  const trace = [];
  page.on("console", (m) => trace.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => trace.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => trace.push(`requestfailed: ${r.url()} ${r.failure()?.errorText}`));
  page.on("websocket", (ws) => {
    trace.push(`websocket opened: ${ws.url()}`);
    const hex = (p) =>
      typeof p === "string" ? JSON.stringify(p.slice(0, 40)) : Buffer.from(p).subarray(0, 24).toString("hex");
    let frames = 0;
    const frame = (dir) => (f) => {
      if (frames++ < 12) trace.push(`ws ${dir} ${hex(f.payload)}`);
    };
    ws.on("framesent", frame("sent"));
    ws.on("framereceived", frame("recv"));
    ws.on("socketerror", (e) => trace.push(`websocket error: ${e}`));
    ws.on("close", () => trace.push("websocket closed"));
  });
  const query = new URLSearchParams({ url, v: String(v), timeout: String(PAGE_TIMEOUT_MS) });
  try {
    const result = await withTimeout(
      (async () => {
        await page.goto(`http://${HOST}:${httpPort}/page.html?${query}`, { timeout: CASE_TIMEOUT_MS });
        await page.waitForFunction(() => typeof window.result === "object" && window.result !== null && "ok" in window.result, null, { timeout: CASE_TIMEOUT_MS });
        return page.evaluate(() => window.result);
      })(),
      CASE_TIMEOUT_MS + 2_000,
      "page"
    );
    return { result, trace };
  } catch (e) {
    return { result: null, error: e.message.split("\n")[0], trace };
  } finally {
    await withTimeout(context.close(), 5_000, "closing the page").catch(() => {});
  }
}

// A bare WebSocket upgrade request for `pathname`; resolves with the HTTP status the broker answers.
function upgradeStatus(port, pathname) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const req = http.get({
        host: HOST,
        port,
        path: pathname,
        headers: {
          connection: "Upgrade",
          upgrade: "websocket",
          "sec-websocket-version": "13",
          "sec-websocket-key": Buffer.from("petrel-browser-1").toString("base64"),
          "sec-websocket-protocol": "mqtt",
        },
      });
      req.on("upgrade", (res, socket) => {
        socket.destroy();
        resolve(res.statusCode);
      });
      req.on("response", (res) => {
        res.resume();
        req.destroy();
        resolve(res.statusCode);
      });
      req.on("error", reject);
    }),
    5_000,
    `upgrade request for ${pathname}`
  );
}

function report(name, ok, detail, trace) {
  if (aborting) return;
  if (ok) {
    passed++;
    console.log(`PASS  ${name} (${detail})`);
  } else {
    failed++;
    console.log(`FAIL  ${name}: ${detail}`);
    for (const line of trace || []) console.log(`        ${line}`);
  }
}

// --- the run ----------------------------------------------------------------------------------------

async function main() {
  const tls = await makeCertificate();
  const httpPort = await startHttpServer();
  const { wsPort, wssPort } = await startBroker(tls);
  console.log(`petrel ${PETREL}: ws on ${HOST}:${wsPort}, wss on ${HOST}:${wssPort}; page on http://${HOST}:${httpPort}/`);
  await launchBrowser();
  console.log(`Chromium ${browser.version()} (${CHROMIUM})`);

  const cases = [];
  for (const [scheme, port] of [["ws", wsPort], ["wss", wssPort]]) {
    for (const [v, label] of [[4, "MQTT 3.1.1"], [5, "MQTT 5.0"]]) {
      cases.push({ name: `${scheme}:// ${label}`, url: `${scheme}://${HOST}:${port}/mqtt`, v, expectOk: true });
    }
  }
  cases.push({
    name: "ws:// wrong path /nope is refused",
    url: `ws://${HOST}:${wsPort}/nope`,
    port: wsPort,
    v: 4,
    expectOk: false,
  });

  for (const c of cases) {
    if (aborting) return;
    const { result, error, trace } = await runPage(httpPort, c);
    const steps = (result?.steps || []).map((s) => `page: ${s}`);
    if (!result) {
      report(c.name, false, `no result from the page: ${error}`, trace);
    } else if (c.expectOk) {
      if (result.ok === true && result.received === result.sent) {
        report(c.name, true, `${result.elapsedMs} ms`);
      } else {
        report(c.name, false, result.error || `page says ok=${result.ok}, sent ${result.sent}, got ${result.received}`, [...steps, ...trace]);
      }
    } else if (result.ok === false && result.error && !/timed out/.test(result.error)) {
      // The page saw a failure; make sure it was the broker's 404 and not something else.
      const status = await upgradeStatus(c.port, new URL(c.url).pathname).catch((e) => e.message);
      if (status === 404) {
        report(c.name, true, `${result.elapsedMs} ms, page reported: ${result.error}; the upgrade gets HTTP 404`);
      } else {
        report(c.name, false, `the page reported "${result.error}", but a bare upgrade request for that path gets ${status}, not 404`, [...steps, ...trace]);
      }
    } else if (result.ok === false) {
      report(c.name, false, `the page timed out instead of reporting the refusal: ${result.error}`, [...steps, ...trace]);
    } else {
      report(c.name, false, "the page connected and exchanged a message on a path the broker should refuse", [...steps, ...trace]);
    }
  }

  if (aborting) return;
  // The broker: no panic, and SIGTERM exits 0.
  await withTimeout(browser.close(), 10_000, "closing Chromium").catch((e) => console.log(`note: ${e.message}`));
  browser = null;
  broker.kill("SIGTERM");
  const exit = await withTimeout(brokerExit, STOP_WAIT_MS, "petrel after SIGTERM").catch((e) => ({ timeout: e.message }));
  if (exit.timeout) {
    report("broker exits 0 on SIGTERM", false, exit.timeout);
  } else {
    report(
      "broker exits 0 on SIGTERM",
      exit.code === 0,
      exit.code === 0 ? "exit 0" : `exit code ${exit.code}, signal ${exit.signal}`
    );
  }
  const panics = brokerLog.split("\n").filter((l) => /panicked/.test(l));
  report("broker log has no panic", panics.length === 0, panics.length === 0 ? "none" : panics.join(" | "));

  if (failed > 0) dumpBrokerLog();
  console.log(`${passed} passed, ${failed} failed`);
  console.log(`browser test took ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  clearTimeout(watchdog);
  await cleanup();
  process.exit(failed > 0 ? 1 : 0);
}

main().catch((e) => abort(`run: ${e && e.stack ? e.stack : e}`));
