// A LISTEN/NOTIFY WebSocket relay as a Bun user would write it: Bun.serve's WebSocket server
// (uWebSockets underneath) with its native topic pub/sub, pg for LISTEN, jsonwebtoken.
// /TOKEN and /CHANNEL/TOKEN URLs; payloads published verbatim to the topic named by their
// "channel" key, so one notification is framed once and written to every subscriber by
// uWebSockets itself. A benchmark peer, not part of the product.
const { Client } = require('pg');
const jwt = require('jsonwebtoken');

const SECRET = process.env.SECRET;
const LISTEN = process.env.LISTEN_CHANNEL;

const server = Bun.serve({
  hostname: '127.0.0.1',
  port: Number(process.env.PORT),
  fetch(req, srv) {
    const path = new URL(req.url).pathname.replace(/^\//, '').split('/');
    const [requested, token] = path.length === 1 ? [null, path[0]] : [path[0], path[1]];
    let claims;
    try {
      claims = jwt.verify(token, SECRET, { algorithms: ['HS256'] });
    } catch (err) {
      return new Response('bad token', { status: 400 });
    }
    const channels = requested ? [requested] : (claims.channels || []);
    if (srv.upgrade(req, { data: { channels } })) return undefined;
    return new Response('Hello, Web!');
  },
  websocket: {
    perMessageDeflate: false,
    open(ws) {
      for (const channel of ws.data.channels) ws.subscribe(channel);
    },
    message() {},
  },
});

const db = new Client({ connectionString: process.env.DB_URI });
db.connect().then(() => db.query(`LISTEN "${LISTEN}"`)).then(() => console.log('READY'));
db.on('notification', (msg) => {
  let channel = LISTEN;
  try {
    const parsed = JSON.parse(msg.payload);
    if (parsed && typeof parsed.channel === 'string') channel = parsed.channel;
  } catch (err) { /* not JSON: the listen channel */ }
  server.publish(channel, msg.payload);
});
