// Type declarations for pgws-relay-client (index.js).

/** The WebSocket subprotocol that asks the relay for positions. */
export const SUBPROTOCOL: "pgws.resume.v1";
/** A Lost reason made by the library: the relay sends no positions. */
export const UNSUPPORTED: "unsupported";

/** A delivery: the notification's text as sent, and its position (null when the relay sends
 * none: postgres-websockets, or history off). */
export interface MessageEvent {
  type: "message";
  payload: string;
  position: string | null;
}

/** Messages may have been missed: re-read your state; the stream goes on after `position`. */
export interface LostEvent {
  type: "lost";
  reason: "expired" | "gap" | "unknown" | "unsupported";
  position: string | null;
}

export type SubscriptionEvent = MessageEvent | LostEvent;

/** What onStatus is told (for display and logs; never carries a token). */
export type Status =
  | { state: "connecting"; attempt: number }
  | { state: "connected"; connections: number; replayed: number | null }
  | { state: "reconnecting"; why: string; delay: number }
  | { state: "token"; exp: number | null }
  | { state: "token-refused"; reason: string }
  | { state: "token-unanswered" }
  | { state: "token-error"; error: unknown };

/** A WebSocket constructor: the browser's, Node 22's, or the ws package's. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: object) => any;

export interface SubscribeOptions {
  /** A JWT; sent in the URL path (/CHANNEL/TOKEN) over WebSocket, as Authorization: Bearer over SSE. */
  token?: string | null;
  /** Returns a fresh JWT: called before the current token's exp, and at reconnects. */
  getToken?: (() => string | Promise<string>) | null;
  /** Filters, `path=op.value` (docs/filters.md), sent as repeated `filter=` parameters. */
  filters?: Iterable<string>;
  /** Start after this position (as `subscription.position` gave it). */
  position?: string | null;
  /** "websocket" (default) or "sse" (Server-Sent Events read with fetch). */
  transport?: "websocket" | "sse";
  /** The WebSocket implementation (default: globalThis.WebSocket; on Node 20 pass the ws package's). */
  WebSocket?: WebSocketConstructor;
  /** The fetch implementation (default: globalThis.fetch). */
  fetch?: typeof fetch;
  /** Aborting it closes the subscription. */
  signal?: AbortSignal | null;
  /** Told of connects, reconnects and token refreshes. */
  onStatus?: ((status: Status) => void) | null;
  /** Backoff before a reconnect, in milliseconds: full jitter, from backoffMin (500) doubling to backoffMax (30000). */
  backoffMin?: number;
  backoffMax?: number;
  /** Milliseconds for a handshake or a response head (10000). */
  connectTimeout?: number;
  /** WebSocket pings, with implementations that can send them (the ws package), in ms (10000 each; 0: off). */
  pingInterval?: number;
  pingTimeout?: number;
  /** SSE: milliseconds of silence after which the stream is taken for dead (45000; the relay sends a keep-alive every 15 s). */
  idleTimeout?: number;
  /** Largest message (or SSE event) accepted, in characters (1 MiB); a larger one ends the subscription. */
  maxMessageSize?: number;
  /** Events held for a slow caller (1000), and their payloads' size (16 MiB). */
  buffer?: number;
  maxBufferedBytes?: number;
  /** WebSocket in a browser: learn a refused handshake's status by asking the same URL as an event stream (true). */
  probe?: boolean;
}

export class Subscription implements AsyncIterableIterator<SubscriptionEvent> {
  /** The position of the last event the iterator returned. */
  readonly position: string | null;
  /** A connection is up and has said where its stream starts. */
  readonly connected: boolean;
  /** Connections made so far. */
  readonly connections: number;
  [Symbol.asyncIterator](): Subscription;
  next(): Promise<IteratorResult<SubscriptionEvent, undefined>>;
  return(): Promise<IteratorResult<SubscriptionEvent, undefined>>;
  /** Send text on the open WebSocket connection (a token of mode w or rw publishes it); false
   * when nothing was sent: no connection open, or transport "sse". */
  send(text: string): boolean;
  /** Close the connection; pending and later next() calls return done. */
  close(): void;
  /** Resolves once the `count`-th (or a later) connection is up. */
  waitConnected(count?: number): Promise<void>;
}

/** Subscribe to `url` (ws://, wss://, http:// or https://; path /CHANNEL, or / with a channels claim). */
export function subscribe(url: string, options?: SubscribeOptions): Subscription;

export class SubscriptionError extends Error {}
/** The relay refused the handshake (a 4xx other than 408/429). */
export class Refused extends SubscriptionError {
  readonly status: number;
  readonly body: string;
}
/** The relay closed the connection for a reason a reconnect would not change. */
export class Closed extends SubscriptionError {
  readonly code: number;
  readonly reason: string | null;
}
/** The server sent something that is not the protocol. */
export class ProtocolError extends SubscriptionError {}

/** Milliseconds before retry `attempt` (0 first): uniform in [0, min(high, low * 2**attempt)). */
export function backoff(attempt: number, low: number, high: number, rand?: () => number): number;
/** Whether `text` has a position's grammar. */
export function isPosition(text: unknown): text is string;
/** The exp claim of a JWT, unverified; null if none. */
export function tokenExpiry(token: string | null | undefined): number | null;
/** One message of a pgws.resume.v1 connection, parsed. */
export function readMessage(text: string):
  | { kind: "delivery"; position: string; payload: string }
  | { kind: "control"; event: "position" | "resumed" | "lost"; position: string; reason: string | null; replayed: number | null }
  | { kind: "token"; exp: number | null }
  | { kind: "token-refused"; reason: string };

/** A bounded text/event-stream parser. */
export class EventStreamParser {
  constructor(max: number);
  push(text: string): Array<{ type: string; data: string; id: string | null }>;
}
