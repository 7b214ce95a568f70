// Messages over both transports, from the real relay; refusals; a start position.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { Refused, isPosition, subscribe } from "../index.js";
import { Relay, inner, mint, take, unique } from "./helpers.js";

let relay;
before(async () => { relay = await Relay.start(); });
after(async () => { await relay?.stop(); });

describe("against the relay", { concurrency: true }, () => {

  for (const transport of ["websocket", "sse"]) {
    describe(`over ${transport}`, { concurrency: true }, () => {
      test("messages arrive in order, verbatim, with positions", async () => {
        const channel = unique("chat");
        const token = await mint({ channel });
        // Either scheme names the relay: the transport picks the one it needs.
        const url = relay.url(`/${channel}`, transport === "sse" ? "ws" : "http");
        const feed = subscribe(url, { token, transport, WebSocket });
        try {
          await feed.waitConnected();
          // The notification's text is the payload, byte for byte: spacing, line breaks
          // (over SSE too, where they split data: lines), non-ASCII.
          const payloads = [
            `{"channel":"${channel}","payload":"one"}`,
            `{"channel": "${channel}",\n "payload": {"market_id": 7, "price": "1.5"}}`,
            `{"channel":"${channel}","payload":"two\\nlines ünïcødé ✓"}`,
          ];
          await relay.notifyRaw(...payloads);
          const events = await take(feed, payloads.length);
          assert.deepEqual(events.map((e) => e.type), payloads.map(() => "message"));
          assert.deepEqual(events.map((e) => e.payload), payloads);
          for (const event of events) assert.ok(isPosition(event.position), event.position);
          assert.equal(new Set(events.map((e) => e.position)).size, payloads.length);
          assert.equal(feed.position, events.at(-1).position);
        } finally {
          feed.close();
        }
        assert.deepEqual(await feed.next(), { value: undefined, done: true });
      });

      test("filters narrow the channel", async () => {
        const channel = unique("fills");
        const token = await mint({ channel });
        const feed = subscribe(relay.url(`/${channel}`), {
          token, transport, WebSocket, filters: ["payload.market_id=eq.7"],
        });
        try {
          await feed.waitConnected();
          await relay.notify(channel, { market_id: 1 }, { market_id: 7, n: 1 }, { market_id: 2 }, { market_id: 7, n: 2 });
          const events = await take(feed, 2);
          assert.deepEqual(events.map((e) => JSON.parse(e.payload).payload.n), [1, 2]);
        } finally {
          feed.close();
        }
      });

      test("a start position resumes after it", async () => {
        const channel = unique("chat");
        const token = await mint({ channel });
        const first = subscribe(relay.url(`/${channel}`), { token, transport, WebSocket });
        await first.waitConnected();
        await relay.notify(channel, "a", "b", "c");
        const [a] = await take(first, 1);
        first.close();
        const second = subscribe(relay.url(`/${channel}`), { token, transport, WebSocket, position: a.position });
        try {
          const events = await take(second, 2);
          assert.deepEqual(events.map(inner), ["b", "c"]);
        } finally {
          second.close();
        }
      });

      test("a 400 refusal is final", async () => {
        const channel = unique("chat");
        const statuses = [];
        const feed = subscribe(relay.url(`/${channel}`), {
          token: "not.a.token", transport, WebSocket, backoffMin: 10,
          onStatus: (s) => statuses.push(s.state),
        });
        await assert.rejects(feed.next(), (error) => error instanceof Refused && error.status === 400);
        assert.deepEqual(await feed.next(), { value: undefined, done: true });
        assert.deepEqual(statuses, ["connecting"]); // No retry.
      });

      test("a bad filter is a final 400 naming it", async () => {
        const channel = unique("chat");
        const token = await mint({ channel });
        const feed = subscribe(relay.url(`/${channel}`), { token, transport, WebSocket, filters: ["payload.x=zz.1"] });
        await assert.rejects(feed.next(), (error) => error instanceof Refused && error.status === 400 && /payload\.x/.test(error.body));
      });

      test("a channel the token does not allow is final", async () => {
        const token = await mint({ channel: "other" });
        const feed = subscribe(relay.url(`/${unique("chat")}`), { token, transport, WebSocket });
        await assert.rejects(feed.next(), (error) => error instanceof Refused && error.status >= 400 && error.status < 500);
      });
    });
  }

  test("send publishes on a WebSocket and is refused where nothing can carry it", async () => {
    const channel = unique("chat");
    const token = await mint({ mode: "rw", channel });
    const feed = subscribe(relay.url(`/${channel}`), { token, WebSocket });
    const sse = subscribe(relay.url(`/${channel}`), { token, transport: "sse" });
    try {
      assert.equal(feed.send("too early"), false, "no connection is open yet");
      await feed.waitConnected();
      await sse.waitConnected();
      assert.equal(sse.send("over SSE"), false, "an event stream cannot send");
      assert.equal(feed.send("hello from js"), true);
      // Both readers get the relay's envelope of it (mode rw reads its own write back).
      for (const reader of [feed, sse]) {
        const [event] = await take(reader, 1);
        const envelope = JSON.parse(event.payload);
        assert.equal(envelope.event, "WebsocketMessage");
        assert.equal(envelope.payload, "hello from js");
        assert.equal(envelope.channel, channel);
      }
      assert.throws(() => feed.send(42), TypeError);
    } finally {
      feed.close();
      sse.close();
    }
    assert.equal(feed.send("after close"), false);
  });

  test("a 503 (too many connections) is retried until there is room", async () => {
    const capped = await Relay.start({ PGWS_MAX_CONNECTIONS: "1" });
    const channel = unique("chat");
    const token = await mint({ channel });
    const whys = [];
    const first = subscribe(capped.url(`/${channel}`), { token, WebSocket });
    let second;
    try {
      await first.waitConnected();
      second = subscribe(capped.url(`/${channel}`), {
        token, transport: "sse", backoffMin: 50, backoffMax: 200,
        onStatus: (s) => { if (s.state === "reconnecting") whys.push(s.why); },
      });
      while (whys.length < 2) await new Promise((r) => setTimeout(r, 20));
      assert.match(whys[0], /HTTP 503/);
      assert.equal(second.connected, false);
      first.close();
      await second.waitConnected();
      await capped.notify(channel, "room");
      const [event] = await take(second, 1);
      assert.equal(inner(event), "room");
    } finally {
      first.close();
      second?.close();
      await capped.stop();
    }
  });
});
