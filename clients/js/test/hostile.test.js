// What a broken or hostile server can make the library do: these need a server that
// misbehaves on purpose, so they use small fake ones (everything else talks to the relay).
import assert from "node:assert/strict";
import http from "node:http";
import { after, before, describe, test } from "node:test";
import WebSocket, { WebSocketServer } from "ws";
import { Closed, ProtocolError, Refused, SUBPROTOCOL, subscribe } from "../index.js";
import { take } from "./helpers.js";

const P = (n) => `0000000a.${n.toString(16)}.${"0".repeat(16)}.00000000`;

let server;
let wss;
let base;
let handle; // (ws, request) for WebSocket connections
let answer; // (req, res) for plain HTTP requests

before(async () => {
  server = http.createServer((req, res) => answer(req, res));
  server.on("connection", (socket) => socket.on("error", () => {})); // Clients hang up on purpose.
  wss = new WebSocketServer({ noServer: true, handleProtocols: (protocols) => (protocols.has(SUBPROTOCOL) ? SUBPROTOCOL : false) });
  server.on("upgrade", (req, socket, head) => {
    if (req.url.includes("refuse")) return answer(req, socket);
    wss.handleUpgrade(req, socket, head, (ws) => handle(ws, req));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  base = `127.0.0.1:${server.address().port}`;
});
after(() => {
  for (const client of wss.clients) client.terminate();
  server.closeAllConnections?.();
  server.close();
});

describe("a hostile server", () => {
  test("a delivery repeated after a resume is not yielded twice", async () => {
    const urls = [];
    handle = (ws, req) => {
      urls.push(req.url);
      if (urls.length === 1) {
        ws.send(JSON.stringify({ event: "position", position: P(1) }));
        ws.send(`${P(2)}\na`);
        ws.send(`${P(3)}\nb`);
        setTimeout(() => ws.close(1001), 50);
      } else {
        ws.send(JSON.stringify({ event: "resumed", position: P(2), replayed: 2 }));
        ws.send(`${P(3)}\nb`); // Already delivered.
        ws.send(`${P(4)}\nc`);
      }
    };
    const feed = subscribe(`ws://${base}/chat`, { token: "t.t.t", WebSocket, backoffMin: 10, backoffMax: 20 });
    try {
      const events = await take(feed, 3);
      assert.deepEqual(events.map((e) => e.payload), ["a", "b", "c"]);
      assert.equal(urls[0], "/chat/t.t.t");
      assert.equal(urls[1], `/chat/t.t.t?from=${encodeURIComponent(P(3))}`);
    } finally {
      feed.close();
    }
  });

  test("a WebSocket message over maxMessageSize ends the subscription (1009)", async () => {
    handle = (ws) => ws.send(`${P(1)}\n${"x".repeat(5000)}`);
    const feed = subscribe(`ws://${base}/chat`, { WebSocket, maxMessageSize: 1000 });
    await assert.rejects(feed.next(), (error) => error instanceof Closed && error.code === 1009);
  });

  test("a control event that is not the protocol ends the subscription", async () => {
    handle = (ws) => ws.send(JSON.stringify({ event: "position", position: "../../etc" }));
    const feed = subscribe(`ws://${base}/chat`, { WebSocket });
    await assert.rejects(feed.next(), ProtocolError);
  });

  test("an endless event-stream line ends the subscription, unbuffered", async () => {
    answer = (req, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      const chunk = "x".repeat(1000);
      res.write("data: ");
      const timer = setInterval(() => { if (!res.write(chunk)) clearInterval(timer); }, 1);
      res.on("close", () => clearInterval(timer));
    };
    const feed = subscribe(`http://${base}/chat`, { transport: "sse", maxMessageSize: 10000 });
    await assert.rejects(feed.next(), (error) => error instanceof Closed && error.code === 1009);
  });

  for (const transport of ["websocket", "sse"]) {
    test(`a huge refusal body is read only in part (${transport})`, async () => {
      answer = (req, res) => {
        const body = "no ".repeat(1_000_000);
        if (res.writeHead) {
          res.writeHead(403, { "content-type": "text/plain" });
          res.end(body);
        } else { // A raw socket (the upgrade).
          res.write(`HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: ${body.length}\r\n\r\n`);
          res.end(body);
        }
      };
      const feed = subscribe(`ws://${base}/refuse`, { transport, WebSocket });
      await assert.rejects(feed.next(), (error) => error instanceof Refused && error.status === 403 && error.body.length <= 4096);
    });
  }
});
