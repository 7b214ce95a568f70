// Test helpers: the real pgws-relay command, PostgreSQL through psql, tokens from
// `pgws-relay token`, and a TCP proxy whose connections a test can cut.
import { spawn, execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..", "..");

export const SECRET = "reallyreallyreallyreallyverysafe-js-client-tests";
export const DB_URI = process.env.PGWS_TEST_DB_URI ?? "postgres://postgres@127.0.0.1:5432/postgres";
export const TIMEOUT = 15000;

/** The pgws-relay command: PGWS_RELAY, the repository's venv, or the PATH. */
export const RELAY = process.env.PGWS_RELAY ??
  (existsSync(path.join(repo, ".venv", "bin", "pgws-relay")) ? path.join(repo, ".venv", "bin", "pgws-relay")
                                                            : "pgws-relay");

export function unique(prefix = "pgws_js") {
  return `${prefix}_${randomBytes(6).toString("hex")}`;
}

/** A token signed with the tests' secret, by the relay's own command. */
export async function mint({ mode = "r", channel = "chat", exp = null, filters = [] } = {}) {
  const args = ["token", "--mode", mode, "--channel", channel];
  if (exp != null) args.push("--exp", String(exp));
  for (const filter of filters) args.push("--filter", filter);
  const { stdout } = await run(RELAY, args, { env: { ...process.env, PGWS_JWT_SECRET: SECRET } });
  return stdout.trim();
}

function literal(text) {
  return `'${String(text).replace(/'/g, "''")}'`;
}

/** NOTIFY each payload (`{channel, payload}` objects become JSON) in one transaction. */
export async function notify(listen, ...payloads) {
  const texts = payloads.map((p) => (typeof p === "string" ? p : JSON.stringify(p)));
  const sql = "BEGIN;" + texts.map((t) => `SELECT pg_notify(${literal(listen)}, ${literal(t)});`).join("") + "COMMIT;";
  await run("psql", ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", DB_URI, "-c", sql]);
}

/** A port free right now (for a relay that must come back on the same one). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A running pgws-relay. `start()` again after `stop()` brings it back on the same port. */
export class Relay {
  constructor(env = {}) {
    this.listen = unique("pgws_js_listen");
    this.env = {
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("PGWS_"))),
      PGWS_DB_URI: DB_URI, PGWS_JWT_SECRET: SECRET, PGWS_HOST: "127.0.0.1", PGWS_PORT: "0",
      PGWS_LISTEN_CHANNEL: this.listen, ...env,
    };
    this.port = 0;
    this.proc = null;
    this.log = "";
  }

  static async start(env = {}) {
    const relay = new Relay(env);
    await relay.start();
    return relay;
  }

  async start() {
    const env = { ...this.env };
    if (this.port) env.PGWS_PORT = String(this.port);
    const proc = spawn(RELAY, [], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    this.log = "";
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the relay did not start:\n${this.log}`)), TIMEOUT);
      const read = (chunk) => {
        this.log += chunk.toString();
        const match = /listening on 127\.0\.0\.1:(\d+)/.exec(this.log);
        if (match && /listening on channel/.test(this.log)) {
          this.port = Number(match[1]);
          clearTimeout(timer);
          resolve();
        }
      };
      proc.stdout.on("data", read);
      proc.stderr.on("data", read);
      proc.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`the relay exited (${code}):\n${this.log}`));
      });
    });
  }

  url(p, scheme = "ws") {
    return `${scheme}://127.0.0.1:${this.port}${p}`;
  }

  /** NOTIFY on this relay's listen channel: `payloads` are sent to WebSocket `channel`
   * (as {"channel", "payload"} JSON). */
  notify(channel, ...payloads) {
    return notify(this.listen, ...payloads.map((payload) => ({ channel, payload })));
  }

  /** NOTIFY these notification texts as they are. */
  notifyRaw(...texts) {
    return notify(this.listen, ...texts);
  }

  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((resolve) => proc.once("exit", resolve));
    proc.kill("SIGKILL");
    await exited;
  }
}

/** A TCP proxy to `port`: cut() ends every connection through it; while down, new ones are
 * closed at once. */
export class Proxy {
  constructor(port) {
    this.target = port;
    this.sockets = new Set();
    this.down = false;
    this.accepted = 0;
    this.server = net.createServer((client) => {
      if (this.down) return client.destroy();
      this.accepted += 1;
      const upstream = net.connect(this.target, "127.0.0.1");
      for (const s of [client, upstream]) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
  }

  static async start(port) {
    const proxy = new Proxy(port);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  url(p, scheme = "ws") {
    return `${scheme}://127.0.0.1:${this.port}${p}`;
  }

  cut({ down = false } = {}) {
    this.down = down;
    for (const s of this.sockets) s.resetAndDestroy ? s.resetAndDestroy() : s.destroy();
  }

  up() {
    this.down = false;
  }

  close() {
    this.cut({ down: true });
    return new Promise((resolve) => this.server.close(resolve));
  }
}

/** Take `n` events from a subscription, within `timeout` ms. */
export async function take(subscription, n, timeout = TIMEOUT) {
  const events = [];
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out with ${events.length} of ${n} events: ${JSON.stringify(events)}`)), timeout);
  });
  try {
    while (events.length < n) {
      const result = await Promise.race([subscription.next(), expired]);
      if (result.done) throw new Error(`ended after ${events.length} of ${n} events`);
      events.push(result.value);
    }
  } finally {
    clearTimeout(timer);
  }
  return events;
}

/** The `payload` inside a delivered notification. */
export function inner(event) {
  return JSON.parse(event.payload).payload;
}

export function delay(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Wait until `condition()` is true. */
export async function until(condition, what, timeout = TIMEOUT) {
  const end = Date.now() + timeout;
  while (!(await condition())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await delay(20);
  }
}
