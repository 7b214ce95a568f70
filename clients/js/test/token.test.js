// Tokens with the real relay: refreshed before exp through getToken (a WebSocket stays
// connected past the first token's exp; an event stream reopens from its position), and an
// expiring fixed token ends the subscription.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { Closed, Refused, subscribe, tokenExpiry } from "../index.js";
import { Relay, delay, inner, mint, take, unique } from "./helpers.js";

let relay;
before(async () => { relay = await Relay.start(); });
after(async () => { await relay?.stop(); });

describe("against the relay", { concurrency: true }, () => {

  /** Notify 0, 1, 2 ... every `every` ms for `ms` ms; resolves with how many. */
  async function produce(channel, ms, every = 150) {
    const end = Date.now() + ms;
    let n = 0;
    while (Date.now() < end) {
      await relay.notify(channel, n++);
      await delay(every);
    }
    return n;
  }

  for (const mode of ["rw", "r"]) {
    // Read-only connections refresh in place too (the relay once dropped their token events).
    test(`websocket (${mode}): the token is refreshed on the open connection, which outlives the first exp`, async () => {
      const channel = unique("chat");
      // Minted ahead (the command takes a while on a loaded machine): a short first token, and
      // the one getToken hands out.
      const [token, next] = await Promise.all([mint({ mode, channel, exp: 6 }), mint({ mode, channel, exp: 60 })]);
      const firstExp = tokenExpiry(token);
      let asked = 0;
      const answers = [];
      const feed = subscribe(relay.url(`/${channel}`), {
        token, WebSocket,
        getToken: async () => { asked += 1; return next; },
        onStatus: (s) => { if (s.state.startsWith("token")) answers.push(s); },
      });
      try {
        await feed.waitConnected();
        const count = await produce(channel, (firstExp + 2) * 1000 - Date.now());
        assert.ok(Date.now() > (firstExp + 1) * 1000);
        const events = await take(feed, count);
        // Whatever the relay does with the refresh, nothing is lost or repeated.
        assert.deepEqual(events.map(inner), Array.from({ length: count }, (_, i) => i));
        assert.ok(asked >= 1);
        assert.ok(feed.connected);
        assert.deepEqual(answers.map((a) => a.state), ["token"], JSON.stringify(answers));
        assert.ok(answers[0].exp > firstExp);
        assert.equal(feed.connections, 1, "one connection all along");
      } finally {
        feed.close();
      }
    });
  }

  test("sse: the stream is reopened with the new token and its position, losing nothing", async () => {
    const channel = unique("chat");
    const [token, next] = await Promise.all([mint({ channel, exp: 5 }), mint({ channel, exp: 60 })]);
    const firstExp = tokenExpiry(token);
    const connected = [];
    const feed = subscribe(relay.url(`/${channel}`, "http"), {
      token, transport: "sse",
      getToken: async () => next,
      onStatus: (s) => { if (s.state === "connected") connected.push(s); },
    });
    try {
      await feed.waitConnected();
      const count = await produce(channel, (firstExp + 2) * 1000 - Date.now());
      const events = await take(feed, count);
      assert.deepEqual(events.map((e) => e.type), events.map(() => "message"));
      assert.deepEqual(events.map(inner), Array.from({ length: count }, (_, i) => i));
      assert.ok(feed.connections >= 2, `${feed.connections} connections`);
      assert.ok(connected.slice(1).every((c) => c.replayed !== null), "every reopening resumed");
    } finally {
      feed.close();
    }
  });

  test("websocket: a fixed token that expires ends the subscription (3001)", async () => {
    const channel = unique("chat");
    const feed = subscribe(relay.url(`/${channel}`), { token: await mint({ channel, exp: 3 }), WebSocket });
    await assert.rejects(feed.next(), (error) => error instanceof Closed && error.code === 3001);
  });

  test("sse: a fixed token that expires ends the subscription (400 Token expired)", async () => {
    const channel = unique("chat");
    const feed = subscribe(relay.url(`/${channel}`), { token: await mint({ channel, exp: 3 }), transport: "sse", backoffMin: 50 });
    await assert.rejects(feed.next(), (error) => error instanceof Refused && error.status === 400 && error.body === "Token expired");
  });
});
