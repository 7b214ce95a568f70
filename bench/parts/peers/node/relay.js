// A LISTEN/NOTIFY WebSocket relay as a Node.js user would write it: ws + pg + jsonwebtoken.
// /TOKEN and /CHANNEL/TOKEN URLs; payloads forwarded verbatim, routed by their "channel" key.
// A benchmark peer, not part of the product.
const { WebSocketServer } = require('ws');
const { Client } = require('pg');
const jwt = require('jsonwebtoken');

const SECRET = process.env.SECRET;
const LISTEN = process.env.LISTEN_CHANNEL;
const subscribers = new Map();

const wss = new WebSocketServer({ host: '127.0.0.1', port: Number(process.env.PORT),
                                  perMessageDeflate: false });
wss.on('connection', (ws, req) => {
  const parts = req.url.split('?')[0].replace(/^\//, '').split('/');
  const [requested, token] = parts.length === 1 ? [null, parts[0]] : [parts[0], parts[1]];
  let claims;
  try {
    claims = jwt.verify(token, SECRET, { algorithms: ['HS256'] });
  } catch (err) {
    ws.close(1008, 'bad token');
    return;
  }
  const channels = requested ? [requested] : (claims.channels || []);
  for (const channel of channels) {
    if (!subscribers.has(channel)) subscribers.set(channel, new Set());
    subscribers.get(channel).add(ws);
  }
  ws.on('close', () => {
    for (const channel of channels) subscribers.get(channel).delete(ws);
  });
});

const db = new Client({ connectionString: process.env.DB_URI });
db.connect().then(() => db.query(`LISTEN "${LISTEN}"`)).then(() => console.log('READY'));
db.on('notification', (msg) => {
  let channel = LISTEN;
  try {
    const parsed = JSON.parse(msg.payload);
    if (parsed && typeof parsed.channel === 'string') channel = parsed.channel;
  } catch (err) { /* not JSON: the listen channel */ }
  const targets = subscribers.get(channel);
  if (!targets) return;
  for (const ws of targets) ws.send(msg.payload);
});
