/*
 * pgws-relay-client: subscribe to a pgws-relay channel and receive every message once, across
 * reconnects, over WebSocket or Server-Sent Events (read with fetch).
 *
 * Theory of operation
 * -------------------
 * subscribe() returns a Subscription: an async iterable of events, {type: "message", payload,
 * position} and {type: "lost", reason, position}. Inside, one loop keeps one connection to the
 * relay at a time and queues what it reads; the iterator takes from the queue.
 *
 * - WebSocket: the connection offers the subprotocol pgws.resume.v1, so the relay sends
 *   "POSITION\nPAYLOAD" deliveries and JSON control events (position, resumed, lost). The
 *   token goes in the URL path (/CHANNEL/TOKEN), the one place a browser WebSocket can carry
 *   it. A reconnect resumes with ?from=POSITION (the last position read).
 * - SSE: a fetch with Accept: text/event-stream, the token as Authorization: Bearer, and the
 *   last position as Last-Event-ID; the body is read as a stream and parsed here (no
 *   EventSource: it cannot send headers, and Node 20 has none).
 *
 * Reconnects wait a full-jitter exponential backoff (backoffMin doubling to backoffMax, reset
 * after a healthy connection). A refused handshake with a 4xx status is final (Refused), except
 * 408/429 and a position the relay cannot take (retried once without it, then Lost); 5xx
 * (503 included) is retried. A close the relay would repeat (1002, 1003, 1007-1010, or 3001 with
 * no getToken) is final (Closed).
 *
 * Tokens: with getToken, a token's exp is watched and a new token asked for before it: on a
 * WebSocket it is sent on the open connection ({"event":"token","token":...}); an event stream
 * is reopened with it and Last-Event-ID (nothing is lost either way). getToken is also asked at
 * every reconnect.
 *
 * Bounds against a hostile or broken server: a message (or an SSE line or event) over
 * maxMessageSize ends the subscription; a control event over 1024 characters or not of the
 * protocol ends it too; a refusal's body is read up to 4 KiB; positions are checked against
 * their grammar (at most 51 characters); the queue for a slow caller is bounded (buffer events,
 * maxBufferedBytes): SSE then stops reading (TCP pushes back), a WebSocket connection is closed
 * and resumed once the caller has caught up; the duplicate filter remembers a bounded number of
 * positions; every wait has a timeout.
 *
 * Plain ES2022 module (private fields), no dependencies, no build step: works as checked in, in browsers and
 * Node 20+.
 */

export const SUBPROTOCOL = "pgws.resume.v1";

/** Lost reason made by this side: the relay sends no positions, so a reconnect may miss some. */
export const UNSUPPORTED = "unsupported";

const POSITION = /^[0-9a-f]{8}\.[0-9a-f]{1,16}\.[0-9a-f]{16}\.[0-9a-f]{8}$/;
const LOST_REASONS = new Set(["expired", "gap", "unknown"]);
const MAX_CONTROL_LENGTH = 1024;
const MAX_REFUSAL_BODY = 4096;
const RETRY_STATUSES = new Set([408, 429]);
const FATAL_CLOSES = new Set([1002, 1003, 1007, 1008, 1009, 1010]);
const JWT_EXPIRED = 3001;
const TOKEN_EXPIRED_BODY = "Token expired";
/** A 400 whose body says this is about the position: retry without it. */
const POSITION_REFUSAL = /position|resum/i;
/** Milliseconds a connection must stay up to count as healthy (the backoff starts over). */
const STABLE_MS = 10000;
/** Delivery positions remembered to drop duplicates after a resume. */
const SEEN_POSITIONS = 4096;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** The subscription cannot go on. */
export class SubscriptionError extends Error {
  constructor(message) {
    super(message);
    this.name = "SubscriptionError";
  }
}

/** The relay refused the handshake, for a reason a retry would not change. */
export class Refused extends SubscriptionError {
  constructor(status, body) {
    super(body ? `HTTP ${status}: ${body}` : `HTTP ${status}`);
    this.name = "Refused";
    this.status = status;
    this.body = body;
  }
}

/** The relay closed the connection, for a reason a reconnect would not change. */
export class Closed extends SubscriptionError {
  constructor(code, reason) {
    super(reason ? `closed ${code}: ${reason}` : `closed ${code}`);
    this.name = "Closed";
    this.code = code;
    this.reason = reason;
  }
}

/** The server sent something that is not the protocol. */
export class ProtocolError extends SubscriptionError {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

// -- pure helpers ------------------------------------------------------------------------------

/** Milliseconds before retry `attempt` (0 first): full jitter, uniform in
 * [0, min(high, low * 2**attempt)). */
export function backoff(attempt, low, high, rand = Math.random) {
  return rand() * Math.min(high, low * 2 ** Math.min(attempt, 64));
}

/** Whether `text` is a position (the grammar only: positions are opaque). */
export function isPosition(text) {
  return typeof text === "string" && text.length <= 51 && POSITION.test(text);
}

function clip(text, n = 80) {
  return text.length > n ? text.slice(0, n) + "…" : text;
}

/** A control event's JSON (WebSocket message, or an SSE event's data). */
function readControl(text) {
  if (text.length > MAX_CONTROL_LENGTH) {
    throw new ProtocolError(`the relay sent a control event of ${text.length} characters`);
  }
  let fields;
  try {
    fields = JSON.parse(text);
  } catch {
    throw new ProtocolError("the relay sent a control event that is not JSON");
  }
  if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
    throw new ProtocolError(`the relay sent ${JSON.stringify(clip(text))}`);
  }
  const event = fields.event;
  if (event === "token") {
    const exp = fields.exp;
    if (exp !== null && (typeof exp !== "number" || !Number.isFinite(exp))) {
      throw new ProtocolError(`the relay sent ${JSON.stringify(clip(text))}`);
    }
    return { kind: "token", exp };
  }
  if (event === "token-refused") {
    return { kind: "token-refused", reason: clip(String(fields.reason ?? ""), 200) };
  }
  if ((event !== "position" && event !== "resumed" && event !== "lost") ||
      !isPosition(fields.position)) {
    throw new ProtocolError(`the relay sent ${JSON.stringify(clip(text))}`);
  }
  if (event === "lost" && !LOST_REASONS.has(fields.reason)) {
    throw new ProtocolError(`the relay sent an unknown reason: ${JSON.stringify(clip(text))}`);
  }
  return {
    kind: "control", event, position: fields.position, reason: fields.reason ?? null,
    replayed: Number.isInteger(fields.replayed) ? fields.replayed : null,
  };
}

/** One WebSocket message under the subprotocol: a delivery or a control event. */
export function readMessage(text) {
  if (text.startsWith("{")) return readControl(text);
  const newline = text.indexOf("\n");
  const position = newline < 0 ? "" : text.slice(0, newline);
  if (newline < 0 || !isPosition(position)) {
    throw new ProtocolError(`the relay sent a delivery without a position: ${JSON.stringify(clip(text))}`);
  }
  return { kind: "delivery", position, payload: text.slice(newline + 1) };
}

/** The `exp` claim (Unix seconds) of a JWT, read without checking it; null if none. */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3 || parts[1].length > 16384) return null;
  try {
    let b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    const binary = atob(b64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims.exp === "number" && Number.isFinite(claims.exp) ? claims.exp : null;
  } catch {
    return null;
  }
}

/** Milliseconds from now until a token expiring at `exp` should be replaced: a third of
 * what is left, at most 30 s, before it. */
function refreshDelay(exp, now = Date.now()) {
  const left = exp * 1000 - now;
  return Math.max(0, left - Math.min(30000, Math.max(0, left / 3)));
}

/** Where to connect: the URL with the transport's scheme, the filters, and no `from`. */
function endpoint(url, transport, filters) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError("subscribe: not a URL");
  }
  const secure = parsed.protocol === "wss:" || parsed.protocol === "https:";
  if (!["ws:", "wss:", "http:", "https:"].includes(parsed.protocol)) {
    throw new TypeError(`subscribe: the URL must be ws(s):// or http(s)://, not ${parsed.protocol}`);
  }
  if (parsed.searchParams.has("from")) {
    throw new TypeError("subscribe: pass the start position as `position`, not in the URL");
  }
  if (parsed.hash) parsed.hash = "";
  parsed.protocol = transport === "sse" ? (secure ? "https:" : "http:") : (secure ? "wss:" : "ws:");
  for (const filter of filters) {
    if (typeof filter !== "string") throw new TypeError("subscribe: filters must be strings");
    parsed.searchParams.append("filter", filter);
  }
  return parsed;
}

/** The URL of one connection: the token as the last path segment, `from` when resuming. */
function connectionUrl(base, token, position) {
  const url = new URL(base.href);
  if (token != null) {
    url.pathname = url.pathname.replace(/\/+$/, "") + "/" + encodeURIComponent(token);
  }
  if (position != null) url.searchParams.set("from", position);
  return url.href;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, Math.min(ms, MAX_TIMER_MS));
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

/** Up to `limit` characters of a response body, then the rest is dropped. */
async function readCapped(body, limit = MAX_REFUSAL_BODY) {
  if (!body) return "";
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  try {
    while (text.length < limit) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } catch {
    // What was read is enough.
  } finally {
    reader.cancel().catch(() => {});
  }
  return text.slice(0, limit).trim();
}

/** A retry of the connection loop, with why (for onStatus) and how. */
class Retry {
  constructor(why, { healthy = false, atOnce = false, tokenExpired = false, drain = false } = {}) {
    this.why = why;
    this.healthy = healthy;
    this.atOnce = atOnce;
    this.tokenExpired = tokenExpired;
    this.drain = drain;
  }
}

// -- the subscription -------------------------------------------------------------------------

/**
 * Messages from one relay URL, as an async iterable; made by subscribe().
 * `position`: that of the last event the iterator returned (persist it to start there later).
 */
export class Subscription {
  #options;
  #base;
  #transport;
  #abort = new AbortController();
  #queue = [];
  #queuedBytes = 0;
  #waiters = []; // pending next() calls
  #roomWaiters = [];
  #position;
  #read; // the last position read from a connection: resume after it
  #started;
  #skipFrom = false;
  #seen = new Set();
  #seenOrder = [];
  #token = null; // the token of the open connection, or the one to use next
  #nextToken = null; // a token fetched for the next connect (SSE refresh)
  #usedInitial = false; // the token option was used (later connects ask getToken)
  #done = false;
  #failure = null;
  #connectedWaiters = [];
  #socket = null; // the open WebSocket, for send()

  /** A connection is up and has said where its stream starts. */
  connected = false;
  /** Connections made so far. */
  connections = 0;

  constructor(url, options) {
    this.#options = options;
    this.#transport = options.transport;
    this.#base = endpoint(url, options.transport, options.filters);
    this.#position = options.position ?? null;
    this.#read = this.#position;
    this.#started = this.#position != null;
    if (options.signal) {
      if (options.signal.aborted) this.close();
      else options.signal.addEventListener("abort", () => this.close(), { once: true });
    }
    if (!this.#done) this.#run();
  }

  get position() {
    return this.#position;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** The next event; {done: true} after close(); rejects with the error that ended it. */
  next() {
    try {
      const result = this.#take();
      if (result !== null) return Promise.resolve(result);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.#done) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /** Called when a for-await loop is left: ends the subscription. */
  async return() {
    this.close();
    return { value: undefined, done: true };
  }

  /** Stop: the connection is closed, pending and later next() calls return done. */
  close() {
    if (this.#done && this.#abort.signal.aborted) return;
    this.#done = true;
    this.#abort.abort();
    this.#queue = [];
    this.#queuedBytes = 0;
    this.#setConnected(false);
    for (const waiter of this.#waiters.splice(0)) waiter.resolve({ value: undefined, done: true });
    for (const wake of this.#roomWaiters.splice(0)) wake();
    for (const waiter of this.#connectedWaiters.splice(0)) waiter.reject(new SubscriptionError("closed"));
  }

  /** Send `text` on the open WebSocket connection: with a token of mode w or rw the relay
   * publishes it to the connection's channels. Returns false when nothing was sent (no
   * connection is open, or the transport is "sse", which cannot send). On pgws.resume.v1 a
   * JSON object with "event":"token" is a token refresh, never published. */
  send(text) {
    if (typeof text !== "string") throw new TypeError("send: text must be a string");
    const ws = this.#socket;
    if (this.#done || ws === null || ws.readyState !== 1) return false;
    try {
      ws.send(text);
    } catch {
      return false; // The connection is ending; the caller may send again once reconnected.
    }
    return true;
  }

  /** Resolves once a connection (the `count`-th or a later one) is up; rejects if the
   * subscription ends first. */
  waitConnected(count = 1) {
    if (this.connected && this.connections >= count) return Promise.resolve();
    if (this.#failure) return Promise.reject(this.#failure);
    if (this.#done) return Promise.reject(new SubscriptionError("closed"));
    return new Promise((resolve, reject) => this.#connectedWaiters.push({ count, resolve, reject }));
  }

  // -- the queue ------------------------------------------------------------------------------

  #take() {
    for (;;) {
      const item = this.#queue.shift();
      if (item === undefined) return null;
      this.#queuedBytes -= item.bytes;
      if (this.#roomWaiters.length && this.#hasRoom(0.5)) {
        for (const wake of this.#roomWaiters.splice(0)) wake();
      }
      if (item.error) {
        this.#done = true;
        this.#queue = [];
        throw item.error; // next() turns it into a rejection
      }
      if (item.checkpoint !== undefined) {
        this.#position = item.checkpoint;
        if (!this.#queue.length) return null;
        continue;
      }
      if (item.event.position != null) this.#position = item.event.position;
      return { value: item.event, done: false };
    }
  }

  #hasRoom(fraction = 1) {
    const { buffer, maxBufferedBytes } = this.#options;
    return this.#queue.length < buffer * fraction && this.#queuedBytes < maxBufferedBytes * fraction;
  }

  #waitRoom() {
    if (this.#hasRoom(0.5) || this.#done) return Promise.resolve();
    return new Promise((resolve) => this.#roomWaiters.push(resolve));
  }

  /** Queue an event (or checkpoint or error); hand it to a waiting next() at once. */
  #put(item) {
    item.bytes = item.event?.payload?.length ?? 0;
    if (this.#done) return;
    this.#queue.push(item);
    this.#queuedBytes += item.bytes;
    while (this.#waiters.length && this.#queue.length) {
      const waiter = this.#waiters.shift();
      let result;
      try {
        result = this.#take();
      } catch (error) {
        waiter.reject(error);
        for (const other of this.#waiters.splice(0)) other.resolve({ value: undefined, done: true });
        return;
      }
      if (result === null) {
        this.#waiters.unshift(waiter);
        break;
      }
      waiter.resolve(result);
    }
  }

  #fail(error) {
    if (this.#done) return;
    this.#failure = error;
    this.#setConnected(false);
    for (const waiter of this.#connectedWaiters.splice(0)) waiter.reject(error);
    this.#put({ error });
    this.#abort.abort();
  }

  #setConnected(connected) {
    this.connected = connected;
    if (!connected) return;
    for (const waiter of this.#connectedWaiters.slice()) {
      if (this.connections >= waiter.count) {
        this.#connectedWaiters.splice(this.#connectedWaiters.indexOf(waiter), 1);
        waiter.resolve();
      }
    }
  }

  #status(status) {
    const hook = this.#options.onStatus;
    if (typeof hook !== "function") return;
    try {
      hook(status);
    } catch {
      // The caller's hook must not break the subscription.
    }
  }

  /** A delivery position seen before (after a resume, the relay must not send one again;
   * this makes sure the caller never gets one twice). */
  #duplicate(position) {
    if (this.#seen.has(position)) return true;
    this.#seen.add(position);
    this.#seenOrder.push(position);
    if (this.#seenOrder.length > SEEN_POSITIONS) {
      this.#seen.delete(this.#seenOrder.shift());
    }
    return false;
  }

  // -- the connection loop --------------------------------------------------------------------

  async #run() {
    let attempt = 0;
    let refusedToken = null;
    while (!this.#done) {
      let token;
      try {
        token = await this.#fetchToken();
      } catch (error) {
        this.#fail(error instanceof Error ? error : new SubscriptionError(String(error)));
        return;
      }
      if (this.#done) return;
      if (token != null && token === refusedToken) {
        this.#fail(new Refused(400, TOKEN_EXPIRED_BODY));
        return;
      }
      this.#token = token;
      this.#status({ state: "connecting", attempt });
      let retry;
      try {
        retry = this.#transport === "sse" ? await this.#eventStream(token)
                                          : await this.#webSocket(token);
      } catch (error) {
        this.#fail(error instanceof Error ? error : new SubscriptionError(String(error)));
        return;
      }
      this.#setConnected(false);
      if (this.#done) return;
      if (retry.healthy) attempt = 0;
      if (retry.tokenExpired) refusedToken = token;
      if (retry.drain) await this.#waitRoom();
      let delay = 0;
      if (!retry.atOnce) {
        delay = backoff(attempt, this.#options.backoffMin, this.#options.backoffMax);
        attempt += 1;
      }
      this.#status({ state: "reconnecting", why: retry.why, delay });
      if (delay > 0) await sleep(delay, this.#abort.signal);
    }
  }

  async #fetchToken() {
    if (this.#nextToken != null) {
      const token = this.#nextToken;
      this.#nextToken = null;
      return token;
    }
    const { token, getToken } = this.#options;
    if (!this.#usedInitial && token != null) {
      this.#usedInitial = true;
      return token;
    }
    if (getToken) {
      const fresh = await getToken();
      if (typeof fresh !== "string" || !fresh) throw new TypeError("getToken() must return a token (a string)");
      return fresh;
    }
    return token ?? null;
  }

  /** What a refused handshake means: a Retry to return, or an error to throw. */
  #refused(status, body, position) {
    if (status === 400 && body === TOKEN_EXPIRED_BODY) {
      if (this.#options.getToken) return new Retry("token expired", { atOnce: true, tokenExpired: true });
      throw new Refused(status, body);
    }
    if (status >= 400 && status < 500 && !RETRY_STATUSES.has(status)) {
      if (status === 400 && position != null && POSITION_REFUSAL.test(body)) {
        // History off, or a relay that cannot read our position: go on without resuming (a
        // Lost tells the caller).
        this.#skipFrom = true;
        return new Retry(`resume refused (HTTP 400: ${clip(body)})`, { atOnce: true });
      }
      throw new Refused(status, body);
    }
    return new Retry(`HTTP ${status}` + (body ? ` (${clip(body)})` : ""));
  }

  /** Handle one message of a positioned stream (either transport). `state`: this
   * connection's {first, unresumed, delivered, onToken}. */
  #positioned(item, state) {
    if (item.kind === "token" || item.kind === "token-refused") {
      state.onToken?.(item);
      return;
    }
    this.#read = item.position;
    this.#started = true;
    const first = state.first;
    state.first = false;
    if (item.kind === "delivery") {
      if (first && state.unresumed) this.#put({ event: { type: "lost", reason: UNSUPPORTED, position: null } });
      if (!this.#duplicate(item.position)) {
        this.#put({ event: { type: "message", payload: item.payload, position: item.position } });
        state.delivered = true;
      }
    } else if (item.event === "lost") {
      this.#put({ event: { type: "lost", reason: item.reason, position: item.position } });
    } else if (first && state.unresumed) {
      this.#put({ event: { type: "lost", reason: UNSUPPORTED, position: item.position } });
    } else {
      this.#put({ checkpoint: item.position });
    }
    if (first) this.#opened(item.event === "resumed" ? item.replayed : null);
  }

  /** A message with no position (the relay sends none). */
  #unpositioned(payload, state) {
    if (state.first && state.unresumed) this.#put({ event: { type: "lost", reason: UNSUPPORTED, position: null } });
    if (state.first) this.#opened(null);
    state.first = false;
    this.#read = null;
    this.#started = true;
    this.#put({ event: { type: "message", payload, position: null } });
    state.delivered = true;
  }

  #opened(replayed) {
    this.#setConnected(true);
    this.#status({ state: "connected", connections: this.connections, replayed });
  }

  /** Schedule token refreshes while a connection is up: `send(token)` offers one on the
   * connection (WebSocket), `reopen(token)` reconnects with it (an event stream, or a
   * WebSocket whose relay did not answer in time). Returns {stop(), answered(item)}. */
  #refresher({ send = null, reopen }) {
    const getToken = this.#options.getToken;
    let timer = null;
    let answerTimer = null;
    let stopped = false;
    let pending = null;
    const schedule = (exp) => {
      clearTimeout(timer);
      timer = null;
      if (stopped || !getToken || exp == null) return;
      timer = setTimeout(fire, Math.min(refreshDelay(exp), MAX_TIMER_MS));
    };
    const fire = async () => {
      timer = null;
      let token;
      try {
        token = await getToken();
      } catch (error) {
        // Not fatal here: the connection lives until its exp; the reconnect then asks again
        // (and a failure there ends the subscription).
        this.#status({ state: "token-error", error });
        return;
      }
      if (stopped) return;
      if (typeof token !== "string" || !token || token === this.#token) {
        const exp = tokenExpiry(this.#token);
        if (exp != null && exp * 1000 - Date.now() > 2000) timer = setTimeout(fire, 1000);
        return;
      }
      if (!send) {
        reopen(token);
        return;
      }
      pending = token;
      send(token);
      // No answer (a relay without in-place refresh, or one that drops the message):
      // reconnect with the new token before the old one ends, resuming, which loses nothing.
      const exp = tokenExpiry(this.#token);
      const left = exp == null ? 5000 : exp * 1000 - Date.now();
      answerTimer = setTimeout(() => {
        if (stopped || pending !== token) return;
        this.#status({ state: "token-unanswered" });
        reopen(token);
      }, Math.min(5000, Math.max(250, left / 2)));
    };
    schedule(tokenExpiry(this.#token));
    return {
      stop() {
        stopped = true;
        clearTimeout(timer);
        clearTimeout(answerTimer);
      },
      answered: (item) => {
        clearTimeout(answerTimer);
        if (item.kind === "token" && pending != null) {
          this.#token = pending;
          pending = null;
          this.#status({ state: "token", exp: item.exp });
          schedule(item.exp);
        } else if (item.kind === "token-refused") {
          pending = null;
          this.#status({ state: "token-refused", reason: item.reason });
          const exp = tokenExpiry(this.#token);
          const left = exp == null ? 0 : exp * 1000 - Date.now();
          if (!stopped && left > 2000) timer = setTimeout(fire, Math.min(5000, left / 2));
        }
      },
    };
  }

  // -- WebSocket ------------------------------------------------------------------------------

  #webSocket(token) {
    const options = this.#options;
    const position = this.#skipFrom ? null : this.#read;
    const url = connectionUrl(this.#base, token, position);
    const started = Date.now();
    const Impl = options.WebSocket;
    return new Promise((resolve, reject) => {
      let ws;
      let settled = false;
      let opened = false;
      let handshake = null; // {status, body} from a ws-style unexpected-response
      let handshakeError = null;
      let dead = false;
      const timers = new Set();
      const state = {
        first: true, delivered: false, unresumed: false, onToken: null,
      };
      let refresher = null;
      const later = (fn, ms) => {
        const t = setTimeout(() => {
          timers.delete(t);
          fn();
        }, ms);
        timers.add(t);
        return t;
      };
      const finish = (result, isError = false) => {
        if (settled) return;
        settled = true;
        if (this.#socket === ws) this.#socket = null;
        for (const t of timers) clearTimeout(t);
        refresher?.stop();
        this.#abort.signal.removeEventListener("abort", onAbort);
        try {
          if (ws && ws.readyState !== 3) {
            if (typeof ws.terminate === "function") ws.terminate();
            else ws.close(1000);
          }
        } catch {
          // Closing is best effort.
        }
        if (isError) reject(result);
        else resolve(result);
      };
      const onAbort = () => finish(new Retry("closed"));
      try {
        // The third argument is the ws package's options; browsers ignore it.
        ws = new Impl(url, [SUBPROTOCOL], {
          maxPayload: options.maxMessageSize, handshakeTimeout: options.connectTimeout,
        });
      } catch (error) {
        reject(error);
        return;
      }
      this.#abort.signal.addEventListener("abort", onAbort, { once: true });
      try {
        ws.binaryType = "arraybuffer";
      } catch {
        // Not every implementation has it.
      }
      const nodeStyle = typeof ws.on === "function";
      if (nodeStyle) {
        ws.on("unexpected-response", (req, res) => {
          handshake = { status: res.statusCode, body: "" };
          readCapped(nodeBody(res)).then((body) => {
            handshake.body = body;
            try {
              req.destroy();
            } catch {
              // Gone already.
            }
            settleHandshake();
          });
        });
      }
      later(() => {
        if (opened) return;
        if (handshake) settleHandshake();
        else finish(new Retry(`no answer within ${options.connectTimeout} ms`));
      }, options.connectTimeout);

      const settleHandshake = () => {
        if (settled) return;
        try {
          finish(this.#refused(handshake.status, handshake.body, position));
        } catch (error) {
          finish(error, true);
        }
      };

      ws.addEventListener("open", () => {
        if (settled) return;
        opened = true;
        this.#socket = ws;
        this.#skipFrom = false;
        this.connections += 1;
        const positioned = ws.protocol === SUBPROTOCOL;
        state.unresumed = this.#started && position == null;
        if (!positioned) {
          if (this.#started) this.#put({ event: { type: "lost", reason: UNSUPPORTED, position: null } });
          state.unresumed = false;
          this.#read = null;
          this.#started = true;
          state.first = false;
          this.#opened(null);
        } else {
          refresher = this.#refresher({
            send: (fresh) => {
              try {
                ws.send(JSON.stringify({ event: "token", token: fresh }));
              } catch {
                // The connection is ending; the reconnect asks for a token again.
              }
            },
            reopen: (fresh) => {
              this.#nextToken = fresh;
              finish(new Retry("token refreshed", { atOnce: true, healthy: true }));
            },
          });
          state.onToken = refresher.answered;
        }
        state.positioned = positioned;
        if (nodeStyle && typeof ws.ping === "function" && options.pingInterval > 0) {
          // Liveness (a NAT or proxy that dropped the connection silently): a ping, and a
          // pong or any message within pingTimeout; browsers have no ping to send.
          let alive = true;
          ws.on("pong", () => { alive = true; });
          ws.on("message", () => { alive = true; });
          const ping = () => {
            alive = false;
            try {
              ws.ping();
            } catch {
              return;
            }
            later(check, options.pingTimeout);
          };
          const check = () => {
            if (alive) {
              later(ping, options.pingInterval);
              return;
            }
            dead = true;
            finish(new Retry(`no pong within ${options.pingTimeout} ms`, {
              healthy: state.delivered || Date.now() - started >= STABLE_MS,
            }));
          };
          later(ping, options.pingInterval);
        }
      });

      ws.addEventListener("message", (event) => {
        if (settled) return;
        let text = event.data;
        if (typeof text !== "string") {
          try {
            text = new TextDecoder().decode(text);
          } catch {
            text = "";
          }
        }
        try {
          if (text.length > options.maxMessageSize) {
            throw new Closed(1009, `a message of ${text.length} characters`);
          }
          if (state.positioned) this.#positioned(readMessage(text), state);
          else this.#unpositioned(text, state);
        } catch (error) {
          finish(error, true);
          return;
        }
        if (!this.#hasRoom()) {
          // The caller is behind: close and resume from what was read once it caught up.
          try {
            ws.close(1000, "slow reader");
          } catch {
            // It is ending anyway.
          }
          finish(new Retry("the caller is behind", { healthy: true, atOnce: true, drain: true }));
        }
      });

      ws.addEventListener("error", (event) => {
        handshakeError = event?.message || event?.error?.message || handshakeError;
        if (opened && event?.error?.code === "WS_ERR_UNSUPPORTED_MESSAGE_LENGTH") {
          // The ws package's maxPayload: the message was not buffered.
          finish(new Closed(1009, `a message over ${options.maxMessageSize} bytes`), true);
        }
      });

      ws.addEventListener("close", (event) => {
        if (settled || handshake) return;
        const code = event.code ?? 1006;
        const reason = event.reason || null;
        if (!opened) {
          const match = /Unexpected server response: (\d{3})/.exec(handshakeError || "");
          if (match) {
            try {
              finish(this.#refused(Number(match[1]), "", position));
            } catch (error) {
              finish(error, true);
            }
            return;
          }
          if (!nodeStyle && options.fetch && options.probe) {
            // A browser hides a refused handshake's status: ask the same URL as an event
            // stream (same admission, same refusals) to tell final from transient.
            this.#probe(token).then((refusal) => {
              if (refusal == null) return finish(new Retry(handshakeError || `closed ${code}`));
              try {
                finish(this.#refused(refusal.status, refusal.body, null));
              } catch (error) {
                finish(error, true);
              }
            });
            return;
          }
          finish(new Retry(handshakeError || `closed ${code} before opening`));
          return;
        }
        const healthy = state.delivered || Date.now() - started >= STABLE_MS;
        if (dead) return;
        if (code === JWT_EXPIRED && !options.getToken) return finish(new Closed(code, reason), true);
        if (FATAL_CLOSES.has(code)) return finish(new Closed(code, reason), true);
        finish(new Retry(`closed ${code}` + (reason ? ` (${reason})` : ""), {
          healthy, atOnce: code === JWT_EXPIRED,
        }));
      });
    });
  }

  /** The status and body of a refused event-stream request to this URL (no `from`), or null
   * when it is accepted or cannot be made. */
  async #probe(token) {
    const url = new URL(connectionUrl(this.#base, token, null));
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.#options.connectTimeout);
    try {
      const response = await this.#options.fetch(url.href, {
        headers: { accept: "text/event-stream" }, signal: controller.signal,
      });
      if (response.ok) return null;
      return { status: response.status, body: await readCapped(response.body) };
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
      controller.abort();
    }
  }

  // -- Server-Sent Events over fetch ----------------------------------------------------------

  async #eventStream(token) {
    const options = this.#options;
    const position = this.#skipFrom ? null : this.#read;
    const url = new URL(this.#base.href);
    const headers = { accept: "text/event-stream" };
    if (token != null) headers.authorization = `Bearer ${token}`;
    if (position != null) headers["last-event-id"] = position;
    const controller = new AbortController();
    const abort = () => controller.abort();
    this.#abort.signal.addEventListener("abort", abort, { once: true });
    let why = null; // set when this side ends the stream: the Retry's reason
    let retryOptions = {};
    let idle = null;
    const arm = () => {
      clearTimeout(idle);
      idle = setTimeout(() => {
        why = `nothing for ${options.idleTimeout} ms`;
        controller.abort();
      }, options.idleTimeout);
    };
    const started = Date.now();
    const state = { first: true, delivered: false, unresumed: false };
    let refresher = null;
    let reader = null;
    try {
      let response;
      const timer = setTimeout(() => {
        why = `no answer within ${options.connectTimeout} ms`;
        controller.abort();
      }, options.connectTimeout);
      try {
        response = await options.fetch(url.href, {
          headers, signal: controller.signal, credentials: token == null ? "include" : "same-origin",
        });
      } catch (error) {
        if (this.#done) return new Retry("closed");
        return new Retry(why || describe(error));
      } finally {
        clearTimeout(timer);
      }
      if (!response.ok) {
        const body = await readCapped(response.body);
        return this.#refused(response.status, body, position);
      }
      const type = response.headers.get("content-type") || "";
      if (!type.toLowerCase().startsWith("text/event-stream")) {
        response.body?.cancel().catch(() => {});
        throw new ProtocolError(`the server answered ${clip(type) || "no content type"}, not an event stream`);
      }
      this.#skipFrom = false;
      this.connections += 1;
      state.unresumed = this.#started && position == null;
      refresher = this.#refresher({
        reopen: (fresh) => {
          // An event stream cannot be told a token: reopen it with the new one, from here.
          this.#nextToken = fresh;
          why = "token refreshed";
          retryOptions = { atOnce: true, healthy: true };
          controller.abort();
        },
      });
      const parser = new EventStreamParser(options.maxMessageSize);
      reader = response.body.getReader();
      const decoder = new TextDecoder();
      arm();
      for (;;) {
        if (!this.#hasRoom()) {
          clearTimeout(idle); // Waiting for the caller proves nothing about the server.
          await this.#waitRoom();
          if (this.#done) return new Retry("closed");
          arm();
        }
        let chunk;
        try {
          chunk = await reader.read();
        } catch (error) {
          if (this.#done) return new Retry("closed");
          return new Retry(why || describe(error), {
            healthy: state.delivered || Date.now() - started >= STABLE_MS, ...retryOptions,
          });
        }
        if (chunk.done) break;
        arm();
        for (const event of parser.push(decoder.decode(chunk.value, { stream: true }))) {
          this.#sseEvent(event, state);
        }
      }
      return new Retry("the stream ended", {
        healthy: state.delivered || Date.now() - started >= STABLE_MS,
      });
    } finally {
      clearTimeout(idle);
      refresher?.stop();
      this.#abort.signal.removeEventListener("abort", abort);
      controller.abort();
      reader?.cancel().catch(() => {});
    }
  }

  #sseEvent(event, state) {
    if (event.type === "message") {
      if (event.id == null) return this.#unpositioned(event.data, state);
      if (!isPosition(event.id)) {
        throw new ProtocolError(`the relay sent an event id that is not a position: ${JSON.stringify(clip(event.id))}`);
      }
      return this.#positioned({ kind: "delivery", position: event.id, payload: event.data }, state);
    }
    if (event.type === "position" || event.type === "resumed" || event.type === "lost") {
      const item = readControl(event.data);
      if (item.kind !== "control" || item.event !== event.type) {
        throw new ProtocolError(`the relay sent a ${event.type} event of another kind`);
      }
      return this.#positioned(item, state);
    }
    // Other named events are not of this protocol: ignored, as EventSource would.
  }
}

function describe(error) {
  let e = error;
  while (e && !e.message && e.cause) e = e.cause;
  const cause = error?.cause?.code || error?.cause?.message;
  return (e?.message || String(e)) + (cause && cause !== e?.message ? ` (${cause})` : "");
}

/** A Node http.IncomingMessage as a web ReadableStream (for readCapped). */
function nodeBody(res) {
  return new ReadableStream({
    start(controller) {
      res.on("data", (chunk) => controller.enqueue(chunk));
      res.on("end", () => controller.close());
      res.on("error", () => controller.close());
    },
    cancel() {
      res.destroy();
    },
  });
}

/**
 * text/event-stream, parsed as the HTML standard says (fields, an empty line ends an event),
 * with bounds: a line or an event's data longer than `max` characters is an error.
 */
export class EventStreamParser {
  #max;
  #buffer = "";
  #data = null;
  #type = "";
  #id = null;
  #first = true;
  #skipLF = false;

  constructor(max) {
    this.#max = max;
  }

  /** Feed text; returns the events it completed: {type, data, id} (id null when the event
   * had no id field). */
  push(text) {
    const events = [];
    if (this.#first && text) {
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      this.#first = false;
    }
    let start = 0;
    if (this.#skipLF && text.startsWith("\n")) start = 1;
    this.#skipLF = false;
    for (;;) {
      const cr = text.indexOf("\r", start);
      const lf = text.indexOf("\n", start);
      const end = cr < 0 ? lf : lf < 0 ? cr : Math.min(cr, lf);
      if (end < 0) break;
      const line = this.#buffer + text.slice(start, end);
      this.#buffer = "";
      this.#line(line, events);
      if (text[end] === "\r") {
        if (end + 1 === text.length) {
          this.#skipLF = true;
          start = end + 1;
          break;
        }
        start = text[end + 1] === "\n" ? end + 2 : end + 1;
      } else {
        start = end + 1;
      }
    }
    this.#buffer += text.slice(start);
    if (this.#buffer.length > this.#max + 64) {
      throw new Closed(1009, `an event-stream line over ${this.#max} characters`);
    }
    return events;
  }

  #line(line, events) {
    if (line === "") {
      if (this.#data !== null) {
        events.push({ type: this.#type || "message", data: this.#data, id: this.#id });
      }
      this.#data = null;
      this.#type = "";
      this.#id = null;
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") {
      this.#data = this.#data === null ? value : this.#data + "\n" + value;
      if (this.#data.length > this.#max) {
        throw new Closed(1009, `an event of over ${this.#max} characters`);
      }
    } else if (field === "event") {
      this.#type = value.slice(0, 64);
    } else if (field === "id") {
      if (!value.includes("\0")) this.#id = value.slice(0, 64);
    }
    // retry and unknown fields: ignored (this library has its own backoff).
  }
}

/**
 * Subscribe to a relay URL: ws(s):// or http(s)://, path /CHANNEL (or / with a channels claim).
 * Returns a Subscription (an async iterable of {type: "message", payload, position} and
 * {type: "lost", reason, position}). Throws TypeError at once for bad arguments.
 */
export function subscribe(url, options = {}) {
  const transport = options.transport ?? "websocket";
  if (transport !== "websocket" && transport !== "sse") {
    throw new TypeError('subscribe: transport must be "websocket" or "sse"');
  }
  if (options.token != null && typeof options.token !== "string") {
    throw new TypeError("subscribe: token must be a string (use getToken for a function)");
  }
  if (options.getToken != null && typeof options.getToken !== "function") {
    throw new TypeError("subscribe: getToken must be a function");
  }
  if (options.position != null && !isPosition(options.position)) {
    throw new TypeError("subscribe: not a position");
  }
  const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
  const fetchImpl = options.fetch ?? (globalThis.fetch ? globalThis.fetch.bind(globalThis) : undefined);
  if (transport === "websocket" && typeof WebSocketImpl !== "function") {
    throw new TypeError("subscribe: no WebSocket here: pass one (e.g. the ws package) as the WebSocket option");
  }
  if (transport === "sse" && typeof fetchImpl !== "function") {
    throw new TypeError("subscribe: no fetch here: pass one as the fetch option");
  }
  const number = (name, fallback) => {
    const value = options[name] ?? fallback;
    if (typeof value !== "number" || !(value >= 0)) throw new TypeError(`subscribe: ${name} must be a number >= 0`);
    return value;
  };
  const settings = {
    transport,
    token: options.token ?? null,
    getToken: options.getToken ?? null,
    filters: [...(options.filters ?? [])],
    position: options.position ?? null,
    WebSocket: WebSocketImpl,
    fetch: fetchImpl,
    signal: options.signal ?? null,
    onStatus: options.onStatus ?? null,
    probe: options.probe ?? true,
    backoffMin: number("backoffMin", 500),
    backoffMax: number("backoffMax", 30000),
    connectTimeout: number("connectTimeout", 10000),
    pingInterval: number("pingInterval", 10000),
    pingTimeout: number("pingTimeout", 10000),
    idleTimeout: number("idleTimeout", 45000),
    maxMessageSize: number("maxMessageSize", 2 ** 20),
    buffer: Math.max(1, number("buffer", 1000)),
    maxBufferedBytes: number("maxBufferedBytes", 16 * 2 ** 20),
  };
  return new Subscription(url, settings);
}
