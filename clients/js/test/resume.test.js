// Resuming with the real relay: a connection cut (by a proxy, and by the kernel with ss -K),
// a relay restart (lost), under both transports.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { subscribe } from "../index.js";
import { Proxy, Relay, delay, freePort, inner, mint, take, unique, until } from "./helpers.js";

const run = promisify(execFile);

let relay;
before(async () => { relay = await Relay.start(); });
after(async () => { await relay?.stop(); });

describe("against the relay", { concurrency: true }, () => {

  for (const transport of ["websocket", "sse"]) {
    describe(`over ${transport}`, { concurrency: true }, () => {
      test("a cut connection resumes: what was missed arrives once, nothing twice", async () => {
        const proxy = await Proxy.start(relay.port);
        const channel = unique("chat");
        const token = await mint({ channel });
        const connected = [];
        const feed = subscribe(proxy.url(`/${channel}`), {
          token, transport, WebSocket, backoffMin: 50, backoffMax: 200,
          onStatus: (s) => { if (s.state === "connected") connected.push(s); },
        });
        try {
          await feed.waitConnected();
          await relay.notify(channel, "m1", "m2");
          assert.deepEqual((await take(feed, 2)).map(inner), ["m1", "m2"]);
          proxy.cut({ down: true }); // Cut, and refuse reconnects while messages are committed.
          await until(() => !feed.connected, "the subscription to notice");
          await relay.notify(channel, "m3", "m4", "m5");
          await delay(300); // Let the relay receive them (nobody is connected to read them).
          proxy.up();
          assert.deepEqual((await take(feed, 3)).map(inner), ["m3", "m4", "m5"]);
          assert.equal(feed.connections, 2);
          assert.equal(connected.at(-1).replayed, 3);
          await relay.notify(channel, "m6");
          assert.deepEqual((await take(feed, 1)).map(inner), ["m6"]);
        } finally {
          feed.close();
          await proxy.close();
        }
      });

      test("a relay restart is lost (unknown), then the stream goes on", async () => {
        const restarted = new Relay({ PGWS_PORT: String(await freePort()) });
        await restarted.start();
        const channel = unique("chat");
        const token = await mint({ channel });
        const feed = subscribe(restarted.url(`/${channel}`), { token, transport, WebSocket, backoffMin: 50, backoffMax: 200 });
        try {
          await feed.waitConnected();
          await restarted.notify(channel, "before");
          assert.deepEqual((await take(feed, 1)).map(inner), ["before"]);
          await restarted.stop();
          await restarted.notify(channel, "while down"); // Nobody listens: gone.
          await restarted.start();
          await feed.waitConnected(2);
          await restarted.notify(channel, "after");
          const [lost, message] = await take(feed, 2);
          assert.equal(lost.type, "lost");
          assert.equal(lost.reason, "unknown");
          assert.equal(feed.connections, 2);
          assert.deepEqual([message.type, inner(message)], ["message", "after"]);
        } finally {
          feed.close();
          await restarted.stop();
        }
      });
    });
  }

  const ssKill = process.getuid?.() === 0 ? false : "needs root for ss -K";

  test("connections killed by the kernel (ss -K) under a steady producer: no gap, no duplicate", { skip: ssKill }, async () => {
    const own = await Relay.start(); // ss -K cuts every connection to its port.
    const channel = unique("chat");
    const token = await mint({ channel });
    const feed = subscribe(own.url(`/${channel}`), { token, WebSocket, backoffMin: 20, backoffMax: 100 });
    const total = 60;
    try {
      await feed.waitConnected();
      const producing = (async () => {
        for (let i = 0; i < total; i += 3) {
          await own.notify(channel, i, i + 1, i + 2);
        }
      })();
      const received = [];
      let kills = 0;
      while (received.length < total) {
        const [event] = await take(feed, 1);
        assert.equal(event.type, "message", JSON.stringify(event));
        received.push(inner(event));
        if (received.length % 15 === 5) {
          // Kill the relay's end of this client's TCP connection(s).
          await run("ss", ["-K", "src", "127.0.0.1", "sport", "=", `:${own.port}`]);
          kills += 1;
        }
      }
      await producing;
      assert.deepEqual(received, Array.from({ length: total }, (_, i) => i));
      assert.ok(feed.connections > 1, `${feed.connections} connections after ${kills} kills`);
    } finally {
      feed.close();
      await own.stop();
    }
  });
});
